"""The Flower apps on Flower's simulation engine (real Ray backend, real messages)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.simulation import run_simulation

import server.server_app as server_app_module
from client.client_app import make_client_app
from fedrec import keys
from fedrec.central import run_centralized
from fedrec.cli import main
from fedrec.config import RunConfig, flat_defaults
from fedrec.data import load_split
from fedrec.errors import ConfigError
from fedrec.federated import cached_split
from fedrec.state import ledger_path, load_checkpoint, load_state, state_path
from server.server_app import make_server_app
from server.strategy import FedRecStrategy

ROOT = Path(__file__).resolve().parents[1]
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"logging_level": "ERROR", "log_to_driver": False}}
SMALL = {"synthetic-users": 30, "synthetic-items": 50, "dim": 4, "batch-size": 32,
         "negatives": 2, "partition": "cross-silo", "num-clients": 2, "verbose": False}


class RecordingStrategy(FedRecStrategy):
    """FedRecStrategy that also keeps every reply it receives (as Flower carried it)."""

    replies: list[tuple[str, Any]] = []

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        RecordingStrategy.replies += [("train", m) for m in replies]
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        RecordingStrategy.replies += [("evaluate", m) for m in replies]
        return super().aggregate_evaluate(server_round, replies)


def _simulate(flat: dict[str, Any], nodes: int) -> dict[str, Any]:
    flat = {"checkpoint-dir": str(Path(flat["out-dir"]) / "checkpoint"), **flat}
    cached_split(RunConfig.from_flat(flat).data)  # load once, before Ray forks (as simulate does)
    from fedrec.federated import ExperimenterEvaluation

    run_simulation(server_app=make_server_app(flat, display=None,
                                              evaluator=ExperimenterEvaluation),
                   client_app=make_client_app(flat), num_supernodes=nodes,
                   backend_config=BACKEND)
    return json.loads((Path(flat["out-dir"]) / "metrics.json").read_text())


def test_messages_carry_no_user_data_and_epsilon_survives_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_app_module, "FedRecStrategy", RecordingStrategy)
    RecordingStrategy.replies = []
    flat = {**SMALL, "rounds": 2, "dp": True, "target-epsilon": 4.0,
            "state-dir": str(tmp_path / "state"), "out-dir": str(tmp_path / "run1")}
    first = _simulate(flat, nodes=2)
    assert 0 < first["epsilon"] <= 4.05 and first["delta"] == 1e-5
    assert first["unit_of_privacy"].startswith("one rating")
    assert all(np.isfinite(first[k]) for k in ("recall@20", "ndcg@20", "precision@10"))

    shared_keys = set(torch.load(tmp_path / "run1" / "shared_model.pt"))
    states = [load_state(state_path(tmp_path / "state", p)) for p in (0, 1)]
    user_rows = torch.cat([s.local[k] for s in states for k in s.local if k.endswith("emb.weight")])
    # under DP: no example count (weight 1), no loss, no timing, no evaluation counts
    allowed_train = {keys.NUM_EXAMPLES, keys.EPSILON, keys.DELTA, keys.EXHAUSTED}
    assert {kind for kind, _ in RecordingStrategy.replies} == {"train"}
    assert first["evaluation"] == "experimenter (simulation)"
    for kind, msg in RecordingStrategy.replies:
        assert not msg.has_error()
        content = msg.content
        assert not content.config_records  # no free-form values (ids, strings) at all
        metrics = dict(content["metrics"])
        assert all(isinstance(v, int | float) for v in metrics.values())
        if kind == "train":
            assert set(content.metric_records) == {"metrics"}  # no unnoised counts
            assert set(content.array_records) == {"arrays"}  # with DP: no touched mask
            assert set(metrics) == allowed_train and metrics[keys.NUM_EXAMPLES] == 1
            arrays = {k: v.numpy() for k, v in content["arrays"].items()}
            assert set(arrays) == shared_keys
            for arr in arrays.values():  # no user embedding row inside any array
                flat_rows = torch.from_numpy(arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1
                                             else arr.reshape(1, -1))
                if flat_rows.shape[1] == user_rows.shape[1]:
                    dist = torch.cdist(user_rows.double(), flat_rows.double())
                    assert dist.min() > 1e-6
        else:
            assert not content.array_records
            assert all(k == keys.NUM_EXAMPLES or k.startswith(("num-", "sum-"))
                       for k in metrics)

    # Restart every client (a new simulation = new processes) on the same state dir: the
    # ledger continues. The same target again buys nothing (the budget is spent) ...
    again = _simulate({**flat, "out-dir": str(tmp_path / "run2")}, nodes=2)
    rows2 = json.loads((tmp_path / "run2" / "rounds.json").read_text())
    assert all(r["exhausted"] == 2 and r["clients"] == 0 for r in rows2)
    assert again["epsilon"] == pytest.approx(first["epsilon"])
    # ... a larger target spends only the difference, on top of what was spent
    third = _simulate({**flat, "target-epsilon": 6.0, "out-dir": str(tmp_path / "run3")},
                      nodes=2)
    rows3 = json.loads((tmp_path / "run3" / "rounds.json").read_text())
    assert rows3[0]["epsilon-max"] > first["epsilon"]  # continues, never resets
    assert first["epsilon"] < third["epsilon"] <= 6.0 + 1e-6
    assert all(load_state(state_path(tmp_path / "state", p)).rounds == 4 for p in (0, 1))


def test_non_private_federated_mf_is_close_to_centralized(tmp_path: Path) -> None:
    """Same data, model and total epochs: 3 silos x 10 rounds x 2 local epochs vs 20."""
    common = {"synthetic-users": 300, "synthetic-items": 300, "dim": 16, "batch-size": 256,
              "negatives": 4, "lr": 0.01, "dp": False, "seed": 3, "eval-every": 0}
    cfg = RunConfig.from_flat({**common, "epochs": 20})
    _, central, _ = run_centralized(cfg, load_split(cfg.data))
    from fedrec.inprocess import run_inprocess  # the rounds Flower runs (tested equal below)

    _, rows = run_inprocess(RunConfig.from_flat(
        {**common, "partition": "cross-silo", "num-clients": 3, "rounds": 10,
         "local-epochs": 2, "state-dir": str(tmp_path / "s")}), engine="loop")
    fed = rows[-1]
    assert fed["recall@20"] >= 0.97 * central["recall@20"], (fed, central)
    assert fed["ndcg@20"] >= 0.97 * central["ndcg@20"], (fed, central)


def test_pyproject_config_defaults_match_the_typed_config() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert table["config"] == flat_defaults()
    assert table["components"] == {"serverapp": "server.server_app:app",
                                   "clientapp": "client.client_app:app"}


def test_simulate_rejects_a_bad_key_before_starting(capsys: pytest.CaptureFixture,
                                                     tmp_path: Path) -> None:
    assert main(["simulate", "--rounds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "'rounds': expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown config key 'round'"):
        RunConfig.from_flat({"round": 3})
    assert not (tmp_path / "x").exists()


def test_core_library_does_not_import_flower() -> None:
    import subprocess
    import sys

    code = ("import sys, fedrec.cli, fedrec.federated, fedrec.central, fedrec.aggregate; "
            "sys.exit(1 if any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules) "
            "else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_server_does_not_import_the_client() -> None:
    """Runners that compose both live in simulations/; server/ stands alone."""
    import subprocess
    import sys

    code = ("import sys, server.server_app, server.strategy, server.secagg, server.grid; "
            "sys.exit(1 if any(m == 'client' or m.startswith('client.') for m in sys.modules) "
            "else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_in_process_rounds_equal_the_flower_simulation(tmp_path: Path) -> None:
    """fedrec.inprocess (used by benchmarks and sweeps) does the arithmetic Flower runs do.

    Equal noise needs the reproducible (not secret) stream: a test-only setting."""
    from fedrec.inprocess import run_inprocess

    flat = {**SMALL, "num-clients": 3, "rounds": 2, "dp": True, "target-epsilon": 4.0,
            "insecure-noise-seed": 11, "server-opt": "adam", "server-lr": 0.05,
            "state-dir": str(tmp_path / "state"), "out-dir": str(tmp_path / "run")}
    _simulate(flat, nodes=3)
    flower_rows = json.loads((tmp_path / "run" / "rounds.json").read_text())
    flower_model = torch.load(tmp_path / "run" / "shared_model.pt")
    shared, rows = run_inprocess(RunConfig.from_flat(flat), engine="loop")
    assert len(rows) == len(flower_rows) == 2
    for ours, theirs in zip(rows, flower_rows):
        for key in ("recall@20", "ndcg@20", "precision@10", "epsilon-max"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    for key, value in shared.items():
        np.testing.assert_allclose(value, flower_model[key].numpy(), rtol=1e-5, atol=1e-7)


def test_one_message_per_node_per_round_gives_the_rows_of_separate_evaluation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval-with-train: each train message also evaluates the model it carries (the
    previous round's), so a round costs one message per node; rows, noise and epsilon
    are those of separate evaluate messages (same reproducible stream; test only)."""
    flat = {**SMALL, "rounds": 3, "dp": True, "target-epsilon": 6.0,
            "eval-noise-multiplier": 2.0, "insecure-noise-seed": 5}
    rows = {}
    monkeypatch.setattr(server_app_module, "FedRecStrategy", RecordingStrategy)
    for fused in (True, False):
        RecordingStrategy.replies = []
        run = tmp_path / f"run-{fused}"
        _simulate({**flat, "eval-with-train": fused, "state-dir": str(run / "state"),
                   "out-dir": str(run / "out")}, nodes=2)
        rows[fused] = json.loads((run / "out" / "rounds.json").read_text())
        if fused:  # the counts ride in train replies with the key set an evaluate reply has
            train = [m for kind, m in RecordingStrategy.replies if kind == "train"]
            evaluate = [m for kind, m in RecordingStrategy.replies if kind == "evaluate"]
            assert [("evaluation" in m.content) for m in train] == [False] * 2 + [True] * 4
            assert len(evaluate) == 2
            names = set(dict(evaluate[0].content["metrics"]))
            assert all(set(dict(m.content["evaluation"])) == names for m in train[2:])
    assert [r["messages"] for r in rows[True]] == [2, 2, 4]  # train; train; train+evaluate
    assert [r["messages"] for r in rows[False]] == [4, 4, 4]
    # resuming the finished run for one more round does not evaluate round 3's model again
    from fedrec.state import load_ledger

    run = tmp_path / "run-True"
    spent = [load_ledger(ledger_path(run / "state", p)).evaluations for p in (0, 1)]
    assert spent == [3, 3]
    _simulate({**flat, "rounds": 4, "resume": True, "target-epsilon": 12.0,
               "state-dir": str(run / "state"),
               "checkpoint-dir": str(run / "out" / "checkpoint"),
               "out-dir": str(run / "out4")}, nodes=2)
    assert [load_ledger(ledger_path(run / "state", p)).evaluations for p in (0, 1)] == [4, 4]
    resumed = json.loads((run / "out4" / "rounds.json").read_text())
    assert resumed[2] == rows[True][2]  # round 3's row is kept, not overwritten
    for ours, theirs in zip(rows[True], rows[False], strict=True):
        assert ours["evaluation"] == theirs["evaluation"] == "clients (noised)"
        for key in ("recall@20", "ndcg@20", "precision@10", "epsilon-max", "eval-clients"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key


def test_user_level_dp_spends_the_target_exactly_across_a_resume(tmp_path: Path) -> None:
    """Central user-level DP in a Flower simulation: epsilon is composed from the noise
    of every round actually run (checkpointed), also when a resume adds rounds; with
    fraction-evaluate 0 each round has one row."""
    flat = {**SMALL, "rounds": 2, "dp": False, "user-dp": True, "user-target-epsilon": 2.0,
            "fraction-evaluate": 0.0, "server-opt": "adam", "server-lr": 0.05,
            "state-dir": str(tmp_path / "state"), "out-dir": str(tmp_path / "run"),
            "checkpoint-dir": str(tmp_path / "ckpt")}
    out = _simulate(flat, nodes=2)
    assert out["rounds"] == 2  # was 4: each row written twice without evaluation
    # the server checkpoints every round: model, rows and FedAdam moments
    saved = load_checkpoint(tmp_path / "ckpt" / "server.pt")
    assert saved["round"] == 2 and len(saved["rows"]) == 2 and saved["server_opt"]
    model1 = torch.load(tmp_path / "run" / "shared_model.pt")
    for key, value in saved["shared"].items():
        np.testing.assert_array_equal(value, model1[key].numpy())
    assert out["user_epsilon"] == pytest.approx(2.0, rel=0.01)
    assert out["user_unit_of_privacy"].startswith("one client's whole data")
    assert out["noise_secret"] is True
    resumed = _simulate({**flat, "rounds": 3, "resume": True,
                         "out-dir": str(tmp_path / "run2")}, nodes=2)
    rows = json.loads((tmp_path / "run2" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3] and resumed["rounds"] == 3
    assert load_checkpoint(tmp_path / "ckpt" / "server.pt")["round"] == 3
    assert all(load_state(state_path(tmp_path / "state", p)).rounds == 3 for p in (0, 1))
    assert rows[-1].get("user-exhausted") == 1  # the budget was spent in the 2-round plan
    from fedrec.privacy import epsilon_of
    zs = [(r["user-noise-multiplier"], 1.0, 1) for r in rows if "user-noise-multiplier" in r]
    assert len(zs) == 2
    assert resumed["user_epsilon"] == pytest.approx(epsilon_of(zs, 1e-5), rel=1e-9)
    assert resumed["user_epsilon"] <= 2.0 + 1e-6


def test_a_checkpoint_of_another_model_is_refused_before_any_round(tmp_path: Path) -> None:
    from fedrec.federated import init_shared
    from fedrec.state import save_checkpoint
    from server.server_app import resume_point

    flat = {**SMALL, "rounds": 2, "dp": False, "checkpoint-dir": str(tmp_path / "ckpt")}
    cfg = RunConfig.from_flat(flat)
    shared = init_shared(cfg, 50)
    save_checkpoint(tmp_path / "ckpt" / "server.pt", 2, shared, {}, [{}, {}])
    other = RunConfig.from_flat({**flat, "dim": 8, "rounds": 4, "resume": True})
    with pytest.raises(ConfigError, match="another model"):
        resume_point(other, init_shared(other, 50))
    done, _, _ = resume_point(RunConfig.from_flat({**flat, "resume": True}), shared)
    assert done == 2


def test_a_server_run_never_silently_replaces_results_or_a_checkpoint(tmp_path: Path) -> None:
    from server.server_app import check_fresh

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    cfg = RunConfig.from_flat({"out-dir": str(out), "checkpoint-dir": str(ckpt)})
    check_fresh(cfg)  # nothing there yet
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="overwrite=true"):
        check_fresh(cfg)
    (out / "metrics.json").unlink()
    ckpt.mkdir()
    (ckpt / "server.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="resume=true"):
        check_fresh(cfg)
    check_fresh(cfg.replace(overwrite=True))
    check_fresh(cfg.replace(resume=True))
