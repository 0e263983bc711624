"""What a client's upload leaks: an item-membership attack on its update.

The server (honest-but-curious) sees the shared parameters a client returns and knows
the global ones it sent. It ranks items by how much their embedding row changed,
``||returned[i] - sent[i]||``, and guesses that the most-changed rows are the client's
items. The attack's AUC against the client's true (training) items measures the leak:
~1.0 without DP (untouched rows do not change at all), ~0.5 when DP noise drowns it.
"""

from __future__ import annotations

import numpy as np

from fedrec.config import RunConfig
from fedrec.federated import (
    ClientData,
    cached_split,
    fit_client,
    item_keys,
    split_for_users,
)
from fedrec.partition import partition_users


def row_change(sent: np.ndarray, returned: np.ndarray) -> np.ndarray:
    """Per-row L2 norm of the update of an item-indexed table ``[n_items, ...]``."""
    diff = (returned.astype(np.float64) - sent.astype(np.float64)).reshape(len(sent), -1)
    return np.linalg.norm(diff, axis=1)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean labels ``positive`` (ties count 1/2).

    Mann-Whitney U with average ranks; NaN when one class is empty.
    """
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def membership_auc(sent: dict[str, np.ndarray], returned: dict[str, np.ndarray],
                   item_keys: list[str], client_items: np.ndarray, n_items: int) -> float:
    """Attack AUC: item rows ranked by update norm (summed over item tables)."""
    score = np.zeros(n_items)
    for key in item_keys:
        score += row_change(sent[key], returned[key]) ** 2
    labels = np.zeros(n_items, dtype=bool)
    labels[np.asarray(client_items, dtype=np.int64)] = True
    return auc(score, labels)


def bias_direction_auc(sent: dict[str, np.ndarray], returned: dict[str, np.ndarray],
                       bias_key: str, client_items: np.ndarray) -> float:
    """A stronger attack: items whose bias went *up* were trained as positives.

    Sampled negatives also change their rows (which hides them from the norm attack),
    but their bias goes down; the sign separates them.
    """
    score = (returned[bias_key].astype(np.float64) - sent[bias_key]).reshape(-1)
    labels = np.zeros(len(score), dtype=bool)
    labels[np.asarray(client_items, dtype=np.int64)] = True
    return auc(score, labels)


def attack_clients(cfg: RunConfig, shared: dict[str, np.ndarray], n_clients: int = 20,
                   ) -> dict[str, float]:
    """Mean attack AUCs over ``n_clients`` fresh clients' uploads from model ``shared``.

    Each client trains one round (as configured: record-level DP or not) from
    ``shared``; the attack sees exactly what the server receives from it. User-level DP
    adds its noise on the server, after aggregation, so the server sees the raw upload.
    In distributed mode the server receives the client's integers masked by SecAgg+:
    pairwise and private masks make the vector uniform modulo 2^48 (Flower's masked
    vectors are checked to be in tests/test_ddp.py); the attack runs on such a vector.
    """
    split = cached_split(cfg.data)
    parts = partition_users(cfg.fed.partition, split.n_users, cfg.fed.num_clients,
                            cfg.data.seed)
    keys = item_keys(cfg, split.n_items)
    bias = [k for k in keys if k.endswith("bias.weight")]
    rng = np.random.default_rng(cfg.data.seed + 17)
    chosen = rng.choice(len(parts), min(n_clients, len(parts)), replace=False)
    norm, direction = [], []
    for i in chosen:
        client = split_for_users(split, parts[i])
        if len(client.train) == 0:
            continue
        if cfg.privacy.ddp:
            returned = _masked_upload(cfg, client, shared, len(parts), int(i), rng)
        else:
            res = fit_client(cfg, client, shared, None, seed=cfg.data.seed + int(i),
                             server_round=1)
            if res.shared is None:
                continue
            returned = res.shared
        items = np.unique(client.train.items)
        norm.append(membership_auc(shared, returned, keys, items, split.n_items))
        if bias:
            direction.append(bias_direction_auc(shared, returned, bias[0], items))
    return {"attack_auc": float(np.nanmean(norm)) if norm else float("nan"),
            "attack_auc_bias": float(np.nanmean(direction)) if direction else float("nan")}


def _masked_upload(cfg: RunConfig, client: ClientData, shared: dict[str, np.ndarray],
                   n_clients: int, seed: int, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
    """A distributed-DP client's integers as SecAgg+ hands them to the server: plus a
    uniform mask modulo 2^48, read as arrays shaped like ``shared``."""
    from fedrec import ddp
    from fedrec.federated import ddp_client_round, shared_order, unflatten

    dim = int(sum(v.size for v in shared.values())) + len(ddp.count_keys(cfg))
    plan = ddp.plan_round(cfg, sampled=n_clients, dim=dim, history=[],
                          releases_left=cfg.fed.rounds + 1)
    rep = ddp_client_round(cfg, client, shared, None, None, plan, seed=seed, server_round=1)
    assert rep.ints is not None
    mask = rng.integers(0, ddp.MODULUS, dim, dtype=np.int64)
    masked = np.mod(rep.ints + mask, ddp.MODULUS).astype(np.float64)
    like = {k: v.astype(np.float64) for k, v in shared.items()}
    update_dim = int(sum(v.size for v in shared.values()))
    return unflatten(masked[:update_dim], like, shared_order(cfg, client.n_items))
