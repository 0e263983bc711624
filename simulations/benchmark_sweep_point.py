"""What one privacy-sweep point costs with the batched engine, and whether its record-level
DP results match one client after another through Opacus, side by side in one run.

    python simulations/benchmark_sweep_point.py --data-dir ../shared/datasets/ml-100k \\
        --out results/benchmark_sweep_point.json

Part 1: one ML-100K cross-device point (943 one-user clients, ``--rounds`` rounds, the
default recipes) per DP mode (none, record-level ε 8, user-level ε 8) through
``run_inprocess`` as ``fedrec privacy-sweep`` calls it: seconds and Recall@20.
Part 2: record-level DP ε 8 at ``--check-rounds`` rounds, ``--repeats`` runs of each
engine, interleaved (the batched engine draws the noise of rows a client never reads
once per round; the loop draws Opacus's stream): mean ± std of Recall@20 and seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from fedrec.config import RunConfig
from fedrec.inprocess import run_inprocess
from fedrec.report import write_json_atomic

MODES = {"none": {"dp": False}, "record": {"dp": True, "target-epsilon": 8.0},
         "user": {"dp": False, "user-dp": True, "user-target-epsilon": 8.0}}


def _point(base: dict[str, Any], mode: str, rounds: int, engine: str) -> tuple[float, float]:
    """(seconds, final Recall@20) of one in-process run."""
    t0 = time.perf_counter()
    _, rows = run_inprocess(RunConfig.from_flat({**base, **MODES[mode], "rounds": rounds}),
                            engine=engine)
    return time.perf_counter() - t0, float(rows[-1]["recall@20"])


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values),
            "runs": values}


def main() -> None:
    """Run both parts; print and write them."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="MovieLens 100K folder")
    ap.add_argument("--out", default="results/benchmark_sweep_point.json")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--check-rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = {"dataset": "ml-100k", "data-dir": args.data_dir, "partition": "cross-device"}
    result: dict[str, Any] = {"rounds": args.rounds, "points": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in MODES:
            seconds, recall = _point(base, mode, args.rounds, "auto")
            result["points"][mode] = {"seconds": seconds, "recall@20": recall}
            print(f"{mode:>6} point, {args.rounds} rounds: {seconds:6.1f}s  Recall@20 "
                  f"{recall:.4f}", flush=True)
        runs: dict[str, dict[str, list[float]]] = {
            e: {"seconds": [], "recall@20": []} for e in ("batched", "loop")}
        for _ in range(args.repeats):
            for engine in ("batched", "loop"):
                seconds, recall = _point(base, "record", args.check_rounds, engine)
                runs[engine]["seconds"].append(seconds)
                runs[engine]["recall@20"].append(recall)
                print(f"record {engine:>7}, {args.check_rounds} rounds: {seconds:6.1f}s  "
                      f"Recall@20 {recall:.4f}", flush=True)
    result["record_check"] = {"rounds": args.check_rounds, **{
        e: {k: _stats(v) for k, v in r.items()} for e, r in runs.items()}}
    for engine in ("batched", "loop"):
        r = result["record_check"][engine]
        print(f"record {engine:>7}: Recall@20 {r['recall@20']['mean']:.4f} ± "
              f"{r['recall@20']['std']:.4f}, {r['seconds']['mean']:.0f}s a run")
    write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
