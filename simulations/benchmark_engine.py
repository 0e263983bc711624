"""The batched client engine against one fit_client per client, side by side in one run.

An ML-1M-shaped synthetic federation (6,040 one-user clients, 3,706 items, ~166 ratings a
user; the cross-device recipe) trains one round with each engine, and one non-private
centralized epoch at batch 1024 on the same data and model is the yardstick:

    python simulations/benchmark_engine.py --out results/benchmark_engine.json

The loop engine is timed on ``--loop-sample`` clients and scaled to the whole round (it
costs the same per client, one after another); the batched engine trains every client.
Under record-level DP the batched round folds the noise rows still owe after the
clients' last steps into one draw for the sum, as ``fedrec.inprocess`` does.
Also times splitting the data into the clients (``split``: all parts at once, as the
in-process rounds do, against one ``split_for_users`` after another, sampled and scaled).
Writes ``ml1m_round_over_central_epoch`` per DP mode (``none``: no DP; ``record``:
record-level DP-SGD on every client, epsilon 8; ``user``: user-level DP, clipped and
noised at the server), ``batched_speedup`` and ``peak_rss_gb`` (the process's peak
resident memory, read after the batched rounds). Distributed DP still trains client by
client (``fedrec.batched``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.aggregate import ClippedSum, MeanAccumulator, Update
from fedrec.batched import fit_clients, owed_noise
from fedrec.central import run_centralized
from fedrec.config import RECIPES, RunConfig
from fedrec.data import load_split
from fedrec.federated import (
    cached_split,
    fit_client,
    init_shared,
    item_keys,
    split_for_parts,
    split_for_users,
)
from fedrec.partition import partition_users
from fedrec.privacy import secret_generator
from fedrec.report import write_json_atomic


def _round(cfg: RunConfig, clients: list[Any], shared: dict[str, np.ndarray],
           engine: str) -> float:
    """Seconds to train ``clients`` for round 1 and fold their updates into the sum."""
    keys = item_keys(cfg, cached_split(cfg.data).n_items)
    acc: MeanAccumulator | ClippedSum = (ClippedSum(shared, cfg.privacy.user_clip, keys)
                                         if cfg.privacy.user_dp else
                                         MeanAccumulator(shared, keys))
    seeds = [cfg.data.seed + i for i in range(len(clients))]
    fold = engine == "batched" and cfg.privacy.dp  # as fedrec.inprocess sums them
    owed = np.zeros(cached_split(cfg.data).n_items)
    t0 = time.perf_counter()
    if engine == "batched":
        fits = (res for _, res in fit_clients(cfg, clients, shared, [None] * len(clients),
                                              [None] * len(clients), seeds=seeds,
                                              server_round=1, fold_noise=fold,
                                              as_rows=True))
    else:
        fits = (fit_client(cfg, c, shared, None, seed=s, server_round=1)
                for c, s in zip(clients, seeds))
    for res in fits:
        if res.shared is None:
            continue
        if isinstance(acc, ClippedSum):
            acc.add(res.shared, res.rows)
        else:
            acc.add(Update(res.shared, res.weight, res.touched, res.rows))
        if res.owed is not None:
            owed += res.owed
    if fold and isinstance(acc, MeanAccumulator):
        acc.add_noise(owed_noise(owed, shared, keys, secret_generator()))
    return time.perf_counter() - t0


def main() -> None:
    """Time both engines and the centralized epoch; print and write the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/benchmark_engine.json")
    ap.add_argument("--users", type=int, default=6040)
    ap.add_argument("--items", type=int, default=3706)
    ap.add_argument("--activity", type=float, default=166.0)
    ap.add_argument("--loop-sample", type=int, default=300,
                    help="clients the loop engine is timed on (scaled to the round)")
    ap.add_argument("--modes", default="none,record,user",
                    help="DP modes: none, record, user")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as each Flower client runs; both engines alike
    # the model of the DP modes (cross-device-dp recipe) for every mode and the yardstick,
    # so that the rounds and the centralized epoch do the same arithmetic per example
    data = {"dataset": "synthetic", "synthetic-users": args.users,
            "synthetic-items": args.items, "synthetic-activity": args.activity,
            **{k: RECIPES["cross-device-dp"][k] for k in ("dim", "negatives")}}
    fed = RunConfig.from_flat({**data, "partition": "cross-device", "dp": False})
    split = cached_split(fed.data)
    central_cfg = RunConfig.from_flat({**data, "dp": False, "epochs": 1, "eval-every": 0,
                                       "batch-size": 1024, "dim": fed.model.dim,
                                       "negatives": fed.data.negatives}, central=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, metrics, _ = run_centralized(central_cfg, load_split(central_cfg.data))
    epoch = float(metrics["train_seconds"])
    print(f"data: {split.n_users} users, {split.n_items} items, {len(split.train)} training "
          f"ratings; model {fed.model.model} dim {fed.model.dim}, "
          f"{fed.data.negatives} negatives")
    print(f"centralized epoch (batch 1024): {epoch:.1f}s", flush=True)
    result: dict[str, Any] = {"users": split.n_users, "items": split.n_items,
                              "train_ratings": len(split.train), "central_epoch_s": epoch,
                              "loop_sample": args.loop_sample, "modes": {}}
    for mode in args.modes.split(","):
        cfg = RunConfig.from_flat({**data, "partition": "cross-device",
                                   "dp": mode == "record", "user-dp": mode == "user"})
        parts = partition_users("cross-device", split.n_users, 0, cfg.data.seed)
        t0 = time.perf_counter()
        clients = split_for_parts(split, parts)
        split_s = time.perf_counter() - t0
        shared = init_shared(cfg, split.n_items)
        sample = clients[:: max(1, len(clients) // args.loop_sample)][:args.loop_sample]
        if "split" not in result:  # the federation's data, all parts at once vs one by one
            t0 = time.perf_counter()
            for users in parts[:: max(1, len(parts) // args.loop_sample)][:args.loop_sample]:
                split_for_users(split, users)
            loop_s = (time.perf_counter() - t0) * len(parts) / len(sample)
            result["split"] = {"parts_s": split_s, "loop_s": loop_s,
                               "speedup": loop_s / split_s}
            print(f"splitting the data into {len(parts):,} clients: {split_s:.1f}s at once, "
                  f"{loop_s:.1f}s one by one ({loop_s / split_s:.0f}x)", flush=True)
        loop = _round(cfg, sample, shared, "loop") * len(clients) / len(sample)
        batched = _round(cfg, clients, shared, "batched")
        row = {"loop_round_s": loop, "batched_round_s": batched,
               "batched_speedup": loop / batched,
               "ml1m_round_over_central_epoch": batched / epoch}
        result["modes"][mode] = row
        print(f"{mode:>5}: loop {loop:.1f}s (from {len(sample)} clients), batched "
              f"{batched:.1f}s: {loop / batched:.1f}x faster; round / central epoch "
              f"{batched / epoch:.2f}", flush=True)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"peak RSS {result['peak_rss_gb']:.2f} GB")
    write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    sys.exit(main())
