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
import torch

from fedrec import privacy
from fedrec.config import FedConfig, RunConfig


def check_rows(rows: np.ndarray, arrays: dict[str, np.ndarray],
               current: dict[str, np.ndarray], item_keys: set[str]) -> None:
    """An update given as rows names distinct rows of the catalogue in increasing order,
    and holds exactly those rows of each item array.

    Raises:
        ValueError: saying what is wrong.
    """
    rows = np.asarray(rows)
    n = min((current[k].shape[0] for k in item_keys), default=0)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or (
            len(rows) and (rows[0] < 0 or rows[-1] >= n or (np.diff(rows) <= 0).any())):
        raise ValueError(f"an update's rows must be increasing integers in [0, {n})")
    for key in item_keys:
        want = (len(rows),) + current[key].shape[1:]
        if arrays[key].shape != want:
            raise ValueError(f"{key}: {arrays[key].shape} for {len(rows)} rows; expected "
                             f"{want}")


@dataclass
class Update:
    """One client's contribution."""

    arrays: dict[str, np.ndarray]
    weight: float  # number of training examples
    touched: np.ndarray | None = None  # [n_items] 0/1, item rows trained on
    # sorted item rows the item arrays hold (in-process batched engine); every other
    # row is the current value. None: whole arrays
    rows: np.ndarray | None = None


class MeanAccumulator:
    """Weighted FedAvg, one update at a time, in memory the size of one model.

    ``add`` folds an update into float64 running sums and keeps nothing of it, so a
    round of thousands of clients never holds their updates together. Item rows are
    averaged over the clients that trained them when every update added has a mask.
    """

    def __init__(self, current: dict[str, np.ndarray], item_keys: Sequence[str]) -> None:
        self.current = current
        self.count, self.weight, self.masked = 0, 0.0, True
        self.unit = True  # every update added weighs 1
        # weighted and (for example counts of 0) unweighted sums, whole arrays and per row
        self.sums = {k: np.zeros((2,) + v.shape, np.float64) for k, v in current.items()}
        self.item_keys = set(item_keys) & set(current)
        # updates given as rows (``Update.rows``): their other item rows are ``current``,
        # summed once at the end: (weighted, unweighted) totals of those updates
        self.implicit = np.zeros(2)
        self.rows = {k: np.zeros((2,) + current[k].shape, np.float64) for k in item_keys}
        self.dens = {k: np.zeros((2, current[k].shape[0]), np.float64) for k in item_keys}

    def add(self, update: Update) -> None:
        """Fold one valid update (same keys and shapes as ``current``; item arrays of
        ``update.rows`` rows if it gives them) into the sums; a malformed one is refused
        (ValueError) before anything is added."""
        given = update.rows
        masked = self.masked and update.touched is not None
        m = update.touched.astype(np.float64) if masked else None  # type: ignore[union-attr]
        on = np.flatnonzero(m) if m is not None else None  # rows with a nonzero mask
        at = on  # where the masked rows sit in the item arrays
        if given is not None:
            check_rows(given, update.arrays, self.current, self.item_keys)
            if on is not None:
                at = np.minimum(np.searchsorted(given, on), max(len(given) - 1, 0))
                if len(on) and not (len(given) and np.array_equal(given[at], on)):
                    raise ValueError("an update's touched rows are not among its rows")
        w = float(update.weight)
        self.unit = self.unit and w == 1.0
        self.count += 1
        self.weight += w
        self.masked = masked
        if given is not None:  # item rows given as their change from current
            self.implicit += (w, 1.0)
        for key in self.current:  # keys outside the global model are never aggregated
            value = update.arrays[key].astype(np.float64)
            item = given is not None and key in self.item_keys
            x = value
            if given is not None:  # its current part is summed at the end (implicit)
                x = value - (self.current[key][given] if item else self.current[key])
            where = given if item else slice(None)
            self.sums[key][0][where] += w * x
            self.sums[key][1][where] += x
            if key in self.rows and m is not None and on is not None:
                mx = value[at] * m[on].reshape((-1,) + (1,) * (x.ndim - 1))
                self.rows[key][0][on] += w * mx
                self.rows[key][1][on] += mx
                self.dens[key][0][on] += w * m[on]
                self.dens[key][1][on] += m[on]

    def add_noise(self, noise: dict[str, np.ndarray]) -> None:
        """Add ``noise`` to the sums of unmasked updates that all weigh the same (the
        noise the updates added still owed: ``fedrec.batched.owed_noise``)."""
        if self.masked or not self.unit:
            raise ValueError("noise is added to sums of unmasked updates of weight 1")
        for key, value in noise.items():
            self.sums[key] += value.astype(np.float64)

    def average(self) -> dict[str, np.ndarray]:
        """The (float64) average; ``current`` when nothing was added."""
        if not self.count:
            return {k: v.astype(np.float64) for k, v in self.current.items()}
        i = 0 if self.weight > 0 else 1  # no example counts: every update weighs the same
        total = self.weight if i == 0 else float(self.count)
        out = {}
        for key, cur in self.current.items():
            if key in self.rows and self.masked:
                den = self.dens[key][i].reshape((-1,) + (1,) * (cur.ndim - 1))
                out[key] = np.where(den > 0, self.rows[key][i] / np.maximum(den, 1e-300),
                                    cur)
            else:
                whole = self.sums[key][i] + self.implicit[i] * cur.astype(np.float64)
                out[key] = whole / total
        return out

    def step(self, server_lr: float = 1.0) -> dict[str, np.ndarray]:
        """``current + server_lr * (average - current)`` in ``current``'s dtypes."""
        avg = self.average()
        return {k: (cur + server_lr * (avg[k] - cur)).astype(cur.dtype)
                for k, cur in self.current.items()}


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
    acc = MeanAccumulator(current, item_keys)
    for u in updates:
        acc.add(u)
    return acc.step(server_lr)


