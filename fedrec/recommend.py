"""On-device recommendations: the node's user embedding + the last global shared model.

Only a client can do this: the server never holds user embeddings (they never leave
the node), so it cannot score items for a user.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.config import FEATURE_MODELS, RunConfig
from fedrec.errors import ConfigError
from fedrec.evaluate import model_inputs
from fedrec.features import model_features
from fedrec.federated import ClientData
from fedrec.model import build_model
from fedrec.state import ClientState


@dataclass
class Recommendation:
    """One recommended item with its score and a short explanation."""

    item: str
    title: str
    score: float
    because: list[str]  # titles of the user's past items closest to it
    feature: str = ""  # feature models: the item's genre (or "field=value" of a feature
    # file) the user liked most often
    feature_count: int = 0  # how many of the user's liked items have it

    def explanation(self) -> str:
        """'because you liked X and Y; you liked 5 Film-Noir titles' ('... 5 titles with
        director Mann' for a feature file's value), or empty."""
        parts = ["because you liked " + " and ".join(self.because)] if self.because else []
        if "=" in self.feature:
            field, value = self.feature.split("=", 1)
            parts.append(f"you liked {self.feature_count} titles with {field} {value}")
        elif self.feature:
            parts.append(f"you liked {self.feature_count} {self.feature} titles")
        return "; ".join(parts)


def liked_cut(data: ClientData, cfg: RunConfig) -> float:
    """The rating from which an item counts as liked: the top quarter of the rating scale
    (4 on 1-5), at least ``threshold``; any rating for implicit-only data."""
    lo, hi = data.train.rating_range
    cut = lo + 0.75 * (hi - lo) if math.isfinite(hi) and hi > lo else -math.inf
    return max(cut, cfg.data.threshold or -math.inf)


def recommend(cfg: RunConfig, data: ClientData, state: ClientState,
              shared: dict[str, torch.Tensor], user: str, k: int = 10,
              explain: int = 2, at: float | None = None) -> list[Recommendation]:
    """Top-``k`` unseen items for ``user`` (an original user id held by this node);
    a model that reads context scores them for the moment ``at`` (Unix seconds; now).

    Explanations: the user's highly rated training items (``liked_cut``) with the highest
    cosine similarity to the recommended item's embedding; for models that read features
    (deepfm, widedeep), also the recommended item's genre that most of the user's liked
    items share (when at least two and a quarter of them do).
    """
    if user not in data.user_ids:
        shown = ", ".join(data.user_ids[:5])
        raise ConfigError(f"user {user!r} is not held by this node (its users: {shown}"
                          f"{', ...' if data.n_users > 5 else ''})")
    if not state.local:
        raise ConfigError("this node has not trained yet: no user embedding")
    uid = data.user_ids.index(user)
    model = build_model(cfg.model, data.n_users, data.n_items, offset=data.offset,
                        features=model_features(cfg, data.train))
    model.load_state_dict({**shared, **state.local}, strict=True)
    model.eval()
    served = model_inputs(model, np.array([uid]), np.array([time.time() if at is None else at]))
    scores = model.score_all(served)[0].numpy().astype(np.float64)
    seen = np.zeros(data.n_items, dtype=bool)
    seen[data.train.items[data.train.users == uid]] = True
    seen[data.test.items[data.test.users == uid]] = True
    scores[seen] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    top = top[np.isfinite(scores[top])]
    vectors = model.item_vectors().numpy()
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    liked = data.train.items[(data.train.users == uid)
                             & (data.train.ratings >= liked_cut(data, cfg))]
    titles = data.train.titles

    def name(i: int) -> str:
        return titles[i] or str(data.train.item_ids[i])

    def genres_of(i: int) -> set[str]:
        return {g.strip() for g in data.train.genres[i].split("|") if g.strip()}

    genres = [genres_of(j) for j in liked] if cfg.model.model in FEATURE_MODELS else []
    out = []
    for i in top:
        because: list[str] = []
        if len(liked) and explain > 0:
            sims = unit[liked] @ unit[i]
            because = [name(int(j)) for j in liked[np.argsort(-sims)[:explain]]]
        rec = Recommendation(str(data.train.item_ids[i]), name(int(i)), float(scores[i]),
                             because)
        counts = {g: sum(g in mine for mine in genres) for g in genres_of(int(i))}
        if counts:
            g, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
            if n >= max(2, 0.25 * len(genres)):
                rec.feature, rec.feature_count = g, n
        out.append(rec)
    return out
