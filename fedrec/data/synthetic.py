"""Deterministic synthetic ratings with MovieLens-like statistics.

Users and items get low-rank latent factors; each user's activity and each item's
popularity are long-tailed (log-normal and Zipf). A user picks items with probability
proportional to popularity x exp(affinity), so the data has both a popularity signal and
a personal one; ratings on a 1-5 scale follow the affinity. Items get titles and genres
(the genre follows the item's strongest latent factor), so titles can be shown.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.data.interactions import Interactions, build_interactions

GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller")
_ADJ = ("Silent", "Golden", "Last", "Hidden", "Broken", "Crimson", "Endless", "Frozen",
        "Lonely", "Midnight", "Secret", "Wild", "Distant", "Electric", "Iron", "Paper")
_NOUN = ("River", "Empire", "Garden", "Horizon", "Machine", "Letter", "Harbor", "Kingdom",
         "Mirror", "Orchard", "Station", "Voyage", "Winter", "Signal", "Lantern", "Circus")


def generate_synthetic(
    n_users: int = 600,
    n_items: int = 1000,
    *,
    rank: int = 8,
    mean_activity: float = 60.0,
    seed: int = 0,
) -> Interactions:
    """Generate a dataset; the same arguments always give the same data.

    Args:
        n_users, n_items: sizes.
        rank: latent dimension of the preference structure.
        mean_activity: mean interactions per user (log-normal, at least 10).
        seed: random seed.

    >>> d = generate_synthetic(50, 80, seed=1)
    >>> d.synthetic, d.n_users, d.n_items <= 80
    (True, 50, True)
    """
    rng = np.random.default_rng(seed)
    user_f = rng.normal(0, 1, (n_users, rank))
    item_f = rng.normal(0, 1, (n_items, rank))
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    rng.shuffle(popularity)
    log_pop = np.log(popularity)
    sigma = 0.9
    activity = rng.lognormal(np.log(mean_activity) - sigma**2 / 2, sigma, n_users)
    activity = np.clip(activity.round(), 10, max(10, n_items // 2)).astype(int)
    affinity = user_f @ item_f.T / np.sqrt(rank)  # [users, items]
    users, items, ratings, times = [], [], [], []
    t0 = 1_000_000_000
    for u in range(n_users):
        # Gumbel top-k = sampling without replacement proportional to exp(logits)
        logits = log_pop + 1.5 * affinity[u] + rng.gumbel(size=n_items)
        chosen = np.argpartition(-logits, activity[u])[: activity[u]]
        chosen = chosen[np.argsort(-logits[chosen])]
        score = 3.4 + 1.2 * affinity[u, chosen] + rng.normal(0, 0.6, len(chosen))
        users.append(np.full(len(chosen), u))
        items.append(chosen)
        ratings.append(np.clip(np.rint(score), 1, 5))
        start = t0 + rng.integers(0, 30_000_000)
        times.append(start + np.sort(rng.integers(0, 20_000_000, len(chosen))))
    genre_of = np.argmax(item_f[:, : min(rank, len(GENRES))], axis=1)
    second = rng.integers(0, len(GENRES), n_items)
    titles = [f"The {_ADJ[rng.integers(len(_ADJ))]} {_NOUN[rng.integers(len(_NOUN))]} "
              f"({1950 + int(rng.integers(0, 70))})" for _ in range(n_items)]
    meta = pd.DataFrame({
        "item": [str(i) for i in range(n_items)],
        "title": titles,
        "genres": ["|".join(dict.fromkeys((GENRES[g], GENRES[s])))
                   for g, s in zip(genre_of, second)],
    })
    # user features: a segment that follows the user's taste (their strongest of the first
    # factors) and a coarse activity level, drawn from nothing else
    segment = np.argmax(user_f[:, : min(rank, 4)], axis=1)
    level = np.digitize(activity, np.quantile(activity, [1 / 3, 2 / 3]))
    user_meta = pd.DataFrame({
        "user": [str(u) for u in range(n_users)],
        "features": [f"segment={s}|activity={('low', 'mid', 'high')[a]}"
                     for s, a in zip(segment, level)],
    })
    df = pd.DataFrame({
        "user": np.concatenate(users).astype(str),
        "item": np.concatenate(items).astype(str),
        "rating": np.concatenate(ratings).astype(np.float64),
        "timestamp": np.concatenate(times).astype(np.float64),
    })
    df["line"] = np.arange(1, len(df) + 1)
    return build_interactions(df, source="synthetic", name="synthetic", rating_range=(1, 5),
                              item_meta=meta, user_meta=user_meta, synthetic=True)
