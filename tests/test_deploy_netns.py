"""Deployment across real hosts: the SuperLink and each SuperNode in a network namespace.

The test creates three Linux network namespaces joined by veth pairs (server 10.77.i.1,
node i 10.77.i.2), issues the server certificate for the veth addresses, and follows
docs/DEPLOY.md with its default ports: ``fedrec deploy superlink`` in the server
namespace (SuperLink on its loopback, Fleet gateway on 0.0.0.0:9092), ``fedrec deploy
supernode --superlink 10.77.i.1:9092`` in node i's, ``flwr`` on the server. A stranger in
a node's namespace cannot reach the SuperLink's own port, nor use the Control API through
the gateway. Everything is stopped by PID and the namespaces removed in ``finally``.
Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrec import deploy
from fedrec.config import DataConfig
from fedrec.deploy import Processes
from tests.test_deploy import ROOT, _strangers_are_refused


def _unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"fr-probe-{uuid.uuid4().hex[:6]}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"'ip netns add' failed: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert res.returncode == 0, (args, res.stderr)


@pytest.fixture
def hosts() -> Iterator[tuple[str, list[str]]]:
    """A server namespace and two node namespaces, linked by veth pairs."""
    why = _unavailable()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:5]
    server, nodes = f"fr-srv-{tag}", [f"fr-n{i}-{tag}" for i in range(2)]
    made: list[str] = []
    try:
        for ns in (server, *nodes):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(nodes):
            a, b = f"frs{i}{tag}", f"frn{i}{tag}"  # <= 15 characters
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", server)
            _ip("link", "set", b, "netns", ns)
            _ip("-n", server, "addr", "add", f"10.77.{i}.1/30", "dev", a)
            _ip("-n", ns, "addr", "add", f"10.77.{i}.2/30", "dev", b)
            _ip("-n", server, "link", "set", a, "up")
            _ip("-n", ns, "link", "set", b, "up")
        yield server, nodes
    finally:
        for ns in made:  # removes the veth pairs with them
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def test_deployment_across_network_namespaces_as_docs_deploy_says(
        hosts: tuple[str, list[str]], tmp_path: Path) -> None:
    server, nodes = hosts
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(ROOT)}
    procs = Processes(env, tmp_path)
    fedrec = [sys.executable, "-m", "fedrec"]
    certs, data = tmp_path / "certs", tmp_path / "data"

    def run(cmd: list[str], ns: str | None = None, ok: bool = True) -> str:
        res = subprocess.run([*(_in(ns) if ns else []), *cmd], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
        assert (res.returncode == 0) == ok, (cmd, res.stdout + res.stderr)
        return res.stdout

    try:
        # DEPLOY.md 1: certificates for the addresses the nodes use, node keys (+ a stranger)
        run([*fedrec, "deploy", "certs", "--dir", str(certs), "--nodes", "3",
             "--host", "10.77.0.1", "--host", "10.77.1.1"])
        deploy.split_data(DataConfig(synthetic_users=40, synthetic_items=60), 2, data)
        # DEPLOY.md 2: the SuperLink (loopback) and its Fleet gateway, default ports
        procs.start("superlink", [*_in(server), *fedrec, "deploy", "superlink", "--dir",
                                  str(certs), "--database", str(tmp_path / "superlink.db")])
        _wait(server, "127.0.0.1", 8000, procs)
        _wait(server, "10.77.0.1", 9092, procs)
        run([*fedrec, "deploy", "federation", "--name", "fedrec", "--address",
             "127.0.0.1:8000", "--dir", str(certs)])
        for i in range(2):
            run(["flwr", "supernode", "register", str(certs / f"supernode-{i}.pub"), "fedrec"],
                ns=server)
        # the SuperLink's own port is not reachable from a node's host at all
        reach = ("import socket; s = socket.socket(); s.settimeout(5); "
                 "print(s.connect_ex(('10.77.0.1', 8000)))")
        assert run([sys.executable, "-c", reach], ns=nodes[0]).strip() != "0"
        _strangers_are_refused(procs, tmp_path, certs, certs / "supernode-2.pub",
                               "10.77.0.1:9092", run_on=_in(nodes[0]))
        # DEPLOY.md 3: a SuperNode per host, through the gateway
        for i, ns in enumerate(nodes):
            procs.start(f"node{i}", [
                *_in(ns), *fedrec, "deploy", "supernode", "--dir", str(certs), "--key",
                str(certs / f"supernode-{i}"), "--superlink", f"10.77.{i}.1:9092",
                "--data-file", str(data / f"node-{i}.csv"), "--catalogue-file",
                str(data / "catalogue.csv"), "--state-dir", str(tmp_path / f"state-{i}"),
                "--partition", str(i)])
        # DEPLOY.md 4: training, submitted on the server
        out = tmp_path / "run1"
        cfg = (f"rounds=1 num-items=60 partition='cross-silo' num-clients=0 min-clients=2 "
               f"target-epsilon=8 dim=4 batch-size=32 negatives=2 eval-noise-multiplier=2.0 "
               f"out-dir='{out}' checkpoint-dir='{tmp_path / 'ckpt'}'")
        run(["flwr", "run", str(ROOT), "fedrec", "--run-config", cfg], ns=server)
        deadline = time.monotonic() + 300
        while not (out / "metrics.json").exists():
            assert time.monotonic() < deadline, procs.log("superlink") + procs.log("node0")
            time.sleep(1)
        time.sleep(0.5)
        metrics = json.loads((out / "metrics.json").read_text())
        row = json.loads((out / "rounds.json").read_text())[0]
        assert row["clients"] == 2 and row["failures"] == 0, row
        assert math.isfinite(metrics["recall@20"]) and 0 < metrics["epsilon"] <= 8.0 + 1e-6
        for i in range(2):
            assert (tmp_path / f"state-{i}" / f"ledger-{i}.json").is_file()
        # a SuperLink restart keeps the registered nodes (its database file)
        procs.stop("superlink")
        procs.start("superlink", [*_in(server), *fedrec, "deploy", "superlink", "--dir",
                                  str(certs), "--database", str(tmp_path / "superlink.db")])
        _wait(server, "127.0.0.1", 8000, procs)
        listed = run(["flwr", "supernode", "list", "fedrec", "--format", "json"], ns=server)
        assert len(json.loads(listed[listed.index("{"):])["nodes"]) == 2, listed
    finally:
        procs.stop_all()


def _wait(ns: str, host: str, port: int, procs: Processes, timeout: float = 120) -> None:
    """Until ``host:port`` accepts connections inside namespace ``ns``."""
    probe = (f"import socket; s = socket.socket(); s.settimeout(2); "
             f"raise SystemExit(s.connect_ex(({host!r}, {port})))")
    deadline = time.monotonic() + timeout
    while subprocess.run([*_in(ns), sys.executable, "-c", probe]).returncode != 0:
        assert time.monotonic() < deadline, procs.log("superlink")
        time.sleep(0.5)