class ServerOptimizer:
    """The server's step from the averaged update, with state across rounds.

    ``server-opt = "avg"``: ``x + server_lr * (avg - x)`` (FedAvg at ``server-lr`` 1).
    ``"adam"``: FedAdam (Reddi et al., 2021) on the pseudo-gradient ``avg - x``, betas
    0.9 / 0.99, tau 1e-3, step ``server-lr``. Its moments are part of a server
    checkpoint (``state_dict``).
    """

    BETA1, BETA2, TAU = 0.9, 0.99, 1e-3

    def __init__(self, fed: FedConfig, item_keys: Sequence[str]) -> None:
        if fed.server_opt == "auto" or fed.server_lr <= 0:
            raise ValueError("server-opt 'auto' / server-lr 0 are unresolved: use a "
                             "RunConfig's fed section")
        self.kind, self.lr = fed.server_opt, fed.server_lr
        self.item_keys = list(item_keys)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, updates: Sequence[Update], current: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """New global arrays from this round's valid updates."""
        acc = MeanAccumulator(current, self.item_keys)
        for u in updates:
            acc.add(u)
        return self.step_accumulated(acc)

    def step_accumulated(self, acc: MeanAccumulator) -> dict[str, np.ndarray]:
        """New global arrays from updates already folded into ``acc`` (streaming)."""
        current = acc.current
        if not acc.count:
            return {k: v.copy() for k, v in current.items()}
        if self.kind == "avg":
            return acc.step(self.lr)
        return self.step_from_average(acc.step(1.0), current)

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


class ClippedSum:
    """User-level DP: the sum of client updates, each clipped to L2 norm ``clip``.

    Streaming like ``MeanAccumulator``. The clip is applied to the whole update (every
    shared key, taken in ``current``'s key order, so a reply cannot dodge it by ordering
    its arrays differently). ``noisy_mean`` adds Gaussian noise of std ``z * clip`` to the
    sum and divides by a fixed denominator (the number of clients sampled), which keeps
    one client's influence at ``clip / denominator`` whether or not others drop out.
    """

    def __init__(self, current: dict[str, np.ndarray], clip: float,
                 item_keys: Sequence[str] = ()) -> None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.current, self.clip, self.count = current, float(clip), 0
        # the keys an update given as rows holds rows of
        self.item_keys = set(item_keys) & set(current)
        self.sums = {k: np.zeros(v.shape, np.float64) for k, v in current.items()}

    def add(self, arrays: dict[str, np.ndarray], rows: np.ndarray | None = None) -> float:
        """Fold one update in (clipped); returns its norm before clipping. ``rows``: the
        item arrays hold only these rows (``Update.rows``); the others did not change."""
        if rows is not None:
            check_rows(rows, arrays, self.current, self.item_keys)
        where = {k: rows if rows is not None and k in self.item_keys else slice(None)
                 for k in self.current}
        deltas = {k: arrays[k].astype(np.float64) - cur[where[k]].astype(np.float64)
                  for k, cur in self.current.items()}
        norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        for k, d in deltas.items():
            self.sums[k][where[k]] += scale * d
        self.count += 1
        return norm

    def noisy_mean(self, z: float, denominator: int, generator: torch.Generator
                   ) -> dict[str, np.ndarray]:
        """``current + (sum + N(0, (z clip)^2 I)) / denominator`` in float64."""
        if denominator < 1:
            raise ValueError(f"denominator must be >= 1, got {denominator}")
        out = {}
        for k, cur in self.current.items():
            noise = privacy.secure_normal(cur.shape, generator).numpy()
            out[k] = cur.astype(np.float64) + (self.sums[k] + z * self.clip * noise) / denominator
        return out


class UserLevelDP:
    """Central user-level DP-FedAvg: noise on the clipped sum, accounted across rounds.

    ``history`` holds one ``(z, 1, rounds)`` accountant entry per noise level used (the
    server checkpoint keeps it), so epsilon is composed from the rounds actually run, also
    after a resume that changed the plan. Accounting is without subsampling
    amplification: exact at fraction 1, conservative below.
    """

    def __init__(self, cfg: RunConfig, history: Sequence[tuple[float, float, int]] = ()
                 ) -> None:
        self.cfg = cfg
        self.history: privacy.History = [tuple(h) for h in history]  # type: ignore[misc]

    def epsilon(self) -> float:
        """Epsilon of the rounds noised so far, per user (client), at ``delta``."""
        return privacy.epsilon_of(self.history, self.cfg.privacy.delta, "rdp")

    def step(self, clipped: ClippedSum, done: int, expected_clients: int,
             server_opt: ServerOptimizer) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """New global arrays for round ``done`` and the facts for its row.

        z is calibrated on the budget left for rounds ``done``..``rounds``; when nothing
        is left the model is unchanged (``user-exhausted``).
        """
        p, current = self.cfg.privacy, clipped.current
        try:
            z = privacy.user_level_noise(p, self.history, self.cfg.fed.rounds - done + 1)
        except privacy.BudgetError:
            return ({k: v.copy() for k, v in current.items()},
                    {"user-epsilon": self.epsilon(), "user-exhausted": 1})
        gen = privacy.dp_generator(p, done, privacy.USER_NOISE)
        noisy = clipped.noisy_mean(z, max(expected_clients, clipped.count), gen)
        self.history = privacy.add_entry(self.history, (z, 1.0, 1))
        new = server_opt.step_from_average(noisy, current)
        return new, {"user-noise-multiplier": z, "user-epsilon": self.epsilon()}
