"""The DP popularity baseline: exact at epsilon = inf, one user moves it by at most 1."""

from __future__ import annotations

import numpy as np

from fedrec.baselines import dp_popularity_metrics, popularity_scores
from fedrec.config import RunConfig
from fedrec.data import load_split


def test_popularity_counts_have_user_sensitivity_one_and_noise_degrades_them() -> None:
    cfg = RunConfig.from_flat({"synthetic-users": 80, "synthetic-items": 60, "seed": 4})
    split = load_split(cfg.data)
    exact = popularity_scores(split, float("inf"), 1e-5, np.random.default_rng(0))
    users = split.train.users
    for u in range(5):  # removing one user's ratings moves the counts by L2 norm <= 1
        keep = users != u
        sub = split.train.subset(keep)
        without = np.bincount(sub.items, minlength=split.n_items,
                              weights=1 / np.sqrt(np.bincount(sub.users, minlength=80)[
                                  sub.users]))
        assert np.linalg.norm(exact - without) <= 1 + 1e-9
    noisy = popularity_scores(split, 0.3, 1e-5, np.random.default_rng(0))
    assert np.linalg.norm(noisy - exact) > 10  # sigma ~ 15 at epsilon 0.3
    # on a catalogue users have not mostly rated (with 60 items a random ranking already
    # scores near popularity, and one secret noise draw beat it once in CI)
    big = RunConfig.from_flat({"synthetic-users": 80, "synthetic-items": 300, "seed": 4})
    big_split = load_split(big.data)
    top = dp_popularity_metrics(big, big_split, float("inf"))
    weak = dp_popularity_metrics(big, big_split, 0.25)
    assert top["recall@20"] > 1.3 * weak["recall@20"]
