"""Faulty clients in a real Flower simulation: bad updates, dropouts, robust rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.client_app import BAD_KINDS, corrupt, injected_fault
from fedrec.config import RunConfig
from tests.test_apps import _simulate

ROOT = Path(__file__).resolve().parents[1]
BASE = {"synthetic-users": 300, "synthetic-items": 300, "dim": 16, "batch-size": 256,
        "negatives": 4, "lr": 0.01, "dp": False, "seed": 3, "partition": "cross-silo",
        "num-clients": 10, "min-clients": 10, "rounds": 4, "local-epochs": 2,
        "verbose": False}


def _run(tmp: Path, name: str, **over: Any) -> tuple[dict, list[dict], dict]:
    flat = {**BASE, **over, "state-dir": str(tmp / name / "state"),
            "out-dir": str(tmp / name / "run")}
    metrics = _simulate(flat, nodes=10)
    rows = json.loads((tmp / name / "run" / "rounds.json").read_text())
    model = torch.load(tmp / name / "run" / "shared_model.pt")
    return metrics, rows, model


def test_fault_injection_is_deterministic_and_corrupts_as_named() -> None:
    cfg = RunConfig.from_flat({**BASE, "fault-rate": 0.5, "fault-kind": "mixed"})
    picks = [injected_fault(cfg, pid, 1) for pid in range(40)]
    assert picks == [injected_fault(cfg, pid, 1) for pid in range(40)]
    assert sum(p is not None for p in picks) == 20
    tenth = RunConfig.from_flat({**BASE, "fault-rate": 0.1, "fault-kind": "mixed"})
    kinds = {injected_fault(tenth, pid, r) for pid in range(10) for r in range(1, 15)}
    assert kinds - {None} == set(BAD_KINDS)
    arrays = {"a": np.ones((3, 2), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    assert np.isnan(corrupt(arrays, "nan")["a"]).any()
    assert corrupt(arrays, "shape")["a"].shape == (2, 2)
    assert "a" not in corrupt(arrays, "keys")
    assert corrupt(arrays, "dtype")["a"].dtype == np.float64
    assert np.abs(corrupt(arrays, "norm")["a"]).max() == 1e6
    assert set(BAD_KINDS) >= {"raise", "nan", "inf", "shape", "keys", "dtype", "norm"}


def test_bad_updates_are_dropped_and_quality_holds(tmp_path: Path) -> None:
    from fedrec.inprocess import run_inprocess  # Flower's rounds without faults (tested equal)

    _, clean_rows = run_inprocess(RunConfig.from_flat(
        {**BASE, "state-dir": str(tmp_path / "clean")}), engine="loop")
    clean = clean_rows[-1]
    faulty, rows, model = _run(tmp_path, "faulty", **{"fault-rate": 0.1,
                                                      "fault-kind": "mixed"})
    assert all(np.isfinite(v.numpy()).all() for v in model.values())
    dropped = sum(r["rejected"] + r["failures"] for r in rows)
    assert dropped == 4  # one client in ten each round
    assert all(r["clients"] + r["rejected"] + r["failures"] == 10 for r in rows)
    assert faulty["recall@20"] >= 0.98 * clean["recall@20"], (faulty, clean)


@pytest.mark.parametrize("user_dp", [False, True], ids=["fedavg", "user-dp"])
def test_training_completes_when_30_percent_of_clients_fail(tmp_path: Path,
                                                           user_dp: bool) -> None:
    over = {"fault-rate": 0.3, "fault-kind": "raise", "min-clients": 5}
    if user_dp:  # failed replies are dropped before clipping: the round is not void
        over.update({"user-dp": True, "user-target-epsilon": 8.0, "rounds": 3})
    metrics, rows, model = _run(tmp_path, "drop", **over)
    assert metrics["rounds"] == len(rows) and np.isfinite(metrics["recall@20"])
    assert all(r["failures"] >= 3 for r in rows)  # every third client raises
    assert all(r["eval-clients"] + r["eval-failures"] == 10 for r in rows)
    if user_dp:
        assert all(r["clients"] >= 5 and r["user-noise-multiplier"] > 0 for r in rows)
        assert metrics["user_epsilon"] == pytest.approx(8.0, rel=0.01)
        assert all(np.isfinite(v.numpy()).all() for v in model.values())


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_robust_rules_ignore_two_scaled_updates_in_ten(rule: str) -> None:
    from fedrec.aggregate import Update
    from server.strategy import FedRecStrategy

    cfg = RunConfig.from_flat({**BASE, "aggregation": rule, "trim-fraction": 0.2,
                               "krum-malicious": 2})
    strategy = FedRecStrategy(cfg, item_keys=["w"], num_nodes=10)
    rng = np.random.default_rng(0)
    strategy.current = {"w": np.zeros((50, 4), dtype=np.float32)}
    honest = [Update({"w": rng.normal(1.0, 0.1, (50, 4)).astype(np.float32)}, 1.0)
              for _ in range(8)]
    attackers = [Update({"w": np.full((50, 4), 1e6, dtype=np.float32)}, 1.0)
                 for _ in range(2)]
    out = strategy._robust(honest + attackers)["w"]
    assert np.abs(out - 1.0).max() < 0.5  # the plain mean would be ~2e5


def _proc_stat(pid: str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        stat = _proc_stat(entry.name) if entry.name.isdigit() else None
        if stat and stat[0] != "Z" and int(stat[1]) == pid:
            out.append(int(entry.name))
    return out


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        stat = _proc_stat(entry.name) if entry.name.isdigit() else None
        if stat and stat[0] != "Z" and int(stat[2]) == pgid:
            return True
    return False


def test_a_killed_simulation_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL ``fedrec simulate`` mid-run: the simulation stops with it (nothing goes on
    in the background), ``--resume`` continues, epsilon never resets."""
    from fedrec.errors import ConfigError, FedrecError
    from fedrec.state import ledger_path, load_checkpoint, load_ledger, load_state, state_path
    from simulations.simulation import simulate, work_dir

    out = tmp_path / "run"
    opts = {"synthetic-users": 30, "synthetic-items": 50, "dim": 4, "batch-size": 32,
            "negatives": 2, "partition": "cross-silo", "num-clients": 2,
            "target-epsilon": 4.0, "rounds": 8}
    argv = [sys.executable, "-m", "fedrec", "simulate", "--out", str(out)]
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    ckpt = work_dir(out) / "checkpoint" / "server.pt"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (ckpt.is_file() and load_checkpoint(ckpt)["round"] >= 2):
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()
                assert time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
                time.sleep(0.05)
            children = _children(proc.pid)  # the supervised simulation (own session)
            assert len(children) == 1, children
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 on fedrec itself: nothing to forward
            proc.wait(timeout=60)
        # the orphaned simulation notices and takes its group (server, Ray workers) with it
        deadline = time.monotonic() + 60
        while _group_alive(children[0]):
            assert time.monotonic() < deadline, "the simulation outlived a killed fedrec"
            time.sleep(0.05)
    saved = load_checkpoint(ckpt)
    done = saved["round"]
    assert 2 <= done < 8 and not out.exists()
    state_dir = work_dir(out) / "client-state"
    before = {p: (load_state(state_path(state_dir, p)), load_ledger(ledger_path(state_dir, p)))
              for p in (0, 1)}

    cfg = RunConfig.from_flat(opts)
    with pytest.raises(FedrecError, match="--resume"):  # a fresh run would lose the old one
        simulate(cfg, out, quiet=True)
    with pytest.raises(ConfigError, match="dim"):
        simulate(RunConfig.from_flat({**opts, "dim": 8}), out, quiet=True, resume=True)
    metrics = simulate(cfg, out, quiet=True, resume=True)

    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == list(range(1, 9)) and metrics["rounds"] == 8
    assert rows[:done] == json.loads(json.dumps(saved["rows"]))  # kept, not rerun
    assert np.isfinite(metrics["recall@20"]) and not work_dir(out).exists()
    assert load_checkpoint(out / "checkpoint" / "server.pt")["round"] == 8
    for p, (old, old_ledger) in before.items():
        new = load_state(state_path(out / "client-state", p))
        ledger = load_ledger(ledger_path(out / "client-state", p))
        # the ledger carries on: rounds the server lost are spent again, never reset, and
        # sigma is recalibrated so that the total stays within the target
        assert new.rounds == old.rounds + (8 - done), (old.rounds, new.rounds, done)
        assert sum(h[-1] for h in ledger.history) > sum(h[-1] for h in old_ledger.history)
        assert old_ledger.epsilon < ledger.epsilon <= 4.0 + 1e-6


