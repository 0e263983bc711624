"""Distributed user-level DP: integer updates with Skellam noise shares, summed exactly.

Each client clips its whole shared update to L2 norm ``user-clip`` (C) and its
evaluation counts to ``eval-clip`` (C_e), scales both to integers (the update to norm
``2^ddp-bits``, the counts to half that), rounds at random (unbiased; the rounding moves
the vector by at most sqrt(dim) in L2), and adds its share of Skellam noise
``Sk(mu_client, mu_client)`` per coordinate. Secure aggregation (Flower's SecAgg+, set up
so that its quantisation is the identity on these integers) gives the server only the
exact integer sum. A sum of independent Skellam variables is Skellam, so the sum carries
``Sk(mu_total)`` with ``mu_total = survivors x mu_client``: the server never sees less
noise than the accountant assumes while at least ``(1 - ddp-dropout)`` of the sampled
clients stay honest and online. Accounting: the Skellam mechanism's RDP
(``fedrec.privacy.skellam_rdp``) with the integer-domain sensitivities, composed over
every release; unit of privacy: one client's whole data (one user in cross-device mode),
zero-out adjacency (the user's data replaced by none, the device still taking part).

Nothing here imports Flower: ``fedrec.inprocess`` sums the same integers directly,
``server/secagg.py`` sums them through SecAgg+.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedrec import privacy
from fedrec.config import RunConfig
from fedrec.errors import PrivacyError

# Per-coordinate bound of what a client sends: SecAgg+'s clipping range is set to this
# and its quantisation range to twice it, which makes SecAgg+'s quantisation the identity
# on integers in [-CLIENT_BOUND, CLIENT_BOUND]; the modulus leaves room for 2^18 clients.
CLIENT_BOUND = 2 ** 29
MODULUS = 2 ** 48
EVAL_SHARE = 0.5  # integer norm of the counts relative to the update's
PRIOR_KEY = "item_bias.weight"  # the table the popularity prior initialises (MF)
PRIOR_SCALE = 1.0  # item biases start at this many standard deviations of popularity


@dataclass(frozen=True)
class DDPPlan:
    """One round's distributed-DP parameters (all public: derived from the config)."""

    clip: float  # C: L2 clip of a client's shared update
    eval_clip: float  # C_e: L2 clip of a client's evaluation counts
    l_update: float  # integer L2 norm of a clipped update (2^ddp-bits)
    l_eval: float  # integer L2 norm of clipped counts
    dim: int  # integers per client: update coordinates + counts
    n_min: int  # honest clients assumed to survive (noise shares that reach the sum)
    mu_client: float  # Skellam parameter of one client's share

    @property
    def l2(self) -> float:
        """L2 sensitivity in the integer domain (after randomized rounding)."""
        return math.hypot(self.l_update, self.l_eval) + math.sqrt(self.dim)

    @property
    def l1(self) -> float:
        """L1 sensitivity: ||x||_1 <= min(||x||_2^2, sqrt(dim) ||x||_2) for integers."""
        return min(self.l2 ** 2, math.sqrt(self.dim) * self.l2)

    @property
    def mu_total(self) -> float:
        """Skellam parameter of the noise in the sum of ``n_min`` shares."""
        return self.n_min * self.mu_client

    def entry(self, survivors: int) -> tuple[float, float, float, int]:
        """The accountant entry of one release that ``survivors`` honest shares reached."""
        return (survivors * self.mu_client, self.l2, self.l1, 1)


def min_survivors(cfg: RunConfig, sampled: int) -> int:
    """Clients whose noise the guarantee counts on: (1 - ddp-dropout) of those sampled."""
    return max(1, math.ceil((1.0 - cfg.privacy.ddp_dropout) * sampled - 1e-9))


def plan_round(cfg: RunConfig, *, sampled: int, dim: int, history: privacy.SkellamHistory,
               releases_left: int, clip: float | None = None,
               prior_weight: float = 0.0) -> DDPPlan:
    """The plan for the next release.

    ``user-target-epsilon`` > 0: ``mu_total`` is calibrated so that ``history`` plus
    ``releases_left`` releases spend at most the target (a resume spreads what remains).
    Else ``user-noise-multiplier`` z sets ``mu_total = (z l2)^2 / 2`` (the variance of a
    Gaussian of std z l2). ``prior_weight`` w > 0 adds one more release with ``mu / w``
    (the prior, which then costs about w releases' worth of the budget).

    Raises:
        BudgetError: the budget is spent.
    """
    p = cfg.privacy
    l_u = float(2 ** p.ddp_bits)
    base = DDPPlan(clip or p.user_clip, eval_clip(cfg), l_u, EVAL_SHARE * l_u, dim,
                   min_survivors(cfg, sampled), 0.0)
    if p.user_target_epsilon > 0:
        scaled = [(1 / prior_weight, base.l2, base.l1, 1)] if prior_weight > 0 else []
        mu_total = privacy.calibrate_skellam(p.user_target_epsilon, p.delta, history,
                                             base.l2, base.l1, max(1, releases_left), scaled)
    else:
        mu_total = (p.user_noise_multiplier * base.l2) ** 2 / 2
    return DDPPlan(base.clip, base.eval_clip, base.l_update, base.l_eval, dim, base.n_min,
                   mu_total / base.n_min)


