"""Per-round latency of a real deployment on loopback: SuperLink + N SuperNodes, TLS + auth.

For each node count, starts the processes (as tests/test_deploy.py does), runs
``flwr run`` for a few rounds on small synthetic data, and reads each round's wall time
from the ServerApp's rounds.json. Round 1 includes the first ClientApp start-up and is
reported separately. Everything started is stopped by PID at the end.

    python simulations/benchmark_deploy.py --nodes 2,4 --rounds 4 \
        --out results/benchmark_deploy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fedrec import deploy
from fedrec.config import DataConfig
from fedrec.report import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def measure(n_nodes: int, rounds: int, dp: bool, work: Path) -> dict[str, Any]:
    """Round times of one ``flwr run`` with ``n_nodes`` SuperNodes."""
    env = {**os.environ, "FLWR_HOME": str(work / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs = deploy.Processes(env, work)
    try:
        certs = work / "certs"
        deploy.make_certificates(certs)
        keys = [deploy.make_node_key(certs, f"supernode-{i}") for i in range(n_nodes)]
        files = deploy.split_data(DataConfig(synthetic_users=100 * n_nodes, synthetic_items=500),
                                  n_nodes, work / "data")
        port = deploy.free_port()
        deploy.write_federation(work / "flwr", "bench", f"127.0.0.1:{port}", certs / "ca.crt")
        procs.start("superlink", deploy.superlink_command(certs, host="127.0.0.1", port=port))
        deploy.wait_port(port)
        for _, pub in keys:
            subprocess.run(["flwr", "supernode", "register", str(pub), "bench"], env=env,
                           check=True, capture_output=True, timeout=60)
        for i in range(n_nodes):
            procs.start(f"node{i}", deploy.supernode_command(
                certs, keys[i][0], f"127.0.0.1:{port}", data_file=files[i + 1],
                catalogue=files[0], state_dir=work / f"state-{i}", partition_id=i,
                port=deploy.free_port()))
        out = work / "run"
        cfg = (f"rounds={rounds} dp={'true' if dp else 'false'} partition='cross-silo' "
               f"num-clients=0 min-clients={n_nodes} num-items=500 out-dir='{out}' "
               f"checkpoint-dir='{work / 'ckpt'}'")
        t0 = time.perf_counter()
        subprocess.run(["flwr", "run", str(ROOT), "bench", "--run-config", cfg], env=env,
                       check=True, capture_output=True, timeout=120)
        while not (out / "metrics.json").exists():
            if time.perf_counter() - t0 > 600:
                raise TimeoutError(procs.log("superlink"))
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        rows = json.loads((out / "rounds.json").read_text())
    finally:
        procs.stop_all()
    secs = [r["seconds"] for r in rows]
    return {"nodes": n_nodes, "dp": dp, "rounds": len(rows), "round_seconds": secs,
            "first_round_seconds": secs[0],
            "median_later_round_seconds": statistics.median(secs[1:]) if len(secs) > 1
            else secs[0], "wall_seconds": wall, "recall@20": rows[-1].get("recall@20")}


def main() -> None:
    """Measure each node count; print a table; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,4")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-dp", action="store_true")
    ap.add_argument("--out", default="results/benchmark_deploy.json")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix="fedrec-deploy-") as tmp:
            res = measure(n, args.rounds, not args.no_dp, Path(tmp))
        results.append(res)
        print(f"{n} nodes: round 1 {res['first_round_seconds']:.1f} s, later rounds "
              f"(median) {res['median_later_round_seconds']:.1f} s, all: "
              + ", ".join(f"{s:.1f}" for s in res["round_seconds"]), flush=True)
    write_json_atomic(Path(args.out), {"results": results})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
