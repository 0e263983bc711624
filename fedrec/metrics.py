"""Ranking and rating metrics from summable per-user quantities.

Each user contributes precision_u, recall_u, ndcg_u and hr_u at every K; the global metric
is the sum over users divided by the number of users. Sums and counts add up across
clients, so a server can aggregate them exactly (``merge_counts`` then ``finalize``).

Conventions (as in RecBole): Precision@K = hits/K (so it may stay below 1 when a user has
fewer than K relevant items); Recall@K = hits/|relevant|; NDCG@K uses binary gains with
IDCG over min(|relevant|, K) positions; HR@K = 1 if any hit. Users with no relevant
(test) items are not counted.

>>> hits = torch.tensor([[True, False, True]])
>>> c = ranking_counts(hits, torch.tensor([2]), ks=(2,))
>>> finalize(c, ks=(2,))["recall@2"]
0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fedrec import keys


def _discounts(k: int) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)


def ranking_counts(hits: torch.Tensor, n_relevant: torch.Tensor,
                   ks: Iterable[int]) -> dict[str, float]:
    """Summed per-user metrics.

    Args:
        hits: bool ``[U, >= max(ks)]``: whether the item at each rank is relevant.
        n_relevant: ``[U]`` relevant (held-out) items per user, each >= 1.
        ks: cut-offs.

    Returns:
        ``{"num-users": U, "sum-precision-at-K": ..., ...}``.
    """
    return {key: float(v.sum()) for key, v in user_ranking_counts(hits, n_relevant,
                                                                   ks).items()}


def user_ranking_counts(hits: torch.Tensor, n_relevant: torch.Tensor,
                        ks: Iterable[int]) -> dict[str, torch.Tensor]:
    """``ranking_counts`` per user: each key's float64 ``[U]`` values (``num-users``: 1
    each)."""
    hits = hits.to(torch.float64)
    rel = n_relevant.to(torch.float64)
    out: dict[str, torch.Tensor] = {keys.NUM_USERS: torch.ones(hits.shape[0],
                                                               dtype=torch.float64)}
    for k in ks:
        h = hits[:, :k]
        n_hits = h.sum(1)
        disc = _discounts(k)
        dcg = (h * disc[: h.shape[1]]).sum(1)
        ideal_len = torch.clamp(rel, max=k).long()
        idcg = torch.cumsum(disc, 0)[ideal_len - 1]
        out[keys.sum_key("precision", k)] = n_hits / k
        out[keys.sum_key("recall", k)] = n_hits / rel
        out[keys.sum_key("ndcg", k)] = dcg / idcg
        out[keys.sum_key("hr", k)] = (n_hits > 0).to(torch.float64)
    return out


def rating_counts(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Summed squared and absolute errors of rating predictions."""
    err = (pred.to(torch.float64) - target.to(torch.float64))
    return {keys.NUM_RATINGS: float(err.numel()), keys.SUM_SQ_ERR: float((err**2).sum()),
            keys.SUM_ABS_ERR: float(err.abs().sum())}


def merge_counts(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Add count dictionaries key by key (e.g. from several clients)."""
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def finalize(counts: Mapping[str, float], ks: Iterable[int]) -> dict[str, float]:
    """Turn summed counts into metrics: ``precision@10``, ``recall@20``, ``rmse``, ...

    Metrics with nothing to average over are NaN.
    """
    out: dict[str, float] = {}
    n_users = counts.get(keys.NUM_USERS, 0.0)
    for k in ks:
        for name in keys.RANKING_METRICS:
            total = counts.get(keys.sum_key(name, k), 0.0)
            out[keys.metric_key(name, k)] = total / n_users if n_users else math.nan
    n_ratings = counts.get(keys.NUM_RATINGS, 0.0)
    if n_ratings:
        out["rmse"] = math.sqrt(counts[keys.SUM_SQ_ERR] / n_ratings)
        out["mae"] = counts[keys.SUM_ABS_ERR] / n_ratings
    return out
