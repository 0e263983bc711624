"""What uniform negatives cost: unseen-item vs catalogue-uniform negative sampling, side by side.

Under record-level DP fedrec draws negatives uniformly from the whole catalogue: drawing
them among the items a user did not rate makes each example depend on the user's other
ratings. This benchmark trains the same centralized MF on one split with both samplers
(non-private, where both are allowed) and reports the ratio, then the DP run (uniform
only) for reference. Seeds are paired: each seed runs both samplers.

    python simulations/benchmark_negatives.py --data-dir ../shared/datasets/ml-100k \
        --out results/benchmark_negatives.json
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.central import run_centralized
from fedrec.config import RunConfig
from fedrec.data import load_split
from fedrec.report import write_json_atomic

BASE = {"dataset": "ml-100k", "model": "mf", "dim": 32, "epochs": 20, "lr": 0.002,
        "negatives": 4, "eval-every": 0}
DP = {"dp": True, "target-epsilon": 8.0, "batch-size": 8192, "lr": 0.01}


def _run(flat: dict[str, Any]) -> dict[str, float]:
    cfg = RunConfig.from_flat(flat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, metrics, _ = run_centralized(cfg, load_split(cfg.data))
    return metrics


def main() -> None:
    """Run the paired comparison and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="MovieLens 100K folder")
    ap.add_argument("--seeds", default="0,1,2", help="paired seeds")
    ap.add_argument("--out", default="results/benchmark_negatives.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for name, over in (("non-private, unseen", {"dp": False,
                                                    "negative-sampling": "unseen"}),
                           ("non-private, uniform", {"dp": False,
                                                     "negative-sampling": "uniform"}),
                           ("DP eps=8, uniform", DP)):
            t0 = time.perf_counter()
            m = _run({**BASE, "data-dir": args.data_dir, "seed": seed, **over})
            rows.append({"setting": name, "seed": seed, "recall@20": m["recall@20"],
                         "ndcg@20": m["ndcg@20"], "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {name:<22} R@20 {m['recall@20']:.4f} "
                  f"NDCG@20 {m['ndcg@20']:.4f}", flush=True)
    summary: dict[str, Any] = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        for metric in ("recall@20", "ndcg@20"):
            vals = np.array([r[metric] for r in rows if r["setting"] == name])
            summary[f"{name}: {metric}"] = [float(vals.mean()), float(vals.std(ddof=1))
                                            if len(vals) > 1 else 0.0]
    for metric in ("recall@20", "ndcg@20"):
        pairs = [(a[metric], b[metric]) for a, b in zip(rows[0::3], rows[1::3])]
        summary[f"uniform_over_unseen {metric}"] = float(np.mean([b / a for a, b in pairs]))
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    write_json_atomic(Path(args.out), {"config": {**BASE, "dp": DP}, "rows": rows,
                                        "summary": summary})


if __name__ == "__main__":
    main()