def test_a_server_error_mid_run_stops_the_simulation_and_the_run_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the ServerApp ends the simulation (no hang) and loses nothing."""
    from server.strategy import FedRecStrategy
    from simulations.simulation import simulate, work_dir

    original = FedRecStrategy.aggregate_train

    def failing(self: FedRecStrategy, server_round: int, replies: Any) -> Any:
        if server_round == 2:
            raise RuntimeError("server failure in round 2")
        return original(self, server_round, replies)

    cfg = RunConfig.from_flat({"synthetic-users": 30, "synthetic-items": 50, "dim": 4,
                               "batch-size": 32, "negatives": 2, "partition": "cross-silo",
                               "num-clients": 2, "dp": False, "rounds": 3})
    out = tmp_path / "run"
    monkeypatch.setattr(FedRecStrategy, "aggregate_train", failing)
    with pytest.raises(RuntimeError, match="round 2"):
        simulate(cfg, out, quiet=True)
    assert not out.exists() and (work_dir(out) / "checkpoint" / "server.pt").is_file()
    monkeypatch.setattr(FedRecStrategy, "aggregate_train", original)
    metrics = simulate(cfg, out, quiet=True, resume=True)
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3] and np.isfinite(metrics["recall@20"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_a_simulation_cleanly(tmp_path: Path, sig: int) -> None:
    """``fedrec simulate`` stops within seconds, with one line on how to resume and no
    traceback; the checkpoint ``--resume`` needs survives."""
    from fedrec.state import load_checkpoint
    from simulations.simulation import work_dir

    out = tmp_path / "run"
    opts = ["--synthetic-users", "30", "--synthetic-items", "50", "--dim", "4",
            "--batch-size", "32", "--negatives", "2", "--partition", "cross-silo",
            "--num-clients", "2", "--no-dp", "--rounds", "6"]
    ckpt = work_dir(out) / "checkpoint" / "server.pt"
    proc = subprocess.Popen([sys.executable, "-m", "fedrec", "simulate", "--out", str(out),
                             *opts], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (ckpt.is_file() and load_checkpoint(ckpt)["round"] >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15 and proc.returncode == 130
    assert "Traceback" not in err and "--resume" in err, err
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))
    # what --resume needs is kept (resuming itself: the killed-run and server-error tests)
    saved = load_checkpoint(ckpt)
    assert 1 <= saved["round"] < 6 and len(saved["rows"]) == saved["round"]
