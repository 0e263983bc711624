"""Cold-start protocols: new items nobody has rated, and users with few ratings.

Item cold start: a fraction of the items (chosen by seed among those with ratings) is
held out of training entirely; every rating of a held-out item becomes a test rating, and
each of their raters gets a ranking of the held-out items only (Recall@K among new
items). A model can score them from their content (genres, decade) alone; an id-only
model can not.

User cold start: a fraction of the users keeps only their first ``keep`` training
ratings; metrics are reported separately for them ("cold") and for everyone else ("warm"),
on the same test ratings as the warm protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec.data import Split
from fedrec.data.interactions import Interactions
from fedrec.evaluate import full_ranking_counts, full_ranking_user_counts
from fedrec.features import item_values
from fedrec.metrics import finalize


@dataclass
class ItemColdStart:
    """Train without the new items; their ratings as test; which items are new."""

    train: Interactions  # every rating of a warm item (the original train split)
    test: Interactions  # every rating (train or test) of a new item
    new_items: np.ndarray  # bool [n_items]


def item_cold_start(split: Split, fraction: float, seed: int) -> ItemColdStart:
    """Hold ``fraction`` of the rated items out of training (see the module doc)."""
    rng = np.random.default_rng(seed)
    rated = np.unique(np.concatenate([split.train.items, split.test.items]))
    chosen = rng.choice(rated, size=max(1, round(fraction * len(rated))), replace=False)
    new = np.zeros(split.n_items, dtype=bool)
    new[chosen] = True
    train = split.train.subset(~new[split.train.items])
    both = [split.train.subset(new[split.train.items]), split.test.subset(new[split.test.items])]
    test = both[0]
    for name in ("users", "items", "ratings", "timestamps"):
        setattr(test, name, np.concatenate([getattr(b, name) for b in both]))
    return ItemColdStart(train, test, new)


class _Among:
    """A scorer restricted to ``candidates``: other items score -inf (never ranked)."""

    def __init__(self, scorer: Any, candidates: np.ndarray) -> None:
        self.scorer, self.n_items = scorer, scorer.n_items
        self.off = torch.from_numpy(~candidates)
        self.reads_context = getattr(scorer, "reads_context", False)  # served with it

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        scores = self.scorer.score_all(users).float().clone()
        scores[:, self.off] = -torch.inf
        return scores


def among_new_items(scorer: Any, cold: ItemColdStart, ks: tuple[int, ...]) -> dict[str, float]:
    """Ranking metrics of ``scorer`` over the new items for their raters."""
    counts = full_ranking_counts(_Among(scorer, cold.new_items), cold.train, cold.test, ks)  # type: ignore[arg-type]
    return finalize(counts, ks)


def oracle_popularity(cold: ItemColdStart) -> np.ndarray:
    """Each new item's number of ratings in the test period: popularity among new items,
    known only in hindsight (an upper reference, not a deployable ranking)."""
    return np.bincount(cold.test.items, minlength=len(cold.new_items)).astype(np.float64)


def content_popularity(train: Interactions) -> np.ndarray:
    """A deployable non-personalised ranking of new items: the mean training popularity
    (ratings per item) of the items sharing each of its feature values."""
    per_item = np.bincount(train.items, minlength=train.n_items).astype(np.float64)
    values = [item_values(t, g) for t, g in zip(train.titles, train.genres)]
    total: dict[str, float] = {}
    n: dict[str, int] = {}
    for i, vals in enumerate(values):
        if per_item[i] > 0:
            for v in vals:
                total[v] = total.get(v, 0.0) + per_item[i]
                n[v] = n.get(v, 0) + 1
    return np.array([np.mean([total[v] / n[v] for v in vals if v in n] or [0.0])
                     for vals in values])


def user_cold_start(split: Split, fraction: float, keep: int, seed: int
                    ) -> tuple[Split, np.ndarray]:
    """``split`` with ``fraction`` of the users cut to their first ``keep`` training
    ratings; returns it and the bool ``[n_users]`` mask of those users."""
    rng = np.random.default_rng(seed)
    cold = np.zeros(split.n_users, dtype=bool)
    cold[rng.choice(split.n_users, size=round(fraction * split.n_users), replace=False)] = True
    tr = split.train
    order = np.lexsort((tr.timestamps, tr.users))
    counts = np.bincount(tr.users, minlength=split.n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(len(tr), dtype=np.int64)
    pos[order] = np.arange(len(tr)) - starts[tr.users[order]]
    keep_row = ~cold[tr.users] | (pos < keep)
    return Split(tr.subset(keep_row), split.test, split.implicit), cold


def sliced_metrics(model: Any, split: Split, cold_users: np.ndarray,
                   ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Full-ranking metrics for the cold users and for the others, separately (each with
    its number of test users, ``users``)."""
    users, per_user = full_ranking_user_counts(model, split.train, split.test, ks)
    out = {}
    for name, mask in (("cold", cold_users[users]), ("warm", ~cold_users[users])):
        out[name] = {**finalize({k: float(v[mask].sum()) for k, v in per_user.items()}, ks),
                     "users": float(mask.sum())}
    return out
