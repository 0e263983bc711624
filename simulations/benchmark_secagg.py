"""Cost of secure aggregation: a distributed-DP round on SecAgg+ vs the same round without.

(a) ML-100K, 943 one-user clients, Flower simulation, side by side in one run:
    - ``ddp``: distributed user-level DP through SecAgg+ (four messages per client per
      round: key setup, key sharing, masked vector, unmasking);
    - ``central``: the same clients, local training, clip and noise level, but the
      server adds the noise (central user-level DP, Message API: train + evaluate).
    Both run ``--rounds`` rounds; the steady-state round (the last training round) and
    the peak memory summed over the driver and Ray's processes are reported, with the
    ratio ddp / central.
(b) ``--ml1m-shaped``: one distributed-DP round of 6,040 clients (synthetic data shaped
    like ML-1M: 3,706 items, ~1M ratings): time and peak summed memory.

    python simulations/benchmark_secagg.py --data-dir ../shared/datasets/ml-100k \\
        --out results/benchmark_secagg.json [--ml1m-shaped]

Run it alone (2 cores): it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_federated import TreeRss  # noqa: E402

from fedrec.config import RunConfig  # noqa: E402
from fedrec.report import write_json_atomic  # noqa: E402
from simulations.simulation import simulate  # noqa: E402

COMMON = {"partition": "cross-device", "optimizer": "sgd", "lr": 1.0, "server-opt": "adam",
          "server-lr": 0.05, "batch-size": 16, "dim": 32, "negatives": 4, "model": "mf",
          "init-std": 0.01, "dp": False, "user-target-epsilon": 8.0, "user-clip": 0.5}


def one(flat: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run ``fedrec simulate``; the last training round's seconds and the peak memory."""
    cfg = RunConfig.from_flat(flat)
    t0 = time.perf_counter()
    with TreeRss() as rss:
        metrics = simulate(cfg, workdir / name, quiet=True)
    rows = json.loads((workdir / name / "rounds.json").read_text())
    out = {"round_seconds": rows[-1]["seconds"], "first_round_seconds": rows[0]["seconds"],
           "wall_seconds": time.perf_counter() - t0, "summed_rss_peak_mb": rss.peak / 2**20,
           "recall@20": metrics.get("recall@20"), "user_epsilon": metrics.get("user_epsilon")}
    print(f"{name}: last round {out['round_seconds']:.1f} s, first {out['first_round_seconds']:.1f}"
          f" s, wall {out['wall_seconds']:.0f} s, peak summed RSS "
          f"{out['summed_rss_peak_mb']:.0f} MB", flush=True)
    return out


def main() -> None:
    """(a) and, with --ml1m-shaped, (b)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="MovieLens 100K folder")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ml1m-shaped", action="store_true", help="also run (b)")
    ap.add_argument("--only-ml1m-shaped", action="store_true", help="run (b) only")
    ap.add_argument("--out", default="results/benchmark_secagg.json")
    args = ap.parse_args()
    result: dict[str, Any] = {"config": COMMON, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        work = Path(tmp)
        if not args.only_ml1m_shaped:
            base = {**COMMON, "dataset": "ml-100k", "data-dir": args.data_dir,
                    "rounds": args.rounds}
            result["ddp"] = one({**base, "ddp": True}, work, "ddp")
            result["central"] = one({**base, "user-dp": True}, work, "central")
            result["ddp_over_central_round"] = (result["ddp"]["round_seconds"]
                                                / result["central"]["round_seconds"])
            print(f"(a) 943 clients: SecAgg+ round / round without SecAgg = "
                  f"{result['ddp_over_central_round']:.2f}", flush=True)
        if args.ml1m_shaped or args.only_ml1m_shaped:
            shaped = {**COMMON, "dataset": "synthetic", "synthetic-users": 6040,
                      "synthetic-items": 3706, "synthetic-activity": 166.0, "rounds": 1,
                      "ddp": True}
            result["ml1m_shaped_ddp"] = one(shaped, work, "ml1m-ddp")
        write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
