"""Negative sampling and training/evaluation tensors.

One training example is one rating together with its sampled negatives (an ``[1 + N]``
row of items): this is also the unit of record-level DP, so that epsilon protects one
rating. Under DP the negatives are drawn uniformly from the whole catalogue
(``uniform=True``): drawing them among the items a user did *not* rate would make every
example depend on the user's other ratings (removing one rating would make its item
eligible as a negative elsewhere), which the per-example guarantee does not cover.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.data.interactions import Interactions


class PairSet:
    """A set of (user, item) pairs with vectorised membership tests."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int) -> None:
        self.n_items = n_items
        self.keys = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Elementwise membership of (users[i], items[i])."""
        q = users.astype(np.int64) * self.n_items + items.astype(np.int64)
        idx = np.searchsorted(self.keys, q)
        idx = np.minimum(idx, len(self.keys) - 1)
        return self.keys[idx] == q


def sample_negatives(
    users: np.ndarray, seen: PairSet, n: int, rng: np.random.Generator, max_tries: int = 50
) -> np.ndarray:
    """For each user id draw ``n`` items uniformly among those not in ``seen``.

    Returns:
        int64 array ``[len(users), n]``. A user who has seen (almost) every item may keep
        a seen item after ``max_tries`` redraws.
    """
    out = rng.integers(0, seen.n_items, size=(len(users), n))
    rep_users = np.repeat(users, n).reshape(len(users), n)
    bad = seen.contains(rep_users.ravel(), out.ravel()).reshape(out.shape)
    for _ in range(max_tries):
        if not bad.any():
            break
        out[bad] = rng.integers(0, seen.n_items, size=int(bad.sum()))
        bad[bad] = seen.contains(rep_users[bad], out[bad])
    return out


@dataclass
class Examples:
    """Training tensors: ``users [n]``, ``items [n, K]``, ``targets [n, K]``.

    For implicit data column 0 of ``items`` is the positive and the rest are negatives
    (resampled by ``resample``); for explicit data K = 1 and targets are ratings.
    """

    users: torch.Tensor
    items: torch.Tensor
    targets: torch.Tensor
    implicit: bool

    def __len__(self) -> int:
        return int(self.users.shape[0])


class ExampleBuilder:
    """Builds training examples from train interactions, resampling negatives per epoch."""

    def __init__(self, train: Interactions, *, implicit: bool, negatives: int,
                 seed: int | np.random.Generator, uniform: bool = False,
                 context: np.ndarray | None = None) -> None:
        """``seed``: a seed or a generator (under DP an OS-seeded one); ``uniform``:
        negatives from the whole catalogue, independent of the user's other ratings;
        ``context``: per rating, columns that follow the user id in ``users`` (a context
        model's input, ``fedrec.features.with_context``)."""
        self.train = train
        self.implicit = implicit
        self.negatives = negatives
        self.uniform = uniform
        self.rng = (seed if isinstance(seed, np.random.Generator)
                    else np.random.default_rng(seed))
        k = 1 + negatives if implicit else 1
        targets = torch.zeros(len(train), k)
        if implicit:
            targets[:, 0] = 1.0
        else:
            targets[:, 0] = torch.from_numpy(train.ratings)
        self._targets = targets
        self._users = torch.from_numpy(train.users)
        if context is not None:
            if len(context) != len(train):
                raise ValueError(f"context: {len(context)} rows for {len(train)} ratings")
            self._users = torch.from_numpy(np.concatenate(
                [train.users[:, None], np.asarray(context, dtype=np.int64)], axis=1))
        # items used by any example built so far (positives and sampled negatives)
        self.touched = np.zeros(train.n_items, dtype=bool)

    @functools.cached_property
    def seen(self) -> PairSet:
        """The training pairs (negatives exclude them unless ``uniform``)."""
        return PairSet(self.train.users, self.train.items, self.train.n_items)

    def build(self) -> Examples:
        """Examples with freshly sampled negatives."""
        pos = torch.from_numpy(self.train.items).unsqueeze(1)
        if self.implicit and self.uniform:
            neg = self.rng.integers(0, self.train.n_items, (len(self.train), self.negatives))
            items = torch.cat([pos, torch.from_numpy(neg)], dim=1)
        elif self.implicit:
            neg = sample_negatives(self.train.users, self.seen, self.negatives, self.rng)
            items = torch.cat([pos, torch.from_numpy(neg)], dim=1)
        else:
            items = pos
        self.touched[items.numpy().ravel()] = True
        return Examples(self._users, items, self._targets, self.implicit)


def sampled_eval_lists(
    test: Interactions, seen: PairSet, n_negatives: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The sampled protocol: each test positive with ``n_negatives`` unseen items.

    ``seen`` should hold train and test pairs, so negatives are items the user never
    interacted with (NCF's leave-one-out with 99 negatives uses n_negatives=99).

    Returns:
        (users ``[m]``, items ``[m, 1 + n_negatives]``) with the positive in column 0.
    """
    rng = np.random.default_rng(seed)
    neg = sample_negatives(test.users, seen, n_negatives, rng)
    return test.users.copy(), np.concatenate([test.items[:, None], neg], axis=1)
