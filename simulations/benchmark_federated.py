"""Federated benchmark on MovieLens 100K: quality vs rounds and round time, side by side.

(a) One client per user (943 clients), all clients every round, the core benchmark's
    split: Recall@20 / NDCG@20 per round for non-private federated MF and record-level
    DP at each target epsilon, against centralized MF trained in the same run. Rounds
    run through ``fedrec.inprocess`` (the apps' own client and aggregation code without
    Flower's messaging; tests/test_apps.py checks it equals a Flower simulation), so the
    curves take minutes, not hours.
(b) Wall time of one federated round through Flower's simulation engine (train +
    evaluate, DP on, one local epoch) against one centralized DP epoch on the same data
    and batch size, and the peak memory of the run.
(c) Optional (``--ml1m-shaped``): the same Flower round on synthetic data shaped like
    ML-1M (6,040 users, 3,706 items, ~1M interactions).

    python simulations/benchmark_federated.py --data-dir ../shared/datasets/ml-100k \
        --out results/benchmark_federated.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedrec.central import run_centralized
from fedrec.config import RunConfig
from fedrec.data import load_split
from fedrec.inprocess import run_inprocess
from fedrec.report import write_json_atomic
from simulations.simulation import simulate

# MF as in the core benchmark. Clients: plain SGD (Adam's per-round restart moves every
# touched coordinate by ~lr whatever its gradient), batch 16 (a client holds ~85
# ratings); server: FedAdam on the averaged update.
MODEL = {"model": "mf", "dim": 32, "init-std": 0.01, "negatives": 4, "batch-size": 16,
         "optimizer": "sgd", "lr": 1.0, "server-opt": "adam", "server-lr": 0.05}


def _peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"driver_peak_rss_mb": own, "largest_child_peak_rss_mb": kids}


class TreeRss:
    """Peak of the summed RSS of this process and every Ray process, sampled every 2 s.

    Ray's workers are not this process's children, so ``getrusage`` misses them. Shared
    pages are counted once per process: an upper bound. Linux (/proc) only.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> int:
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if int(pid) != os.getpid() and b"ray" not in cmd:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_curve(base: dict[str, Any], over: dict[str, Any], name: str) -> dict[str, Any]:
    """Federated rounds in process; prints one line per round."""
    cfg = RunConfig.from_flat({**base, **MODEL, **over})

    def show(row: dict[str, Any]) -> None:
        print(f"{name:<12} round {row['round']:>2}  R@20 {row['recall@20']:.4f}  "
              f"NDCG@20 {row['ndcg@20']:.4f}  eps {row['epsilon-max']:.2f}  "
              f"({row['seconds']:.0f}s)", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rows = run_inprocess(cfg, show)
    return {"config": over, "final": rows[-1], "best": max(rows, key=lambda r: r["recall@20"]),
            "rounds": rows}


def central_reference(base: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Centralized MF with the same model, data and split (Adam, batch 256), every epoch."""
    cfg = RunConfig.from_flat({**base, **MODEL, "optimizer": "adam", "lr": 0.01,
                               "batch-size": 256, "epochs": epochs, "dp": False,
                               "eval-every": 1})
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


def flower_round_seconds(base: dict[str, Any], workdir: Path, name: str,
                         rounds: int = 2) -> dict[str, Any]:
    """DP rounds through ``fedrec simulate``; the last is the steady-state round."""
    cfg = RunConfig.from_flat({**base, **MODEL, "rounds": rounds, "local-epochs": 1,
                               "dp": True, "target-epsilon": 8.0})
    out = workdir / name
    t0 = time.perf_counter()
    metrics = simulate(cfg, out, quiet=False)
    rows = json.loads((out / "rounds.json").read_text())
    return {"round_seconds": rows[-1]["seconds"], "first_round_seconds": rows[0]["seconds"],
            "wall_seconds": time.perf_counter() - t0, "recall@20": metrics["recall@20"]}


def ml1m_shaped(base: dict[str, Any], workdir: Path, lines: list[str],
                rounds: int = 1) -> dict[str, Any]:
    """(c): Flower DP rounds on ML-1M-shaped synthetic data vs a centralized DP epoch."""
    shaped = {**base, "dataset": "synthetic", "synthetic-users": 6040,
              "synthetic-items": 3706, "synthetic-activity": 166.0}
    central = central_dp_epoch_seconds(shaped)
    print(f"(c) centralized DP epoch on ML-1M-shaped data: {central:.1f} s", flush=True)
    with TreeRss() as rss:
        big = flower_round_seconds(shaped, workdir, "ml1m-shaped", rounds)
    big.update(_peak_rss_mb(), centralized_dp_epoch_seconds=central, rounds=rounds,
               summed_rss_peak_mb=rss.peak / 2**20)
    big["round_over_central_dp_epoch"] = big["round_seconds"] / central
    lines.append(f"(c) ML-1M-shaped synthetic (6,040 clients, 3,706 items, ~1M ratings) "
                 f"Flower DP round {rounds}: {big['round_seconds']:.1f} s (round 1, with "
                 f"start-up: {big['first_round_seconds']:.1f} s); centralized DP epoch "
                 f"{central:.1f} s; ratio {big['round_over_central_dp_epoch']:.2f}; peak RSS "
                 f"driver {big['driver_peak_rss_mb']:.0f} MB; summed over the driver and "
                 f"Ray's processes {big['summed_rss_peak_mb']:.0f} MB")
    return {"ml1m_shaped_dp_round": big}


def main() -> None:
    """Run (a), (b) and optionally (c); print a table; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/datasets/ml-100k")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--local-epochs", type=int, default=3, help="non-private runs")
    ap.add_argument("--dp-local-epochs", type=int, default=1, help="DP runs")
    ap.add_argument("--epsilons", default="1,4,8", help="target epsilons of the DP runs")
    ap.add_argument("--skip-curves", action="store_true", help="only (b) and (c)")
    ap.add_argument("--ml1m-shaped", action="store_true", help="also run (c)")
    ap.add_argument("--only-ml1m-shaped", action="store_true",
                    help="run only (c), with a centralized DP epoch on the same data, so "
                         "the peak memory reported is (c)'s own")
    ap.add_argument("--ml1m-rounds", type=int, default=1,
                    help="Flower rounds in (c); the last one is reported")
    ap.add_argument("--out", default="results/benchmark_federated.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = {"dataset": "ml-100k", "data-dir": args.data_dir, "split": "fraction",
            "test-fraction": 0.2, "seed": 0, "partition": "cross-device",
            "rounds": args.rounds}
    workdir = Path(tempfile.mkdtemp(prefix="fedrec-bench-"))
    result: dict[str, Any] = {"rounds": args.rounds, "clients": "943 (one per user)",
                              "model": MODEL}
    lines: list[str] = []
    try:
        if args.only_ml1m_shaped:
            result.update(ml1m_shaped(base, workdir, lines, args.ml1m_rounds))
        else:
            main_runs(args, base, workdir, result, lines)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))
    result["table"] = lines
    write_json_atomic(Path(args.out), result)
    print(f"written: {args.out}")


