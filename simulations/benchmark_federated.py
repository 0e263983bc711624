"""Federated benchmark on MovieLens 100K: quality vs rounds and round time, side by side.

(a) One client per user (943 clients), all clients every round, the core benchmark's
    split: Recall@20 / NDCG@20 per round for non-private federated MF and record-level
    DP at each target epsilon, against centralized MF trained in the same run.
(b) Wall time of one federated round (train + evaluate, DP on) against one centralized
    DP epoch on the same data, and the peak memory of the run.

    python simulations/benchmark_federated.py --data-dir ../shared/datasets/ml-100k \
        --rounds 10 --out results/benchmark_federated.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedrec.central import run_centralized
from fedrec.config import RunConfig
from fedrec.data import load_split
from fedrec.report import write_json_atomic
from server.simulation import simulate

# MF as in the core benchmark; per-client batch 16 (a client holds ~85 ratings).
MODEL = {"model": "mf", "dim": 32, "init-std": 0.01, "negatives": 4, "lr": 0.01,
         "batch-size": 16}


def _peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"driver_peak_rss_mb": own, "largest_child_peak_rss_mb": kids}


def run_federated(base: dict[str, Any], over: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One ``fedrec simulate`` run; returns final metrics and the per-round rows."""
    cfg = RunConfig.from_flat({**base, **MODEL, **over})
    out = workdir / f"run-{len(list(workdir.iterdir()))}"
    metrics = simulate(cfg, out, quiet=False)
    rows = json.loads((out / "rounds.json").read_text())
    return {"config": over, "final": metrics, "rounds": rows}


def central_reference(base: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Centralized MF with the same model, data and split, evaluated every epoch."""
    cfg = RunConfig.from_flat({**base, **MODEL, "batch-size": 256, "epochs": epochs,
                               "dp": False, "eval-every": 1})
    _, metrics, rows = run_centralized(cfg, load_split(cfg.data))
    best = max(rows, key=lambda r: r.get("recall@20", 0.0))
    return {"final": metrics, "best_epoch": best, "epochs": rows}


def central_dp_epoch_seconds(base: dict[str, Any]) -> float:
    """Wall time of one centralized DP-SGD epoch (same batch size as the clients)."""
    cfg = RunConfig.from_flat({**base, **MODEL, "epochs": 1, "dp": True, "eval-every": 0,
                               "target-epsilon": 8.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        run_centralized(cfg, load_split(cfg.data))
    return time.perf_counter() - t0


def main() -> None:
    """Run (a) and (b), print a table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/datasets/ml-100k")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--epsilons", default="1,4,8", help="target epsilons of the DP runs")
    ap.add_argument("--out", default="results/benchmark_federated.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = {"dataset": "ml-100k", "data-dir": args.data_dir, "split": "fraction",
            "test-fraction": 0.2, "seed": 0, "partition": "cross-device",
            "rounds": args.rounds, "local-epochs": args.local_epochs}
    workdir = Path(tempfile.mkdtemp(prefix="fedrec-bench-"))
    result: dict[str, Any] = {"rounds": args.rounds, "clients": "943 (one per user)"}
    try:
        central = central_reference(base, epochs=max(args.rounds, 20))
        result["centralized"] = central
        c_r20 = central["best_epoch"]["recall@20"]
        c_n20 = central["best_epoch"]["ndcg@20"]
        result["centralized_dp_epoch_seconds"] = central_dp_epoch_seconds(base)
        runs = {"non-private": run_federated(base, {"dp": False}, workdir)}
        for eps in (float(e) for e in args.epsilons.split(",") if e):
            runs[f"dp eps={eps:g}"] = run_federated(
                base, {"dp": True, "target-epsilon": eps}, workdir)
        result["federated"] = runs
        dp_runs = [r for name, r in runs.items() if name.startswith("dp")]
        if dp_runs:
            secs = [row["seconds"] for row in dp_runs[-1]["rounds"][1:]] or [
                dp_runs[-1]["rounds"][0]["seconds"]]
            result["dp_round_seconds"] = sum(secs) / len(secs)
            result["round_over_central_dp_epoch"] = (result["dp_round_seconds"]
                                                     / result["centralized_dp_epoch_seconds"])
        result.update(_peak_rss_mb())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [f"{'run':<18}{'Recall@20':>11}{'NDCG@20':>10}{'x central R':>13}"
             f"{'x central N':>13}{'epsilon':>9}{'s/round':>9}",
             f"{'centralized (best)':<18}{c_r20:>11.4f}{c_n20:>10.4f}{1:>13.3f}{1:>13.3f}"
             f"{'-':>9}{'-':>9}"]
    for name, r in result["federated"].items():
        f = r["final"]
        lines.append(f"{name:<18}{f['recall@20']:>11.4f}{f['ndcg@20']:>10.4f}"
                     f"{f['recall@20'] / c_r20:>13.3f}{f['ndcg@20'] / c_n20:>13.3f}"
                     f"{f['epsilon']:>9.2f}{f['seconds_per_round']:>9.1f}")
    lines.append("")
    if "dp_round_seconds" in result:
        lines.append(f"DP round (train+evaluate, 943 clients): {result['dp_round_seconds']:.1f} s;"
                     f" centralized DP epoch: {result['centralized_dp_epoch_seconds']:.1f} s;"
                     f" ratio {result['round_over_central_dp_epoch']:.1f}")
    lines.append(f"peak RSS: driver {result['driver_peak_rss_mb']:.0f} MB, largest child "
                 f"{result['largest_child_peak_rss_mb']:.0f} MB")
    print("\n".join(lines))
    result["table"] = lines
    write_json_atomic(Path(args.out), result)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
