"""Each privacy claim, tested the way an honest-but-curious server would try to break it.

Secret noise (not from configuration), exact epsilon after a resume, a ledger that is
never lost silently, nothing data-dependent in DP replies, error codes instead of
error text, node-pinned parsing and privacy floor, user-level clipping that cannot be
dodged, and negatives that do not depend on a user's other ratings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import evaluate_handler, train_handler
from fedrec import keys, privacy
from fedrec.config import RunConfig
from fedrec.data import ExampleBuilder, load_split
from fedrec.errors import ConfigError, StateError
from fedrec.federated import ClientData, fit_client, init_shared, split_for_users
from fedrec.partition import partition_users
from fedrec.state import (
    ledger_path,
    load_ledger,
    reset_ledger,
    save_ledger,
    save_state,
    state_path,
)

FLAT = {"synthetic-users": 40, "synthetic-items": 60, "dim": 4, "batch-size": 16,
        "negatives": 2, "rounds": 2, "num-clients": 4, "optimizer": "sgd", "lr": 0.5,
        "dp": True, "target-epsilon": 2.0}


def _client(cfg: RunConfig, pid: int = 0) -> tuple[ClientData, dict[str, np.ndarray]]:
    split = load_split(cfg.data)
    users = partition_users("cross-silo", split.n_users, cfg.fed.num_clients, 0)[pid]
    return split_for_users(split, users), init_shared(cfg, split.n_items)


def _update(out: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(out[k] - sent[k]).ravel() for k in sorted(sent)])


def _empty(data: ClientData) -> ClientData:
    """The same client with no training ratings: under DP its update is pure noise."""
    return dataclasses.replace(data, train=data.train.subset(np.zeros(len(data.train), bool)))


# --- 1. the noise is secret ---------------------------------------------------------

def test_same_config_and_seed_give_different_noise() -> None:
    cfg = RunConfig.from_flat(FLAT)
    data, shared = _client(cfg)
    outs = []
    for _ in range(2):
        torch.manual_seed(cfg.data.seed)  # what a server could do: re-seed from the config
        res = fit_client(cfg, data, shared, None, seed=cfg.data.seed, server_round=1)
        outs.append(_update(res.shared, shared))
    assert not np.allclose(outs[0], outs[1])


def test_noise_of_two_rounds_is_independent_and_not_regenerable() -> None:
    """A client with no ratings uploads pure noise; two rounds' noise (same inputs) is
    uncorrelated, so subtracting uploads does not cancel it; a replay with the
    server-known seed does not reproduce it. (6,800 coordinates: |corr| of independent
    noise is ~0.012, so the 0.1 bound has 8 standard deviations of room.)"""
    cfg = RunConfig.from_flat({**FLAT, "synthetic-items": 400, "dim": 16})
    data, shared = _client(cfg)
    empty = _empty(data)
    noise = [_update(fit_client(cfg, empty, shared, None, seed=0, server_round=r).shared,
                     shared) for r in (1, 2)]
    torch.manual_seed(0 * 1_000_003 + 1)  # the old, config-derived seed of round 1
    replay = _update(fit_client(cfg, empty, shared, None, seed=0, server_round=1).shared,
                     shared)
    for a, b in ((noise[0], noise[1]), (noise[0], replay)):
        assert np.std(a) > 0 and np.std(b) > 0
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.1


def test_dp_generators_cannot_be_found_by_trying_seeds() -> None:
    """torch's CPU generator keeps only the low 32 bits of a manual seed, so 2^32 tries
    would find any seeded stream. A secret generator's whole state is OS entropy: its
    stream is not the one of the seed it reports (nor of any 32-bit seed), and two
    generators never share a stream."""
    low = torch.Generator().manual_seed(12345)
    high = torch.Generator().manual_seed(12345 + (7 << 32))
    assert torch.equal(torch.randn(8, generator=low), torch.randn(8, generator=high))
    cfg = RunConfig.from_flat(FLAT).privacy
    gens = [privacy.dp_generator(cfg, 0, 1, privacy.NOISE) for _ in range(2)]
    gens.append(privacy.secret_generator())
    draws = [torch.randn(64, generator=g) for g in gens]
    for g, d in zip(gens, draws):
        replay = torch.Generator().manual_seed(g.initial_seed() & 0xFFFFFFFF)
        assert not torch.equal(torch.randn(64, generator=replay), d)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    seeded = RunConfig.from_flat({**FLAT, "insecure-noise-seed": 7}).privacy
    a, b = (torch.randn(8, generator=privacy.dp_generator(seeded, 0, 1, privacy.NOISE))
            for _ in range(2))
    assert torch.equal(a, b)  # the labelled experiment stream stays reproducible


def test_a_seeded_noise_stream_exists_only_as_a_labelled_experiment() -> None:
    cfg = RunConfig.from_flat({**FLAT, "insecure-noise-seed": 7})
    data, shared = _client(cfg)
    a, b = (fit_client(cfg, _empty(data), shared, None, seed=0, server_round=1).shared
            for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # reproducible: NOT secret
    assert not privacy.noise_is_secret(cfg.privacy)
    assert privacy.noise_is_secret(RunConfig.from_flat(FLAT).privacy)


def test_model_initialisation_does_not_touch_the_global_generator() -> None:
    from fedrec.model import build_model

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    build_model(RunConfig().model, 5, 7, seed=0)
    assert torch.equal(torch.rand(3), before)


# --- 2. exact epsilon after a resume, a ledger that is never lost silently -----------

def test_record_level_resume_with_more_rounds_stays_within_the_target() -> None:
    cfg = RunConfig.from_flat({**FLAT, "target-epsilon": 1.0})
    data, shared = _client(cfg)
    state = ledger = None
    for rnd in (1, 2):
        res = fit_client(cfg, data, shared, state, ledger, seed=0, server_round=rnd)
        state, ledger, shared = res.state, res.ledger, res.shared
    assert res.epsilon == pytest.approx(1.0, abs=0.01)
    more = cfg.replace(rounds=4)  # the operator resumes with two more rounds
    for rnd in (3, 4):
        res = fit_client(more, data, shared, state, ledger, seed=0, server_round=rnd)
        if not res.exhausted:
            state, ledger, shared = res.state, res.ledger, res.shared
        assert res.epsilon <= 1.0 + 1e-6
    assert privacy.epsilon_of(ledger.history, 1e-5) <= 1.0 + 1e-6


def test_the_cap_defaults_to_the_target() -> None:
    cfg = RunConfig.from_flat(FLAT)
    assert cfg.epsilon_cap == cfg.privacy.target_epsilon == 2.0
    data, shared = _client(cfg)
    state = ledger = None
    for rnd in (1, 2, 3):  # round 3 is beyond the plan: the budget is spent
        res = fit_client(cfg, data, shared, state, ledger, seed=0, server_round=rnd)
        state, ledger = res.state, res.ledger
    assert res.exhausted and res.shared is None and res.epsilon <= 2.0 + 1e-6
    # a server that lies about the round number still cannot cross the cap
    res = fit_client(cfg, data, shared, state, ledger, seed=0, server_round=1)
    assert res.exhausted and res.epsilon <= 2.0 + 1e-6


def test_a_lost_ledger_is_an_error_and_a_reset_is_explicit_and_logged(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat(FLAT)
    data, shared = _client(cfg)
    spath, lpath = state_path(tmp_path, 0), ledger_path(tmp_path, 0)
    res = fit_client(cfg, data, shared, None, None, seed=0, server_round=1)
    save_ledger(lpath, res.ledger)
    save_state(spath, res.state)
    spent = res.epsilon
    spath.unlink()  # replacing the model state keeps the spend
    assert load_ledger(lpath, trained_evidence=spath).epsilon == spent
    save_state(spath, res.state)
    lpath.unlink()
    with pytest.raises(StateError, match="ledger missing although this node has trained.*"
                       "fedrec ledger reset") as err:
        load_ledger(lpath, trained_evidence=spath)
    assert "fresh state dir" not in str(err.value)
    with pytest.raises(StateError, match="needs a reason"):
        reset_ledger(tmp_path, 0, " ")
    reset_ledger(tmp_path, 0, "restored node, ledger lost in disk failure")
    fresh = load_ledger(lpath, trained_evidence=spath)
    assert fresh.epsilon == 0 and fresh.resets[-1]["reason"].startswith("restored node")
    log = lpath.with_suffix(".log").read_text().splitlines()
    assert json.loads(log[-1])["previous_file"] == "missing"


# --- 3. nothing data-dependent leaves a client -----------------------------------------

@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's Message needs the identity of the task that creates it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _ask(kind: str, shared: dict[str, np.ndarray], server_round: int = 1) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}),
                               "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=2, message_type=kind)


def _context(run: dict[str, Any], node: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=2, node_config=node, state=RecordDict(),
                   run_config=run)


def test_dp_replies_carry_no_count_loss_or_timing(tmp_path: Path, task_identity: None) -> None:
    run = {**FLAT, "num-clients": 2, "state-dir": str(tmp_path)}
    cfg = RunConfig.from_flat(run)
    shared = init_shared(cfg, load_split(cfg.data).n_items)
    node = {"partition-id": 0, "num-partitions": 2}
    reply = train_handler(_ask("train", shared), _context(run, node))
    assert not reply.has_error()
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {keys.NUM_EXAMPLES, keys.EPSILON, keys.DELTA, keys.EXHAUSTED}
    assert metrics[keys.NUM_EXAMPLES] == 1
    assert set(reply.content.array_records) == {"arrays"}  # no touched mask
    # evaluation counts are not released under DP without accounted noise
    refused = evaluate_handler(_ask("evaluate", shared), _context(run, node))
    assert refused.has_error() and refused.error.code == 104
    noisy_run = {**run, "eval-noise-multiplier": 5.0}
    spent = load_ledger(ledger_path(tmp_path, 0)).epsilon
    noisy = evaluate_handler(_ask("evaluate", shared), _context(noisy_run, node))
    exact = evaluate_handler(_ask("evaluate", shared), _context({**noisy_run, "dp": False},
                                                                 node))
    counts, truth = dict(noisy.content["metrics"]), dict(exact.content["metrics"])
    assert counts[keys.NUM_EXAMPLES] == 1 and counts[keys.NUM_USERS] != truth[keys.NUM_USERS]
    assert counts[keys.EPSILON] > spent  # the release was charged
    assert load_ledger(ledger_path(tmp_path, 0)).evaluations == 1


def _node_files(tmp_path: Path, secret: str) -> dict[str, Any]:
    (tmp_path / "catalogue.csv").write_text("item\n" + "".join(f"i{i}\n" for i in range(20)))
    rows = [f"{secret}{u},i{i},{1 + (u + i) % 5},{u * 100 + i}" for u in range(4)
            for i in range(0, 20, 3)]
    (tmp_path / "ratings.csv").write_text("user,item,rating,timestamp\n" + "\n".join(rows))
    return {"data-file": str(tmp_path / "ratings.csv"),
            "catalogue-file": str(tmp_path / "catalogue.csv"),
            "state-dir": str(tmp_path / "state"), "partition-id": 0}


def test_client_errors_reach_the_server_as_codes_only(
        tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture) -> None:
    node = _node_files(tmp_path, "alice-secret-")
    run = {**FLAT, "num-items": 20, "user-col": "nonexistent"}
    cfg = RunConfig.from_flat(run)
    shared = init_shared(cfg, 20)
    # the node's own parsing is pinned: the run's user-col is ignored, training works
    ok = train_handler(_ask("train", shared), _context(run, node))
    assert not ok.has_error(), ok.error
    (tmp_path / "ratings.csv").write_text("user,item,rating,timestamp\n"
                                          "alice-secret-9,i1,oops,1\n")
    from fedrec.federated import node_data
    node_data.cache_clear()
    with caplog.at_level(logging.ERROR, logger="fedrec.client"):
        bad = train_handler(_ask("train", shared), _context(run, {**node, "partition-id": 1}))
    assert bad.has_error() and bad.error.code == 101
    assert "alice" not in bad.error.reason and "oops" not in bad.error.reason
    assert "ratings.csv" in caplog.text  # the details stay in the node's log


@pytest.mark.parametrize(("node_floor", "run_over"), [
    ({"dp": True}, {"dp": False}),
    ({"dp": True}, {"target-epsilon": 0.0}),  # explicit sigma, no cap: unbounded epsilon
    ({"epsilon-cap": 1.0}, {"target-epsilon": 0.0}),
    ({"target-epsilon": 4.0}, {"delta": 0.5}),  # a floor's delta defaults to 1e-5
    ({"target-epsilon": 4.0}, {"dp": False}),  # a floor implies DP
    ({"target-epsilon": 1.0}, {"target-epsilon": 4.0}),
    ({"epsilon-cap": 1.0}, {"target-epsilon": 2.0}),
    ({"delta": 1e-6}, {"delta": 1e-5}),
    ({}, {"insecure-noise-seed": 3}),
    ({"dp": True}, {"user-features": "on"}),  # its users' features outside distributed DP
    # its ratings' times in a non-private reply (a floor may leave dp off)
    ({"dp": False, "epsilon-cap": 4.0}, {"model": "deepfm", "mlp-layers": "8,4",
                                         "context": "on", "dp": False}),
])
def test_a_node_refuses_a_run_config_below_its_privacy_floor(
        tmp_path: Path, task_identity: None, node_floor: dict[str, Any],
        run_over: dict[str, Any]) -> None:
    node = {**_node_files(tmp_path, "u"), **node_floor}
    run = {**FLAT, "num-items": 20, **run_over}
    shared = init_shared(RunConfig.from_flat(run), 20)
    reply = train_handler(_ask("train", shared), _context(run, node))
    assert reply.has_error() and reply.error.code == 104, reply
    model = {k: v for k, v in run_over.items() if k in ("model", "mlp-layers")}
    fine_run = {**FLAT, "num-items": 20, "target-epsilon": 0.5, "delta": 1e-6, **model}
    fine = train_handler(_ask("train", init_shared(RunConfig.from_flat(fine_run), 20)),
                         _context(fine_run, node))
    assert not fine.has_error(), fine.error


# --- 4. user-level DP: no clip bypass, no void rounds -----------------------------------

def _reply(request: Message, arrays: dict[str, np.ndarray] | None, error: bool = False
           ) -> Message:
    from flwr.app import Error

    if error:
        return Message(Error(code=100, reason="fedrec client error 100"), reply_to=request)
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({keys.NUM_EXAMPLES: 1, keys.EPSILON: 0.0})}),
        reply_to=request)


def test_user_level_clip_cannot_be_dodged_and_a_failure_does_not_void_the_round(
        task_identity: None) -> None:
    from server.strategy import FedRecStrategy

    cfg = RunConfig.from_flat({"dp": False, "user-dp": True, "user-target-epsilon": 0.0,
                               "user-noise-multiplier": 1e-9, "user-clip": 0.5,
                               "rounds": 2, "min-clients": 3})
    current = {"a.weight": np.zeros((6, 3), np.float32), "b.weight": np.zeros(4, np.float32)}
    strategy = FedRecStrategy(cfg, item_keys=["a.weight"], num_nodes=3)
    strategy.current = current
    request = _ask("train", current)
    attack = {"b.weight": np.full(4, 20.0, np.float32),  # keys in another order
              "a.weight": np.full((6, 3), 20.0, np.float32)}
    honest = {"a.weight": np.full((6, 3), 0.01, np.float32), "b.weight": np.zeros(4, np.float32)}
    replies = [_reply(request, attack), _reply(request, None, error=True),
               _reply(request, honest)]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = {k: v.numpy() for k, v in arrays.items()}
    change = np.sqrt(sum(float(np.sum((new[k] - current[k]) ** 2)) for k in current))
    # each update weighs at most clip / (clients sampled) = 0.5 / 3; two arrived
    assert 0 < change <= 2 * 0.5 / 3 + 1e-6
    assert strategy._row["clients"] == 2 and strategy._row["failures"] == 1
    assert strategy.user_history == [(pytest.approx(1e-9), 1.0, 1)]


def test_user_level_epsilon_is_exact_across_a_resume() -> None:
    """Killed after round 1 of 2, resumed with rounds=4: rounds 2-4 share what is left
    (a larger z), epsilon is composed from the recorded z of every round; once the
    budget is spent, further rounds leave the model unchanged."""
    from server.strategy import FedRecStrategy

    flat = {"dp": False, "user-dp": True, "user-target-epsilon": 2.0, "rounds": 2}
    current = {"w": np.zeros(3, np.float32)}
    first = FedRecStrategy(RunConfig.from_flat(flat), item_keys=[], num_nodes=2)
    first.current = current
    first._user_level_step(_clipped(current), 1)
    assert 0 < first.user_epsilon() < 2.0
    resumed = FedRecStrategy(RunConfig.from_flat({**flat, "rounds": 4}), item_keys=[],
                             num_nodes=2)
    resumed.resume_from(1, [], {}, first.user_history)
    for rnd in (2, 3, 4):
        resumed.current = current
        resumed._user_level_step(_clipped(current), rnd)
    zs = [z for z, _, _ in resumed.user_history]
    assert len(zs) >= 2 and min(zs[1:]) > 1.5 * zs[0]  # the later rounds: more noise each
    assert resumed.user_epsilon() == privacy.epsilon_of(resumed.user_history, 1e-5)
    assert resumed.user_epsilon() == pytest.approx(2.0, abs=0.01)
    assert resumed.user_epsilon() <= 2.0 + 1e-6
    more = FedRecStrategy(RunConfig.from_flat({**flat, "rounds": 6}), item_keys=[],
                          num_nodes=2)
    more.resume_from(4, [], {}, resumed.user_history)
    more.current = current
    out = more._user_level_step(_clipped(current), 5)
    assert more._row["user-exhausted"] == 1 and np.array_equal(out["w"], current["w"])
    assert more.user_history == resumed.user_history


def _clipped(current: dict[str, np.ndarray]) -> Any:
    from fedrec.aggregate import ClippedSum

    acc = ClippedSum(current, 0.5)
    acc.add({k: v + 1 for k, v in current.items()})
    return acc


# --- 5. negatives do not depend on the user's other ratings --------------------------

def test_dp_negatives_do_not_depend_on_other_ratings() -> None:
    """Unseen-item sampling never offers a user's rated items as negatives, so removing
    a rating changes the negatives of the user's other examples; under DP the support is
    the whole catalogue whatever the user rated."""
    cfg = RunConfig.from_flat({**FLAT, "negatives": 5})
    assert cfg.uniform_negatives and not RunConfig.from_flat({**FLAT, "dp": False}
                                                             ).uniform_negatives
    with pytest.raises(ConfigError, match="negative-sampling"):
        RunConfig.from_flat({**FLAT, "negative-sampling": "unseen"})
    data, _ = _client(cfg)
    train = data.train
    rated = set(zip(train.users.tolist(), train.items.tolist()))
    for uniform in (True, False):
        builder = ExampleBuilder(train, implicit=True, negatives=5, seed=0, uniform=uniform)
        hits = 0
        for _ in range(30):
            ex = builder.build()
            users = ex.users.numpy()
            for j in range(1, 6):
                hits += sum((u, i) in rated for u, i in zip(users, ex.items[:, j].tolist()))
        assert (hits > 0) == uniform


def test_a_received_model_with_nan_is_refused_and_nothing_is_kept(
        tmp_path: Path, task_identity: None) -> None:
    """A NaN would survive clipping and noise and mark exactly the rows trained on."""
    node = _node_files(tmp_path, "u")
    run = {**FLAT, "num-items": 20}
    shared = init_shared(RunConfig.from_flat(run), 20)
    poisoned = {k: np.full_like(v, np.nan) for k, v in shared.items()}
    reply = train_handler(_ask("train", poisoned), _context(run, node))
    assert reply.has_error() and reply.error.code == 104
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").glob("*.json"))
    assert not train_handler(_ask("train", shared), _context(run, node)).has_error()
    inf = {k: np.where(np.arange(v.size).reshape(v.shape) == 0, np.inf, v).astype(v.dtype)
           for k, v in shared.items()}
    assert train_handler(_ask("train", inf), _context(run, node)).error.code == 104


def test_a_crafted_model_cannot_turn_a_failure_into_a_membership_bit(
        tmp_path: Path, task_identity: None) -> None:
    """Huge finite weights (which overflow to inf - inf on chosen items only) are refused
    before any data is read; scores that are not finite anyway are made finite, so an
    evaluation always releases (noised) counts instead of failing on some items."""
    from fedrec.evaluate import _total

    node = _node_files(tmp_path, "u")
    run = {**FLAT, "num-items": 20}
    shared = init_shared(RunConfig.from_flat(run), 20)
    big = {k: np.where(np.arange(v.size).reshape(v.shape) == 0, 1e20, v).astype(v.dtype)
           for k, v in shared.items()}
    reply = train_handler(_ask("train", big), _context(run, node))
    assert reply.has_error() and reply.error.code == 104
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").glob("*.json"))
    edge = {k: np.clip(v, -1e4, 1e4) for k, v in big.items()}  # at the bound: accepted
    assert not train_handler(_ask("train", edge), _context(run, node)).has_error()
    cfg = RunConfig.from_flat(FLAT)
    data, ok = _client(cfg)
    crafted = {k: np.where(np.arange(v.size).reshape(v.shape) == 0, 1e20, v).astype(v.dtype)
               for k, v in ok.items()}
    from fedrec.errors import PrivacyError

    with pytest.raises(PrivacyError, match="beyond"):  # refused before the data is read
        fit_client(cfg, data, crafted, None, seed=0, server_round=1)
    scores = torch.tensor([[0.5, float("nan"), float("inf"), -float("inf")]])
    assert torch.isfinite(_total(scores)).all()
    assert _total(scores)[0, 0] == 0.5


def test_concurrent_messages_cannot_double_spend_a_ledger(tmp_path: Path,
                                                           task_identity: None) -> None:
    import threading

    node = _node_files(tmp_path, "u")
    run = {**FLAT, "num-items": 20, "rounds": 4}
    shared = init_shared(RunConfig.from_flat(run), 20)
    replies: list[Message] = []
    threads = [threading.Thread(target=lambda: replies.append(
        train_handler(_ask("train", shared), _context(run, node)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(r.has_error() for r in replies)
    ledger = load_ledger(ledger_path(tmp_path / "state", 0))
    assert ledger.rounds == 2  # both recorded: neither overwrote the other
    assert ledger.epsilon == pytest.approx(privacy.epsilon_of(ledger.history, 1e-5))
    assert max(float(r.content["metrics"][keys.EPSILON]) for r in replies) == \
        pytest.approx(ledger.epsilon)


def _explicit() -> tuple[RunConfig, ClientData]:
    cfg = RunConfig.from_flat({**FLAT, "feedback": "explicit", "objective": "mse",
                               "eval-noise-multiplier": 2.0, "target-epsilon": 8.0})
    return cfg, _client(cfg)[0]


def test_released_counts_carry_the_stated_noise_and_a_fixed_key_set() -> None:
    from fedrec.federated import release_counts
    from fedrec.state import Ledger

    cfg, data = _explicit()
    assert data.rating_span == 4.0  # synthetic ratings 1-5
    names = ["num-users", "sum-sq-err", "sum-abs-err"]
    draws = {k: [] for k in names}
    out = {}
    for r in range(300):
        out, _ = release_counts(cfg, data, {}, Ledger(), seed=0, server_round=r)
        for k in names:
            draws[k].append(out[k])
    m = len(out)  # every count key, whatever the client had
    assert m == 1 + 4 * 2 + 3 and "sum-recall-at-20" in out
    for k, scale in (("num-users", 1.0), ("sum-sq-err", 16.0), ("sum-abs-err", 4.0)):
        assert np.std(draws[k]) == pytest.approx(2.0 * math.sqrt(m) * scale, rel=0.15), k


def test_a_release_that_would_cross_the_cap_is_refused() -> None:
    from fedrec.errors import PrivacyError
    from fedrec.federated import release_counts
    from fedrec.state import Ledger

    cfg, data = _explicit()
    sigma = privacy.calibrate_remaining(7.99, 1e-5, [], 0.125, 32)
    near = Ledger(history=[(sigma, 0.125, 32)])
    with pytest.raises(PrivacyError, match="past the cap"):
        release_counts(cfg, data, {}, near, seed=0, server_round=1)


def test_user_level_clip_covers_every_key_and_the_denominator_is_the_sample() -> None:
    from fedrec.aggregate import ClippedSum

    current = {"a": np.zeros(3), "b": np.zeros(4)}
    acc = ClippedSum(current, 1.0)
    norm = acc.add({"a": np.full(3, 0.1), "b": np.full(4, 10.0)})  # the big part is "b"
    total = math.sqrt(sum(float(np.sum(v ** 2)) for v in acc.sums.values()))
    assert norm > 19 and total == pytest.approx(1.0)
    acc.add({"a": np.full(3, 0.1), "b": np.full(4, 10.0)})
    mean = acc.noisy_mean(0.0, 3, torch.Generator().manual_seed(0))  # 3 sampled, 2 came
    change = math.sqrt(sum(float(np.sum(v ** 2)) for v in mean.values()))
    assert change == pytest.approx(2.0 / 3)


def test_dp_clients_divide_by_the_configured_batch_and_draw_batches_from_os_entropy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fedrec.federated as federated

    cfg = RunConfig.from_flat({**FLAT, "local-epochs": 2})
    sizes: list[float] = []
    seen: list[tuple[int, Any]] = []
    original_set, original_train = privacy.set_expected_batch_size, federated.train_epochs
    monkeypatch.setattr(privacy, "set_expected_batch_size",
                        lambda opt, size: (sizes.append(size), original_set(opt, size)))

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["generator"].initial_seed(),
                     args[3].rng.bit_generator.state["state"]["state"]))
        return original_train(*args, **kwargs)

    monkeypatch.setattr(federated, "train_epochs", spy)
    for pid in (0, 1, 0):  # two clients of different sizes, then the first again
        data, shared = _client(cfg, pid)
        res = fit_client(cfg, data, shared, None, seed=0, server_round=1)
        steps = 2 * round(1 / cfg.privacy.sample_rate)  # local-epochs x round(1 / q)
        assert res.ledger.history[0][2] == steps
    assert sizes == [16, 16, 16]  # batch-size, never q * n
    assert len({s for s, _ in seen}) == 3 and len({n for _, n in seen}) == 3


def test_a_ddp_node_answers_only_secagg_rounds(tmp_path: Path, task_identity: None) -> None:
    """Under ddp=true a plain train or evaluate message, or a legacy fit that skipped the
    SecAgg+ stages, is refused (error 104): its reply would be unmasked."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    from client.client_app import ddp_train_handler, evaluate_handler

    run = {**FLAT, "dp": False, "ddp": True, "user-target-epsilon": 8.0, "num-clients": 2,
           "state-dir": str(tmp_path)}
    cfg = RunConfig.from_flat(run)
    shared = init_shared(cfg, load_split(cfg.data).n_items)
    node = {"partition-id": 0, "num-partitions": 2}
    for handler, kind in ((train_handler, "train"), (evaluate_handler, "evaluate")):
        reply = handler(_ask(kind, shared), _context(run, node))
        assert reply.has_error() and reply.error.code == 104, reply
    fit = FitIns(ndarrays_to_parameters(list(shared.values())), {"ddp-task": "train"})
    legacy = Message(fitins_to_recorddict(fit, keep_input=True), dst_node_id=2,
                     message_type="train")
    reply = ddp_train_handler(legacy, _context(run, node))
    assert reply.has_error() and reply.error.code == 104, reply


