"""Non-personalised reference points: item popularity, with user-level DP.

Every private model should beat the ranking anyone could release at the same epsilon:
item counts. Each user contributes ``1/sqrt(n_u)`` to each of the ``n_u`` items they
rated in training (an L2 norm of 1, whatever ``n_u``), the sums get Gaussian noise of std
sigma calibrated to (epsilon, delta) for one release, and every user is recommended the
items with the largest noisy sums among those they have not rated. Unit of privacy: one
user's whole data (add/remove), as user-level and distributed DP.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedrec import privacy
from fedrec.config import RunConfig
from fedrec.data import Split
from fedrec.evaluate import full_ranking_counts
from fedrec.metrics import finalize


class FixedScores:
    """One score per item for every user, shaped like a model for the evaluator."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = torch.from_numpy(scores.astype(np.float32))
        self.n_items = len(scores)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(len(users), -1).clone()


def popularity_scores(split: Split, epsilon: float, delta: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Item scores ``[n_items]``: per-user-normalised counts, noised for (epsilon, delta)
    per user when epsilon is finite (exact counts at epsilon = inf)."""
    tr = split.train
    per_user = np.bincount(tr.users, minlength=split.n_users).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(per_user[tr.users], 1.0))
    counts = np.bincount(tr.items, weights=weights, minlength=split.n_items)
    if math.isinf(epsilon):
        return counts
    sigma = privacy.calibrate_remaining(epsilon, delta, [], 1.0, 1)
    return counts + sigma * rng.standard_normal(split.n_items)


def dp_popularity_metrics(cfg: RunConfig, split: Split, epsilon: float) -> dict[str, float]:
    """Full-ranking metrics of the (DP) popularity ranking on ``split``'s test data.

    Noise comes from OS entropy unless ``insecure-noise-seed`` is set (experiments).
    """
    p = cfg.privacy
    rng = np.random.default_rng(privacy.dp_seed(p, cfg.data.seed, privacy.USER_NOISE))
    model = FixedScores(popularity_scores(split, epsilon, p.delta, rng))
    counts = full_ranking_counts(model, split.train, split.test, cfg.eval.ks)  # type: ignore[arg-type]
    return finalize(counts, cfg.eval.ks)
