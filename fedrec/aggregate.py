"""Server-side aggregation of shared parameters (numpy; no Flower).

Weighted FedAvg over the replies' shared arrays, weights = training examples. Without
DP, item-indexed tables can be aggregated row by row over the clients that trained each
row ("touched" weighting): plain FedAvg would average a client's untouched rows (its
copy of the global row) into the result and dilute sparse updates. Rows no client
touched keep their global value. The touched mask a client sends reveals which items it
trained on, its rated items mixed with its sampled negatives; without DP, the update
itself already reveals this (an untouched row comes back unchanged when weight-decay is
0). With DP, no mask is sent and every row is averaged: all rows carry noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedrec.config import FedConfig


@dataclass
class Update:
    """One client's contribution."""

    arrays: dict[str, np.ndarray]
    weight: float  # number of training examples
    touched: np.ndarray | None = None  # [n_items] 0/1, item rows trained on


def aggregate(updates: Sequence[Update], current: dict[str, np.ndarray],
              item_keys: Sequence[str], server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """New global shared arrays.

    Args:
        updates: valid client updates (same keys and shapes as ``current``).
        current: the global arrays the clients received.
        item_keys: item-indexed keys, aggregated per row when every update has a mask.
        server_lr: step along the averaged update, ``current + server_lr * (avg - current)``
            (1.0 is FedAvg; larger values speed up many-small-client federations).

    Returns:
        Aggregated arrays (``current`` unchanged if there are no updates).
    """
    if not updates:
        return {k: v.copy() for k, v in current.items()}
    weights = np.array([u.weight for u in updates], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    per_row = all(u.touched is not None for u in updates)
    out: dict[str, np.ndarray] = {}
    for key, cur in current.items():
        stack = np.stack([u.arrays[key] for u in updates]).astype(np.float64)
        if per_row and key in item_keys:
            mask = np.stack([u.touched for u in updates]).astype(np.float64)  # [C, items]
            w = mask * weights[:, None]
            total = w.sum(0)  # [items]
            w = w.reshape(w.shape + (1,) * (stack.ndim - 2))
            num = (stack * w).sum(0)
            den = total.reshape(total.shape + (1,) * (stack.ndim - 2))
            avg = np.where(den > 0, num / np.maximum(den, 1e-300), cur)
        else:
            w = (weights / weights.sum()).reshape((-1,) + (1,) * (stack.ndim - 1))
            avg = (stack * w).sum(0)
        out[key] = (cur + server_lr * (avg - cur)).astype(cur.dtype)
    return out


class ServerOptimizer:
    """The server's step from the averaged update, with state across rounds.

    ``server-opt = "avg"``: ``x + server_lr * (avg - x)`` (FedAvg at ``server-lr`` 1).
    ``"adam"``: FedAdam (Reddi et al., 2021) on the pseudo-gradient ``avg - x``, betas
    0.9 / 0.99, tau 1e-3, step ``server-lr``. Its moments are part of a server
    checkpoint (``state_dict``).
    """

    BETA1, BETA2, TAU = 0.9, 0.99, 1e-3

    def __init__(self, fed: FedConfig, item_keys: Sequence[str]) -> None:
        self.kind, self.lr = fed.server_opt, fed.server_lr
        self.item_keys = list(item_keys)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, updates: Sequence[Update], current: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """New global arrays from this round's valid updates."""
        if not updates:
            return {k: v.copy() for k, v in current.items()}
        if self.kind == "avg":
            return aggregate(updates, current, self.item_keys, self.lr)
        return self.step_from_average(aggregate(updates, current, self.item_keys, 1.0),
                                      current)

    def step_from_average(self, avg: dict[str, np.ndarray], current: dict[str, np.ndarray]
                          ) -> dict[str, np.ndarray]:
        """The server step given an already aggregated model ``avg`` (robust rules)."""
        if self.kind == "avg":
            return {k: (x + self.lr * (avg[k].astype(np.float64) - x)).astype(x.dtype)
                    for k, x in current.items()}
        out = {}
        for k, x in current.items():
            g = avg[k].astype(np.float64) - x
            m = self.m.get(k, np.zeros_like(g))
            v = self.v.get(k, np.zeros_like(g))
            self.m[k] = m = self.BETA1 * m + (1 - self.BETA1) * g
            self.v[k] = v = self.BETA2 * v + (1 - self.BETA2) * g * g
            out[k] = (x + self.lr * m / (np.sqrt(v) + self.TAU)).astype(x.dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Moments (FedAdam) for a checkpoint; empty for FedAvg."""
        return {**{f"m/{k}": v for k, v in self.m.items()},
                **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore moments saved by ``state_dict``."""
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v/")}


def update_norm(arrays: dict[str, np.ndarray], current: dict[str, np.ndarray]) -> float:
    """L2 norm of a client's update (its arrays minus the global ones), all keys."""
    return float(np.sqrt(sum(np.sum((arrays[k].astype(np.float64) - v) ** 2)
                             for k, v in current.items())))


def clip_update(arrays: dict[str, np.ndarray], current: dict[str, np.ndarray],
                max_norm: float) -> dict[str, np.ndarray]:
    """Scale the update down to ``max_norm`` (unchanged when already within it)."""
    norm = update_norm(arrays, current)
    if norm <= max_norm or norm == 0:
        return arrays
    scale = max_norm / norm
    return {k: (v + scale * (arrays[k].astype(np.float64) - v)).astype(v.dtype)
            for k, v in current.items()}
