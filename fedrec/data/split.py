"""Feedback conversion, k-core filtering and per-user temporal splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.interactions import Interactions
from fedrec.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Train and test interactions over one id space.

    ``implicit`` tells whether ratings are to be treated as positives only (ranking) or
    as explicit targets (regression).
    """

    train: Interactions
    test: Interactions
    implicit: bool

    @property
    def n_users(self) -> int:
        """Users in the id space."""
        return self.train.n_users

    @property
    def n_items(self) -> int:
        """Items in the id space."""
        return self.train.n_items


def to_feedback(data: Interactions, feedback: str, threshold: float) -> Interactions:
    """Keep rows for the chosen feedback: implicit keeps ratings >= threshold (all if 0)."""
    if feedback == "explicit" or threshold <= 0:
        return data
    kept = data.subset(data.ratings >= threshold)
    if len(kept) == 0:
        raise DataError(f"{data.name}: no rating >= threshold {threshold}; lower --threshold")
    return kept


def k_core(data: Interactions, k: int) -> Interactions:
    """Iteratively drop users and items with fewer than ``k`` interactions, then remap ids."""
    if k <= 1:
        return data
    mask = np.ones(len(data), dtype=bool)
    while True:
        u_counts = np.bincount(data.users[mask], minlength=data.n_users)
        i_counts = np.bincount(data.items[mask], minlength=data.n_items)
        keep = mask & (u_counts[data.users] >= k) & (i_counts[data.items] >= k)
        if keep.sum() == mask.sum():
            break
        mask = keep
    if not mask.any():
        raise DataError(f"{data.name}: no interactions survive a {k}-core filter; lower "
                        "--min-interactions")
    return remap(data.subset(mask))


def remap(data: Interactions) -> Interactions:
    """Drop ids with no interactions and renumber users and items to [0, n)."""
    u_used, users = np.unique(data.users, return_inverse=True)
    i_used, items = np.unique(data.items, return_inverse=True)
    return Interactions(
        users.astype(np.int64), items.astype(np.int64), data.ratings, data.timestamps,
        data.user_ids[u_used], data.item_ids[i_used],
        [data.titles[i] for i in i_used], [data.genres[i] for i in i_used],
        data.rating_range, data.name, data.synthetic, dict(data.cleaning),
        user_features=[data.user_features[u] for u in u_used] if data.user_features else [],
    )


def row_keys(data: Interactions, seed: int) -> np.ndarray:
    """A pseudo-random uint64 per row from its own (user id, item id) and ``seed`` only:
    adding or removing another row never changes it."""
    frame = pd.DataFrame({"u": data.user_ids[data.users].astype(str),
                          "i": data.item_ids[data.items].astype(str)})
    key = f"fedrec{seed:010d}"[-16:]
    return pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy()


def temporal_split(data: Interactions, mode: str, test_fraction: float, seed: int) -> Split:
    """Per-user split by time: each user's latest interactions go to test.

    Args:
        data: interactions.
        mode: ``"leave-last-out"`` (the last one), ``"fraction"`` (the last
            ``round(test_fraction * n_u)``, at least 1) or ``"random"`` (each rating to
            test with probability ``test_fraction``, decided by its own hash: independent
            of every other rating, as record-level DP's unit assumes).
        test_fraction: share held out in fraction and random mode.
        seed: breaks ties between equal timestamps (by each row's own hash, so one row
            more or less never reorders the others) and keys the random mode.

    In the time-based modes users with a single interaction keep it in train and every
    user keeps >= 1 train item.
    """
    keys = row_keys(data, seed)
    if mode == "random":
        is_test = keys < np.uint64(min(test_fraction, 1.0) * 2.0 ** 64)
        return Split(data.subset(~is_test), data.subset(is_test), implicit=True)
    order = np.lexsort((keys, data.timestamps, data.users))
    users = data.users[order]
    counts = np.bincount(users, minlength=data.n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(users)) - starts[users]  # position within the user's history
    if mode == "leave-last-out":
        n_test = np.minimum(1, counts - 1)
    else:
        n_test = np.clip(np.rint(test_fraction * counts), 1, None).astype(np.int64)
        n_test = np.minimum(n_test, counts - 1)
    is_test = np.zeros(len(data), dtype=bool)
    is_test[order] = pos >= (counts - n_test)[users]
    return Split(data.subset(~is_test), data.subset(is_test), implicit=True)


def split_by_membership(data: Interactions, is_test: np.ndarray) -> Split:
    """A split given by the caller (pre-split train/test files)."""
    if not is_test.any():
        raise DataError(f"{data.name}: the test file has no usable rows")
    return Split(data.subset(~is_test), data.subset(is_test), implicit=True)
