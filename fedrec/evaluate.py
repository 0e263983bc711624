"""Evaluate a model on held-out interactions, returning summable counts.

Full ranking (default): each test user's scores over all items, with the items the user
trained on excluded, ranked; the user's test items are the relevant ones. Sampled
protocol (``eval_negatives = N``): each held-out positive is ranked against N sampled
items the user never interacted with; a user's metrics are averaged over their lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedrec import keys, metrics
from fedrec.data.interactions import Interactions
from fedrec.data.sampling import PairSet, sampled_eval_lists
from fedrec.features import serving_times, with_context
from fedrec.model import RecModel


def _total(scores: torch.Tensor) -> torch.Tensor:
    """Scores with NaN/inf replaced by fixed finite values, so every metric is a finite,
    bounded function of the data whatever model a server sends (a NaN that appeared only
    for some items would otherwise tell, by a failed release, whether a user held them)."""
    return torch.nan_to_num(scores, nan=0.0, posinf=1e30, neginf=-1e30)


def model_inputs(model: Any, users: np.ndarray, times: np.ndarray | None) -> torch.Tensor:
    """What ``model`` takes as users: the ids, with the context of ``times`` (each
    example's moment) for a model that reads context."""
    if times is not None and getattr(model, "reads_context", False):
        return with_context(users, times)
    return torch.from_numpy(np.asarray(users))


def _by_user(data: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(data.users, kind="stable")
    users, items = data.users[order], data.items[order]
    bounds = np.searchsorted(users, np.arange(data.n_users + 1))
    return users, items, bounds


def full_ranking_counts(model: RecModel, train: Interactions, test: Interactions,
                        ks: tuple[int, ...], chunk: int = 512) -> dict[str, float]:
    """Summed per-user metrics from a full ranking that excludes each user's train items."""
    _, per_user = full_ranking_user_counts(model, train, test, ks, chunk)
    return {key: float(v.sum()) for key, v in per_user.items()}  # no test user: {}


@torch.no_grad()
def full_ranking_user_counts(model: RecModel, train: Interactions, test: Interactions,
                             ks: tuple[int, ...], chunk: int = 512
                             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``full_ranking_counts`` per test user: (the users, each key's ``[U]`` values)."""
    kmax = min(max(ks), model.n_items)
    _, tr_items, tr_bounds = _by_user(train)
    _, te_items, te_bounds = _by_user(test)
    test_users = np.unique(test.users)
    # a context model serves each user at its moment (computed once, and only for it)
    times = serving_times(test_users, test) if getattr(model, "reads_context", False) else None
    parts = []
    for start in range(0, len(test_users), chunk):
        users = test_users[start:start + chunk]
        served = model_inputs(model, users, None if times is None
                              else times[start:start + chunk])
        scores = _total(model.score_all(served).float().cpu())  # [U, n_items]
        lens = tr_bounds[users + 1] - tr_bounds[users]
        rows = np.repeat(np.arange(len(users)), lens)
        cols = np.concatenate([tr_items[tr_bounds[u]:tr_bounds[u + 1]] for u in users])
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        rel = torch.zeros_like(scores, dtype=torch.bool)
        lens = te_bounds[users + 1] - te_bounds[users]
        rows = np.repeat(np.arange(len(users)), lens)
        cols = np.concatenate([te_items[te_bounds[u]:te_bounds[u + 1]] for u in users])
        rel[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        top = scores.topk(kmax, dim=1).indices
        hits = rel.gather(1, top)
        if kmax < max(ks):  # fewer items than K: pad with misses
            hits = torch.nn.functional.pad(hits, (0, max(ks) - kmax))
        parts.append(metrics.user_ranking_counts(hits, rel.sum(1), ks))
    if not parts:
        return test_users, {}
    return test_users, {key: torch.cat([p[key] for p in parts]).numpy() for key in parts[0]}


@torch.no_grad()
def sampled_counts(model: RecModel, train: Interactions, test: Interactions,
                   ks: tuple[int, ...], n_negatives: int, seed: int) -> dict[str, float]:
    """Summed per-user metrics under the sampled protocol (1 positive + N negatives)."""
    if test.negatives is not None:  # a published protocol's fixed negatives
        users = test.users.copy()
        lists = np.concatenate([test.items[:, None], test.negatives], axis=1)
    else:
        seen = PairSet(np.concatenate([train.users, test.users]),
                       np.concatenate([train.items, test.items]), train.n_items)
        users, lists = sampled_eval_lists(test, seen, n_negatives, seed)
    device = next(model.parameters()).device
    scores = _total(model(model_inputs(model, users, test.timestamps).to(device),
                          torch.from_numpy(lists).to(device)).cpu())
    rank = (scores[:, 1:] > scores[:, :1]).sum(1)  # 0 = best
    uniq, inv = np.unique(users, return_inverse=True)
    inv_t = torch.from_numpy(inv)
    n_lists = torch.bincount(inv_t, minlength=len(uniq)).to(torch.float64)
    out: dict[str, float] = {keys.NUM_USERS: float(len(uniq))}
    for k in ks:
        hit = (rank < k).to(torch.float64)
        ndcg = hit / torch.log2(rank.to(torch.float64) + 2.0)
        per_user = {
            "precision": hit / k, "recall": hit, "ndcg": ndcg, "hr": hit,
        }
        for name, vals in per_user.items():
            user_mean = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv_t, vals)
            out[keys.sum_key(name, k)] = float((user_mean / n_lists).sum())
    return out


@torch.no_grad()
def rating_error_counts(model: RecModel, test: Interactions) -> dict[str, float]:
    """Summed squared/absolute errors of predicted ratings on test pairs (predictions are
    clipped to the dataset's rating scale, which also bounds each rating's error)."""
    device = next(model.parameters()).device
    pred = model(model_inputs(model, test.users, test.timestamps).to(device),
                 torch.from_numpy(test.items).to(device).unsqueeze(1)).squeeze(1).cpu()
    lo, hi = test.rating_range
    pred = _total(pred).clamp(min=lo, max=hi if np.isfinite(hi) else None)
    return metrics.rating_counts(pred, torch.from_numpy(test.ratings))


def evaluate_counts(model: RecModel, train: Interactions, test: Interactions, *,
                    ks: tuple[int, ...], implicit: bool, eval_negatives: int = 0,
                    seed: int = 0) -> dict[str, float]:
    """All summable evaluation counts for one model on one (train, test) pair.

    Explicit feedback adds rating errors (RMSE/MAE) to the ranking counts.
    """
    was_training = model.training
    model.eval()
    if eval_negatives > 0 or test.negatives is not None:
        counts = sampled_counts(model, train, test, ks, eval_negatives, seed)
    else:
        counts = full_ranking_counts(model, train, test, ks)
    if not implicit:
        counts.update(rating_error_counts(model, test))
    model.train(was_training)
    return counts