def client_plan(cfg: RunConfig, *, dim: int, n_min: int, mu_client: float,
                prior: bool = False) -> DDPPlan:
    """A client's copy of the server's plan: its own clip and scales, the server's share
    size (``mu_client``) and honest minimum (``n_min``), which the client checks against
    its own ledger before it sends anything. ``prior``: the item-count release (its
    vector has norm 1 per user, clipped to 1)."""
    l_u = float(2 ** cfg.privacy.ddp_bits)
    return DDPPlan(1.0 if prior else cfg.privacy.user_clip, eval_clip(cfg), l_u,
                   EVAL_SHARE * l_u, dim, int(n_min), float(mu_client))


def prior_vector(train_users: np.ndarray, train_items: np.ndarray, n_items: int
                 ) -> np.ndarray:
    """A client's item-count contribution: ``1/sqrt(n_u)`` for each item a user rated
    (L2 norm 1 per user); ``[n_items]``."""
    per_user = np.bincount(train_users).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(per_user[train_users], 1.0))
    return np.bincount(train_items, weights=weights, minlength=n_items)


def secagg_shares(n: int, dropout: float, risk: float = 1e-3) -> tuple[int, int]:
    """SecAgg+ (num_shares k, reconstruction_threshold t) for ``n`` clients.

    Each client's secrets are shared among k clients (itself included) and t > k/2 of them
    are needed to unmask; a round fails if some client keeps fewer than t live holders.
    The smallest odd k with ``n P(Binomial(k, 1 - dropout) < t) <= risk`` (a union bound;
    k = n when none is smaller): cost grows with k (t^2 per reconstruction), so k stays
    O(log n) rather than n.
    """
    if n <= 3:
        return n, max(1, n // 2 + 1)
    for k in range(3, n + 1, 2):
        t = k // 2 + 1
        alive = 1.0 - dropout
        fail = sum(math.comb(k, j) * alive ** j * (1 - alive) ** (k - j) for j in range(t))
        if n * fail <= risk:
            return k, t
    return n, n // 2 + 1


def eval_clip(cfg: RunConfig) -> float:
    """``eval-clip``, else sqrt(m) for the m counts of one user (each at most 1)."""
    return cfg.privacy.eval_clip or math.sqrt(len(count_keys(cfg)))


def count_keys(cfg: RunConfig) -> list[str]:
    """The evaluation counts a client sends in distributed mode, in a fixed order."""
    from fedrec import keys

    out = [keys.NUM_USERS]
    for k in cfg.eval.ks:
        out += [keys.sum_key(name, k) for name in keys.RANKING_METRICS]
    return out


def _clip(x: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x * (bound / norm) if norm > bound else x


def encode(update: np.ndarray, counts: np.ndarray, plan: DDPPlan,
           rng: np.random.Generator, *, share: bool = True) -> np.ndarray:
    """A client's integers: clipped, scaled, randomly rounded update and counts + its
    Skellam share. ``rng`` must be secret (OS-seeded) outside experiments.

    ``share=False`` leaves the share out, for a simulation that adds the survivors'
    shares to the sum as one draw (``skellam_shares``); nothing deployed does that. The
    bound below then sees no noise (a share's std is sqrt(2 mu), far inside 2^29 for
    the plans ``plan_round`` makes; a deployed client checks it with its share).

    Raises:
        PrivacyError: a value exceeds what secure aggregation can sum exactly.
    """
    x = np.concatenate([_clip(update.astype(np.float64), plan.clip) * (plan.l_update
                                                                        / plan.clip),
                        _clip(counts.astype(np.float64), plan.eval_clip) * (plan.l_eval
                                                                             / plan.eval_clip)])
    if len(x) != plan.dim:
        raise ValueError(f"expected {plan.dim} values, got {len(x)}")
    low = np.floor(x)
    frac = x - low
    if share:  # E[rounded] = x, |rounded - x| < 1; then the client's Skellam share
        out = (low + (rng.random(x.shape) < frac)).astype(np.int64)
        out += skellam_shares(plan, 1, rng)
    else:  # the same rounding, drawn only where there is a fraction (sparse updates)
        rounded = low.copy()
        at = np.flatnonzero(frac)
        rounded[at] += rng.random(len(at)) < frac[at]
        out = rounded.astype(np.int64)
    if np.abs(out).max(initial=0) > CLIENT_BOUND:
        raise PrivacyError("a distributed-DP value exceeds the secure-sum bound 2^29; lower "
                           "ddp-bits")
    return out


def skellam_shares(plan: DDPPlan, n: int, rng: np.random.Generator) -> np.ndarray:
    """The sum of ``n`` clients' Skellam shares, ``Sk(n mu_client)`` per coordinate (a sum
    of independent Skellam variables is Skellam: one draw for any number of clients)."""
    mu = n * plan.mu_client
    return (rng.poisson(mu, plan.dim) - rng.poisson(mu, plan.dim)).astype(np.int64)


def decode(total: np.ndarray, plan: DDPPlan, update_dim: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of clipped updates, summed counts) in real units from the integer sum."""
    total = np.asarray(total, dtype=np.float64)
    return (total[:update_dim] * (plan.clip / plan.l_update),
            total[update_dim:] * (plan.eval_clip / plan.l_eval))


def centred(values: np.ndarray, modulus: int = MODULUS) -> np.ndarray:
    """The centred representative of integers modulo ``modulus``."""
    r = np.mod(values.astype(np.int64), modulus)
    return np.where(r >= modulus // 2, r - modulus, r)


class DDPServer:
    """The server's side of distributed DP: plans each release, decodes the secure sum,
    takes the server step and accounts epsilon from the shares that actually arrived.

    A run of R rounds makes up to R + 2 releases: with ``ddp-prior`` (MF), release 0
    carries each client's item counts (norm 1 per user), from which the item biases
    start, so the model begins at the DP popularity ranking (it gets ``ddp-prior-weight``
    rounds' worth of the budget: its noise parameter is mu / weight); round r carries the clients'
    updates and the evaluation counts of the model they received (w_{r-1}); a last,
    evaluation-only release measures w_R. ``history`` (Skellam entries) is part of the
    server checkpoint.
    """

    def __init__(self, cfg: RunConfig, update_dim: int, n_items: int,
                 history: privacy.SkellamHistory | None = None,
                 prior: bool = False) -> None:
        self.cfg = cfg
        self.update_dim, self.n_items = update_dim, n_items
        self.dim = update_dim + len(count_keys(cfg))
        self.prior = prior
        self.history: privacy.SkellamHistory = list(history or [])

    def plan(self, sampled: int, release: int) -> DDPPlan:
        """The plan of release ``release`` (0 the prior, 1..R training rounds, R + 1 the
        final evaluation) for ``sampled`` clients. Every release gets the same share
        size, calibrated for the largest sensitivity. Raises BudgetError when nothing is
        left."""
        left = self.cfg.fed.rounds + 2 - release  # this release and every later one
        weight = self.cfg.privacy.ddp_prior_weight
        if release > 0:
            return plan_round(self.cfg, sampled=sampled, dim=self.dim,
                              history=self.history, releases_left=left)
        plan = plan_round(self.cfg, sampled=sampled, dim=self.dim, history=self.history,
                          releases_left=left - 1, prior_weight=weight)
        return client_plan(self.cfg, dim=self.n_items + len(count_keys(self.cfg)),
                           n_min=plan.n_min, mu_client=plan.mu_client / weight, prior=True)

    def apply_prior(self, total: np.ndarray, plan: DDPPlan, arrays: dict[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
        """Item biases from the noisy item counts: standardised, times PRIOR_SCALE."""
        counts, _ = decode(total, plan, self.n_items)
        spread = float(counts.std()) or 1.0
        bias = PRIOR_SCALE * (counts - counts.mean()) / spread
        out = dict(arrays)
        out[PRIOR_KEY] = bias.reshape(arrays[PRIOR_KEY].shape).astype(arrays[PRIOR_KEY].dtype)
        return out

    def epsilon(self) -> float:
        """User-level epsilon spent (from the shares that reached each sum)."""
        return privacy.skellam_epsilon(self.history, self.cfg.privacy.delta)

    def account(self, plan: DDPPlan, survivors: int) -> None:
        """Record one release that ``survivors`` noise shares reached.

        At most ``plan.n_min`` shares are counted, whatever arrived: up to
        ``ddp-dropout`` of the clients may collude with the server (it then knows their
        shares), so only the honest minimum is noise. Fewer survivors count as they are:
        epsilon then exceeds the plan, and is reported as it is. A release no share
        reached released nothing.
        """
        if survivors > 0:
            self.history = privacy.add_skellam_entry(
                self.history, plan.entry(min(survivors, plan.n_min)))

    def mean_update(self, total: np.ndarray, plan: DDPPlan, denominator: int
                    ) -> tuple[np.ndarray, dict[str, float]]:
        """(the noisy mean of the clipped updates, the summed counts by key)."""
        upd, counts = decode(total, plan, self.update_dim)
        return upd / max(1, denominator), dict(zip(count_keys(self.cfg), counts.tolist()))