def main_runs(args: argparse.Namespace, base: dict[str, Any], workdir: Path,
              result: dict[str, Any], lines: list[str]) -> None:
    """(a), (b) and, with ``--ml1m-shaped``, (c); appends table lines."""
    central = central_reference(base, epochs=20)
    result["centralized"] = central
    c_r20 = central["best_epoch"]["recall@20"]
    c_n20 = central["best_epoch"]["ndcg@20"]
    if not args.skip_curves:
        runs = {"non-private": run_curve(
            base, {"dp": False, "local-epochs": args.local_epochs}, "non-private")}
        for eps in (float(e) for e in args.epsilons.split(",") if e):
            runs[f"dp eps={eps:g}"] = run_curve(
                base, {"dp": True, "target-epsilon": eps,
                       "local-epochs": args.dp_local_epochs}, f"dp eps={eps:g}")
        result["federated"] = runs
        lines += [f"(a) {args.rounds} rounds, 943 clients; unit of privacy: one rating "
                  "(with its sampled negatives), delta 1e-5",
                  f"{'run':<20}{'Recall@20':>11}{'NDCG@20':>10}{'x central R':>13}"
                  f"{'x central N':>13}{'epsilon':>9}",
                  f"{'centralized (best)':<20}{c_r20:>11.4f}{c_n20:>10.4f}{1:>13.3f}"
                  f"{1:>13.3f}{'-':>9}"]
        for name, r in runs.items():
            f = r["final"]
            lines.append(f"{name + ' (final)':<20}{f['recall@20']:>11.4f}"
                         f"{f['ndcg@20']:>10.4f}{f['recall@20'] / c_r20:>13.3f}"
                         f"{f['ndcg@20'] / c_n20:>13.3f}{f['epsilon-max']:>9.2f}")
        lines.append("")
    result["centralized_dp_epoch_seconds"] = central_dp_epoch_seconds(base)
    flower = flower_round_seconds(base, workdir, "round-time")
    result["flower_dp_round"] = flower
    result["round_over_central_dp_epoch"] = (flower["round_seconds"]
                                             / result["centralized_dp_epoch_seconds"])
    lines.append(f"(b) Flower DP round (train+evaluate, 943 clients, 1 local epoch): "
                 f"{flower['round_seconds']:.1f} s (round 1 with start-up: "
                 f"{flower['first_round_seconds']:.1f} s); centralized DP epoch (batch 16):"
                 f" {result['centralized_dp_epoch_seconds']:.1f} s; ratio "
                 f"{result['round_over_central_dp_epoch']:.2f}")
    result.update(_peak_rss_mb())
    lines.append(f"    peak RSS: driver {result['driver_peak_rss_mb']:.0f} MB, largest "
                 f"child {result['largest_child_peak_rss_mb']:.0f} MB")
    if args.ml1m_shaped:
        result.update(ml1m_shaped(base, workdir, lines, args.ml1m_rounds))


if __name__ == "__main__":
    main()