def test_a_reply_with_a_bad_item_mask_or_count_is_left_out(task_identity: None) -> None:
    """The server checks a reply's item mask (a 0/1 vector with one entry per item) and
    example count (finite, >= 0): a mask of another length or with weights other than
    0/1, or a negative or NaN count, would re-weight rows of the global model."""
    from server.strategy import FedRecStrategy

    cfg = RunConfig.from_flat({"dp": False})
    current = {"a.weight": np.zeros((5, 3), np.float32), "b.weight": np.zeros(4, np.float32)}
    strategy = FedRecStrategy(cfg, item_keys=["a.weight"], num_nodes=2)
    strategy.current = current
    request = _ask("train", current)

    def reply(mask: np.ndarray | None, count: float = 3.0) -> Message:
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v + 1) for k, v in current.items()}),
            "metrics": MetricRecord({keys.NUM_EXAMPLES: count})})
        if mask is not None:
            content["touched"] = ArrayRecord({"items": Array(mask)})
        return Message(content, reply_to=request)

    good = strategy._valid_update(reply(np.array([1, 0, 1, 0, 0], np.float32)))
    assert not isinstance(good, str) and good.weight == 3.0
    assert not isinstance(strategy._valid_update(reply(None)), str)
    for mask in (np.ones(3, np.float32), np.ones(7, np.float32), np.ones((5, 1), np.float32),
                 np.array([5, 0, 1, 0, 0], np.float32), np.array([1, -1, 1, 0, 0], np.float32)):
        why = strategy._valid_update(reply(mask))
        assert isinstance(why, str) and "item mask" in why, mask
    for count in (-1.0, math.nan, math.inf):
        why = strategy._valid_update(reply(None, count))
        assert isinstance(why, str) and "example count" in why, count
