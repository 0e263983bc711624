"""Deployment on loopback: a real SuperLink and SuperNodes with TLS and node authentication.

Every process is started in its own session and stopped by PID (its process group) in a
``finally``, also when an assertion fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedrec import deploy
from fedrec.config import DataConfig
from fedrec.deploy import Processes, free_port, wait_port
from fedrec.state import ledger_path, load_checkpoint, load_ledger, load_state, state_path

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = ("rounds={rounds} dp=true target-epsilon={eps} partition='cross-silo' "
              "num-clients=0 min-clients=2 num-items={items} dim=4 batch-size=32 negatives=2 "
              "eval-noise-multiplier=2.0 out-dir='{out}' checkpoint-dir='{ckpt}'")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Processes, Path]]:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs = Processes(env, tmp_path)
    try:
        yield procs, tmp_path
    finally:
        procs.stop_all()


def _flwr_run(procs: Processes, tmp: Path, out: Path, rounds: int, items: int,
              extra: str = "", eps: float = 4.0) -> dict:
    cfg = RUN_CONFIG.format(rounds=rounds, items=items, out=out, ckpt=tmp / "ckpt",
                            eps=eps) + extra
    res = subprocess.run(["flwr", "run", str(ROOT), "fedrec-test", "--run-config", cfg],
                         env=procs.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    deadline = time.monotonic() + 240
    while not (out / "metrics.json").exists():
        assert time.monotonic() < deadline, procs.log("superlink")
        time.sleep(1)
    time.sleep(0.5)  # the rest of the results dir is written just before metrics.json
    return json.loads((out / "metrics.json").read_text())


def _strangers_are_refused(procs: Processes, tmp: Path, certs: Path, pub: Path,
                           public: str, run_on: Sequence[str] = ()) -> None:
    """What a stranger holding the public ca.crt tries at the SuperLink's public address:
    registering a node key, listing runs and nodes, submitting a run. All refused."""
    home = tmp / "stranger-flwr"
    deploy.write_federation(home, "there", public, certs / "ca.crt")
    env = {**procs.env, "FLWR_HOME": str(home)}
    for cmd in (["flwr", "supernode", "register", str(pub), "there"],
                ["flwr", "supernode", "list", "there"], ["flwr", "ls", "there"],
                ["flwr", "run", str(ROOT), "there", "--run-config", "rounds=1"]):
        res = subprocess.run([*run_on, *cmd], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode != 0, (cmd, res.stdout + res.stderr)
    # the raw HTTP calls behind them get 403 from the gateway, the Fleet calls pass
    probe = (
        "import httpx, sys\n"
        f"c = httpx.Client(verify={str(certs / 'ca.crt')!r}, timeout=30)\n"
        f"base = 'https://{public}'\n"
        "codes = [c.post(base + p, json={}).status_code for p in ('/v1/control/list-runs',"
        " '/v1/control/register-node', '/v1/runtime/acquire-task', '/v1/fleet/../control/"
        "list-runs')]\n"
        "codes += [c.get(base + '/health').status_code,"
        " c.post(base + '/v1/fleet/get-run', json={}).status_code]\n"
        "print(codes)\n")
    res = subprocess.run([*run_on, sys.executable, "-c", probe], env=procs.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    codes = json.loads(res.stdout.strip().splitlines()[-1])
    assert codes[:4] == [403, 403, 403, 403], codes
    # health answers; an unsigned Fleet call reaches the SuperLink and is refused by it
    assert codes[4] == 200 and codes[5] not in (403, 200), codes


def test_tls_authenticated_deployment_trains_refuses_strangers_and_keeps_state(
        cluster: tuple[Processes, Path]) -> None:
    procs, tmp = cluster
    certs = tmp / "certs"
    deploy.make_certificates(certs)
    # 2 is a stranger; 3 runs only apps signed by a key of its own (--trusted-entities)
    keys = [deploy.make_node_key(certs, f"supernode-{i}") for i in range(4)]
    data = deploy.split_data(DataConfig(synthetic_users=40, synthetic_items=60), 2, tmp / "data")
    catalogue, node_files = data[0], data[1:]
    # Flower 1.42 serves Fleet, Control and Runtime APIs on one HTTPS port: fedrec keeps it
    # on loopback and lets SuperNodes in through the Fleet gateway on another port
    port, gport = free_port(), free_port()
    deploy.write_federation(tmp / "flwr", "fedrec-test", f"127.0.0.1:{port}",
                            certs / "ca.crt")
    procs.start("superlink", [sys.executable, "-m", "fedrec", "deploy", "superlink",
                              "--dir", str(certs), "--host", "127.0.0.1", "--port", str(gport),
                              "--control-port", str(port), "--database", ":flwr-in-memory:"])
    wait_port(port)
    wait_port(gport)
    for _, pub in (keys[0], keys[1], keys[3]):
        reg = subprocess.run(["flwr", "supernode", "register", str(pub), "fedrec-test"],
                             env=procs.env, capture_output=True, text=True, timeout=60)
        assert reg.returncode == 0, reg.stdout + reg.stderr
    _strangers_are_refused(procs, tmp, certs, keys[2][1], f"127.0.0.1:{gport}")

    def node(i: int, **kw: object) -> list[str]:
        return deploy.supernode_command(
            certs, keys[i][0], f"127.0.0.1:{gport}", data_file=node_files[i % 2],
            catalogue=catalogue, state_dir=tmp / f"state-{i}", partition_id=i,
            port=free_port(), node={"allow-fault-injection": True}, **kw)  # the timeout test

    procs.start("node0", node(0))
    procs.start("node1", node(1))
    stranger = procs.start("node-stranger", node(2))
    try:
        code = stranger.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key was not refused")
    assert code != 0

    first = _flwr_run(procs, tmp, tmp / "run1", rounds=2, items=60)
    for key in ("recall@20", "ndcg@20", "precision@10", "epsilon"):
        assert math.isfinite(first[key]), (key, first)
    assert first["rounds"] == 2 and 0 < first["epsilon"] <= 4.05
    assert load_checkpoint(tmp / "ckpt" / "server.pt")["round"] == 2

    assert first["evaluation"] == "clients (noised)"  # DP counts leave only with noise
    # Restart node 0 between runs: its embeddings and epsilon must carry on (a larger
    # target: the first run spent its 4.0).
    before = load_state(state_path(tmp / "state-0", 0))
    spent = load_ledger(ledger_path(tmp / "state-0", 0))
    assert before is not None and before.rounds == 2 and spent.evaluations == 2
    procs.stop("node0")
    procs.start("node0", node(0))
    # A node that trusts only apps signed by its operator's Ed25519 key refuses the
    # unsigned app of a local 'flwr run' (Flower 1.42 signs only through Flower Hub)
    signer = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = tmp / "trusted-entities.yaml"
    trusted.write_text(f"fpk_fedrec_test: '{signer}'\n")
    procs.start("node-signed-only", node(3, trusted_entities=trusted))
    second = _flwr_run(procs, tmp, tmp / "run2", rounds=1, items=60, eps=6.0,
                       extra=" overwrite=true")
    assert "verif" in procs.log("node-signed-only").lower(), procs.log("node-signed-only")
    assert not (tmp / "state-3").exists() or not any((tmp / "state-3").iterdir())
    row = json.loads((tmp / "run2" / "rounds.json").read_text())[0]
    assert row["failures"] == 1 and row["clients"] == 2, row
    procs.stop("node-signed-only")
    after = load_state(state_path(tmp / "state-0", 0))
    ledger = load_ledger(ledger_path(tmp / "state-0", 0))
    assert after is not None and after.rounds == 3
    assert ledger.history[:len(spent.history) - 1] == spent.history[:-1]
    assert spent.epsilon < ledger.epsilon <= 6.0 + 1e-6
    assert second["epsilon"] >= ledger.epsilon - 1e-9
    assert not torch.equal(after.local["user_emb.weight"], before.local["user_emb.weight"])

    # A node that does not answer within round-timeout: the round goes on without it.
    # (fault-rate 0.5: node 1 sleeps past the deadline in round 1, train and evaluate)
    third = _flwr_run(procs, tmp, tmp / "run3", rounds=1, items=60, eps=8.0,
                      extra=" fault-rate=0.5 fault-kind='timeout' round-timeout=20.0 "
                            "overwrite=true")
    row = json.loads((tmp / "run3" / "rounds.json").read_text())[0]
    assert (row["clients"], row["timeouts"], row["failures"]) == (1, 1, 0), row
    assert (row["eval-clients"], row["eval-timeouts"]) == (1, 1), row
    assert math.isfinite(third["recall@20"]) and row["seconds"] < 120


def test_deploy_commands_name_missing_files_before_starting_flower(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedrec.cli import main

    assert main(["deploy", "superlink", "--dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'ca.crt'}" in capsys.readouterr().err
    deploy.make_certificates(tmp_path)
    assert main(["deploy", "supernode", "--dir", str(tmp_path), "--key", str(tmp_path / "k"),
                 "--data-file", "d.csv", "--catalogue-file", "c.csv",
                 "--state-dir", str(tmp_path / "s")]) == 2
    assert "k, d.csv, c.csv: not found" in capsys.readouterr().err
    assert main(["deploy", "gateway", "--dir", str(tmp_path), "--upstream", "8000"]) == 2
    assert "--upstream: expected HOST:PORT" in capsys.readouterr().err


def test_deploy_commands_print_the_next_step_with_num_items(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedrec.cli import main

    assert main(["deploy", "split-data", "--nodes", "2", "--out", str(tmp_path / "d"),
                 "--synthetic-users", "20", "--synthetic-items", "30"]) == 0
    assert "num-items=30" in capsys.readouterr().out
    assert main(["deploy", "certs", "--dir", str(tmp_path / "c"), "--nodes", "1"]) == 0
    assert "next, on the server: fedrec deploy superlink" in capsys.readouterr().out
    assert main(["deploy", "superlink", "--dir", str(tmp_path / "c"), "--print-only"]) == 0
    printed = capsys.readouterr().out
    assert "--host 127.0.0.1 --port 8000" in printed  # the SuperLink: loopback
    assert "deploy gateway" in printed and "--host 0.0.0.0 --port 9092" in printed


def test_gateway_refuses_other_paths_large_and_slow_bodies(tmp_path: Path) -> None:
    """The gateway's own answers, before anything is forwarded (ASGI, no network)."""
    import asyncio

    from fedrec import gateway

    deploy.make_certificates(tmp_path)
    app = gateway.FleetGateway("127.0.0.1:1", tmp_path / "ca.crt", max_body=1000)

    async def call(path: str, chunks: list[bytes], length: int | None = None,
                   method: str = "POST", delay: float = 0.0) -> int:
        events = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                  for i, c in enumerate(chunks)]
        sent: list[dict] = []

        async def receive() -> dict:
            await asyncio.sleep(delay)
            return events.pop(0)

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [] if length is None else [(b"content-length", str(length).encode())]
        await app({"type": "http", "method": method, "path": path, "headers": headers,
                   "client": ("203.0.113.9", 1)}, receive, send)
        return int(sent[0]["status"])

    for path in ("/v1/control/list-runs", "/v1/runtime/acquire-task", "/v1/fleet/",
                 "/v1/fleet/get-run/", "/v1/fleet/../control/list-runs", "/V1/fleet/get-run"):
        assert asyncio.run(call(path, [b"{}"], 2)) == 403, path
    assert asyncio.run(call("/v1/fleet/get-run", [b"{}"], 2, method="GET")) == 403
    assert asyncio.run(call("/v1/fleet/push-object", [b"x"], 5000)) == 413  # declared
    chunked = [b"x" * 400] * 4  # no content-length, 1600 bytes: stops reading at 1000
    assert asyncio.run(call("/v1/fleet/push-object", chunked)) == 413
    gateway.BODY_TIMEOUT, old = 0.2, gateway.BODY_TIMEOUT
    try:
        assert asyncio.run(call("/v1/fleet/push-object", [b"x"] * 3, delay=0.15)) == 408
    finally:
        gateway.BODY_TIMEOUT = old
    assert "x-forwarded-for" in gateway._DROP and "forwarded" in gateway._DROP
