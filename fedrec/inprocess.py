"""Federated rounds in one process, without Flower: for sweeps and quality benchmarks.

Each round calls the same functions the Flower apps call (``fit_client``,
``aggregate``, ``evaluate_client``) for every client in turn; client state (user
embeddings, privacy ledgers) is kept in memory instead of state files. With
``fraction = 1`` and no DP the results equal a Flower simulation with the same config
(``tests/test_apps.py`` checks this); Flower adds messaging and process isolation, not
arithmetic. Use ``fedrec simulate`` to exercise the real apps.

Metrics here are the experimenter's: exact counts from every client's held-out data,
computed in this process (nothing is released by a client), also under DP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedrec.aggregate import ClippedSum, MeanAccumulator, ServerOptimizer, Update, UserLevelDP
from fedrec.config import RunConfig
from fedrec.errors import ConfigError
from fedrec.federated import (
    cached_split,
    evaluate_client,
    fit_client,
    init_shared,
    item_keys,
    split_for_users,
)
from fedrec.metrics import finalize, merge_counts
from fedrec.partition import partition_users
from fedrec.state import ClientState, Ledger

Arrays = dict[str, np.ndarray]


def run_inprocess(cfg: RunConfig, on_round: Callable[[dict[str, Any]], None] | None = None,
                  ) -> tuple[Arrays, list[dict[str, Any]]]:
    """Run ``rounds`` federated rounds over all partitions; returns (shared, rows).

    Each row holds the round's aggregated metrics, ``epsilon-max``/``epsilon-mean``,
    ``clients``, ``exhausted`` and ``seconds``, like a ``fedrec simulate`` round row.
    """
    if cfg.fed.aggregation != "mean":
        raise ConfigError(f"aggregation {cfg.fed.aggregation!r}: robust rules run through "
                          "Flower's strategies; use fedrec simulate")
    if cfg.fed.fault_rate > 0:
        raise ConfigError("fault-rate: fault injection runs through Flower's messaging; use "
                          "fedrec simulate")
    split = cached_split(cfg.data)
    parts = partition_users(cfg.fed.partition, split.n_users, cfg.fed.num_clients,
                            cfg.data.seed)
    clients = [split_for_users(split, users) for users in parts]
    shared = init_shared(cfg, split.n_items)
    keys = item_keys(cfg, split.n_items)
    server = ServerOptimizer(cfg.fed, keys)
    states: list[ClientState | None] = [None] * len(clients)
    ledgers: list[Ledger | None] = [None] * len(clients)
    user_dp = UserLevelDP(cfg) if cfg.privacy.user_dp else None
    rng = np.random.default_rng(cfg.data.seed)
    rows: list[dict[str, Any]] = []
    for rnd in range(1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        n_sample = max(min(cfg.fed.min_clients, len(clients)),  # FedAvg's rule
                       int(cfg.fed.fraction * len(clients)))
        chosen = (range(len(clients)) if n_sample >= len(clients)
                  else sorted(rng.choice(len(clients), n_sample, replace=False)))
        acc = MeanAccumulator(shared, keys)
        clipped = ClippedSum(shared, cfg.privacy.user_clip) if user_dp else None
        eps, losses, exhausted = [], [], 0
        for i in chosen:
            res = fit_client(cfg, clients[i], shared, states[i], ledgers[i],
                             seed=cfg.data.seed + i, server_round=rnd)
            eps.append(res.epsilon)
            if res.shared is None:
                exhausted += int(res.exhausted)
                continue
            states[i], ledgers[i] = res.state, res.ledger
            # fit_client sends no mask under DP or with uniform weighting
            if clipped is not None:
                clipped.add(res.shared)
            else:
                acc.add(Update(res.shared, res.weight, res.touched))
            losses.append((res.loss, res.num_examples))
        facts: dict[str, Any] = {}
        if user_dp is not None and clipped is not None:
            shared, facts = user_dp.step(clipped, rnd, n_sample, server)
        else:
            shared = server.step_accumulated(acc)
        counts = [evaluate_client(cfg, c, shared, states[i], seed=cfg.data.seed + i)
                  for i, c in enumerate(clients)]
        n_ex = sum(w for _, w in losses)
        row: dict[str, Any] = {
            "round": rnd, "clients": len(losses), "exhausted": exhausted, **facts,
            "train-loss": sum(v * w for v, w in losses) / n_ex if n_ex else math.nan,
            "epsilon-max": max(eps, default=0.0),
            "epsilon-mean": float(np.mean(eps)) if eps else 0.0,
            **finalize(merge_counts(counts), cfg.eval.ks),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return shared, rows
