"""Per-round latency of a real deployment against Flower's floor, on one machine.

For each node count, one deployment as docs/DEPLOY.md sets it up (``fedrec deploy
superlink``: SuperLink on loopback behind the Fleet gateway, TLS, node authentication;
one ``flower-supernode`` per node through the gateway) runs, one after the other:

- **floor**: ``simulations/floor_app``, a ServerApp/ClientApp pair that sends one empty
  message per node per round and pulls replies every 0.1 s (Flower alone);
- **fedrec**: fedrec's app with its defaults for deployment (DP, one message per node per
  round: ``eval-with-train``), on small synthetic data;
- **fedrec, 2 messages**: the same with ``eval-with-train=false`` (train, then evaluate).

Round times come from each ServerApp (fedrec: ``rounds.json``). Steady-state rounds are
2..R-1 (round 1 pays first start-ups; fedrec's last round also sends evaluate messages).
``round_over_floor`` = fedrec's steady median / the floor's, per node count. The
SuperNodes are restarted with fresh state between fedrec variants (a spent budget would
skip training). Everything started is stopped by PID at the end.

    python simulations/benchmark_deploy.py --nodes 2,4 --rounds 5 \
        --out results/benchmark_deploy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedrec import deploy
from fedrec.config import DataConfig
from fedrec.report import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
FLOOR_APP = ROOT / "simulations" / "floor_app"


def _wait_file(path: Path, procs: deploy.Processes, limit: float = 900) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        if time.perf_counter() - t0 > limit:
            raise TimeoutError(procs.log("superlink"))
        time.sleep(0.5)
    time.sleep(0.5)  # written last; give the rest a moment


def _steady(secs: list[float]) -> float:
    return statistics.median(secs[1:-1] if len(secs) > 2 else secs)


def measure(n_nodes: int, rounds: int, work: Path) -> dict[str, Any]:
    """Floor and fedrec round times with ``n_nodes`` SuperNodes on one deployment."""
    env = {**os.environ, "FLWR_HOME": str(work / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs = deploy.Processes(env, work)
    out: dict[str, Any] = {"nodes": n_nodes, "rounds": rounds}
    try:
        certs = work / "certs"
        deploy.make_certificates(certs)
        keys = [deploy.make_node_key(certs, f"supernode-{i}") for i in range(n_nodes)]
        files = deploy.split_data(DataConfig(synthetic_users=100 * n_nodes, synthetic_items=500),
                                  n_nodes, work / "data")
        port, gport = deploy.free_port(), deploy.free_port()
        deploy.write_federation(work / "flwr", "bench", f"127.0.0.1:{port}", certs / "ca.crt")
        procs.start("superlink", [sys.executable, "-m", "fedrec", "deploy", "superlink",
                                  "--dir", str(certs), "--host", "127.0.0.1", "--port",
                                  str(gport), "--control-port", str(port), "--database",
                                  ":flwr-in-memory:"])
        deploy.wait_port(port, timeout=120)
        deploy.wait_port(gport, timeout=120)
        for _, pub in keys:
            subprocess.run(["flwr", "supernode", "register", str(pub), "bench"], env=env,
                           check=True, capture_output=True, timeout=60)

        def start_nodes(tag: str) -> None:
            for i in range(n_nodes):
                if f"node{i}" in procs.procs:
                    procs.stop(f"node{i}")
                procs.start(f"node{i}", deploy.supernode_command(
                    certs, keys[i][0], f"127.0.0.1:{gport}", data_file=files[i + 1],
                    catalogue=files[0], state_dir=work / f"state-{tag}-{i}", partition_id=i,
                    port=deploy.free_port()))

        def flwr_run(app: Path, cfg: str) -> None:
            subprocess.run(["flwr", "run", str(app), "bench", "--run-config", cfg], env=env,
                           check=True, capture_output=True, timeout=120)

        start_nodes("floor")
        floor_file = work / "floor.json"
        flwr_run(FLOOR_APP, f"rounds={rounds} nodes={n_nodes} out-file='{floor_file}'")
        _wait_file(floor_file, procs)
        floor = json.loads(floor_file.read_text())["round_seconds"]
        out["floor"] = {"round_seconds": floor, "steady_median": _steady(floor)}
        for name, fused in (("fedrec", True), ("fedrec_two_messages", False)):
            start_nodes(name)
            run = work / f"run-{name}"
            flwr_run(ROOT, f"rounds={rounds} dp=true partition='cross-silo' num-clients=0 "
                           f"min-clients={n_nodes} num-items=500 out-dir='{run}' "
                           f"checkpoint-dir='{work / ('ckpt-' + name)}' "
                           f"eval-noise-multiplier=2.0 "
                           f"eval-with-train={'true' if fused else 'false'}")
            _wait_file(run / "metrics.json", procs)
            rows = json.loads((run / "rounds.json").read_text())
            secs = [r["seconds"] for r in rows]
            out[name] = {"round_seconds": secs, "steady_median": _steady(secs),
                         "messages": [r.get("messages") for r in rows],
                         "recall@20": rows[-1].get("recall@20")}
    finally:
        procs.stop_all()
    floor_s = out["floor"]["steady_median"]
    out["round_over_floor"] = out["fedrec"]["steady_median"] / floor_s
    out["two_messages_over_floor"] = out["fedrec_two_messages"]["steady_median"] / floor_s
    out["total_over_floor"] = sum(out["fedrec"]["round_seconds"]) / sum(
        out["floor"]["round_seconds"])
    return out


def main() -> None:
    """Measure each node count; print a table; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="results/benchmark_deploy.json")
    args = ap.parse_args()
    results = []
    print("nodes  floor s  fedrec s  (x floor)  2 messages s  (x floor)   [steady median]")
    for n in (int(x) for x in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix="fedrec-deploy-") as tmp:
            res = measure(n, args.rounds, Path(tmp))
        results.append(res)
        print(f"{n:>5}  {res['floor']['steady_median']:7.2f}  "
              f"{res['fedrec']['steady_median']:8.2f}  ({res['round_over_floor']:5.2f})  "
              f"{res['fedrec_two_messages']['steady_median']:12.2f}  "
              f"({res['two_messages_over_floor']:5.2f})", flush=True)
    write_json_atomic(Path(args.out), {
        "results": results,
        "round_over_floor": {str(r["nodes"]): r["round_over_floor"] for r in results}})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
