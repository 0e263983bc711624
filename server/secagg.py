"""Distributed user-level DP on Flower's SecAgg+ (the legacy workflow path).

In Flower 1.42 ``SecAggPlusWorkflow`` runs only with a ``LegacyContext`` and a legacy
``Strategy``; this module is that protocol variant, beside the Message-API path
(``server/strategy.py``). Clients send integers (``fedrec.ddp.encode``: clipped update
and evaluation counts, randomly rounded, plus a Skellam noise share). SecAgg+ is set up so
that its quantisation is the identity on them (clipping range c = 2^29, quantisation
range 2c, weight 1 per client) and its modulus (2^48) leaves room for 2^18 clients
without wrap-around; ``aggregate_fit`` receives the mean of what survivors sent, from
which the exact integer sum is recovered (``round(mean x survivors)``, centred modulo
2^48). Everything else (the plan, decoding, accounting, the server step) is
``fedrec.ddp.DDPServer``, the same code ``fedrec.inprocess`` runs.

Each training round r also carries the evaluation counts of the model the clients
received (w_{r-1}); a last, evaluation-only round measures the final model. A round's row
is therefore complete one round later.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedrec import ddp, keys
from fedrec.aggregate import ServerOptimizer
from fedrec.config import RunConfig
from fedrec.errors import ConfigError
from fedrec.federated import flatten, unflatten
from fedrec.metrics import finalize
from fedrec.privacy import BudgetError

log = logging.getLogger("fedrec.server")

Arrays = dict[str, np.ndarray]


def secure_sum(mean: np.ndarray, survivors: int) -> np.ndarray:
    """The exact integer sum from SecAgg+'s dequantised mean of integer vectors."""
    return ddp.centred(np.rint(np.asarray(mean, np.float64) * survivors).astype(np.int64))


class DDPStrategy(Strategy):
    """A legacy strategy around ``fedrec.ddp.DDPServer`` (one release per round)."""

    def __init__(self, cfg: RunConfig, shared: Arrays, order: list[str], item_keys: list[str],
                 *, offset: int = 0, history: Any = None, rows: list[dict[str, Any]] | None = None,
                 pending: dict[str, Any] | None = None, server_opt: dict[str, Any] | None = None,
                 display: Callable[[str], None] | None = None,
                 evaluator: Callable[[Arrays], dict[str, float]] | None = None) -> None:
        self.cfg, self.current, self.order = cfg, shared, order
        prior = cfg.privacy.ddp_prior and ddp.PRIOR_KEY in shared and offset == 0
        self.first_release = 0 if prior else offset + 1
        n_items = shared[item_keys[0]].shape[0]
        self.ddp = ddp.DDPServer(cfg, int(sum(v.size for v in shared.values())), n_items,
                                 history, prior=prior)
        self.server_opt = ServerOptimizer(cfg.fed, item_keys)
        if server_opt:
            self.server_opt.load_state_dict(server_opt)
        self.rows = list(rows or [])
        self.pending = pending  # the last training round's row, awaiting its counts
        self.display, self.evaluator = display, evaluator
        self.plan: ddp.DDPPlan | None = None
        self.task = "train"
        self.sampled = 0
        self.on_round_end: Callable[[int], None] | None = None  # checkpoint hook
        self._t0 = time.perf_counter()

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The global shared arrays, in ``order``."""
        return ndarrays_to_parameters([self.current[k] for k in self.order])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients (FedAvg's rule) and send the model with this release's plan."""
        release = self.first_release + server_round - 1
        self._t0 = time.perf_counter()
        n = client_manager.num_available()
        train = 1 <= release <= self.cfg.fed.rounds
        self.task = "train" if train else ("prior" if release == 0 else "evaluate")
        k = max(min(self.cfg.fed.min_clients, n), int(self.cfg.fed.fraction * n)) if train \
            else n
        try:
            self.plan = self.ddp.plan(k, release)
        except BudgetError as err:
            log.warning("release %d: user-level budget spent (%s); nothing sent", release, err)
            self.plan = None
            return []
        self.sampled = k
        clients = client_manager.sample(num_clients=k, min_num_clients=k)
        config = {"server-round": release, keys.DDP_MU_CLIENT: self.plan.mu_client,
                  keys.DDP_N_MIN: self.plan.n_min, keys.DDP_TASK: self.task}
        return [(c, FitIns(parameters, dict(config))) for c in clients]

    def aggregate_fit(self, server_round: int,
                      results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """Recover the exact integer sum, account it, step the model, complete rows."""
        release = self.first_release + server_round - 1
        assert self.plan is not None
        survivors = len(results)
        if not survivors:
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        total = secure_sum(mean, survivors)
        self.ddp.account(self.plan, survivors)
        if self.task == "prior":  # item biases start from the noisy item counts
            self.current = self.ddp.apply_prior(total, self.plan, self.current)
            return ndarrays_to_parameters([self.current[k] for k in self.order]), {}
        update, counts = self.ddp.mean_update(total, self.plan, self.sampled)
        released = finalize(counts, self.cfg.eval.ks)
        if self.pending is not None:  # these counts measure the model clients received
            self.pending.update({f"released-{k}": v for k, v in released.items()})
            if self.evaluator is None:  # deployment: the released metrics are the metrics
                self.pending.update(released)
                self.pending["evaluation"] = "secure sum (noised)"
            self.pending["user-epsilon"] = self.ddp.epsilon()
            self._finish(self.pending)
            self.pending = None
        if release <= self.cfg.fed.rounds:
            avg = unflatten(flatten(self.current, self.order) + update, self.current, self.order)
            self.current = self.server_opt.step_from_average(avg, self.current)
            self.pending = {
                "round": release, "clients": survivors,
                "failures": len(failures) // 2 if failures else 0,  # SecAgg+ lists each twice
                "user-noise-multiplier": math.sqrt(2 * self.plan.mu_total) / self.plan.l2,
                "user-epsilon": self.ddp.epsilon(), "secagg-sampled": self.sampled,
                "seconds": time.perf_counter() - self._t0}
            if self.on_round_end is not None:
                self.on_round_end(release)
        return ndarrays_to_parameters([self.current[k] for k in self.order]), {}

    def _finish(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        if self.display is not None:
            from server.strategy import format_round

            self.display(format_round(row, self.cfg))

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[Any]:
        """No separate evaluation messages: counts travel in the secure sum."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Any]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Any]] | None:
        """Simulation only: the experimenter's metrics of the new model, in its row."""
        if self.evaluator is not None and self.pending is not None and server_round > 0 \
                and "evaluation" not in self.pending:
            self.pending.update(self.evaluator(self.current))
            self.pending["evaluation"] = "experimenter (simulation); released-*: secure sum"
        return None


def _no_evaluation(grid: Grid, context: Context) -> None:
    """The evaluation workflow of a DDP run: counts travel in the fit round."""


def run_secagg(grid: Grid, context: Context, strategy: DDPStrategy, releases: int,
               n_clients: int) -> None:
    """Run ``releases`` SecAgg+ rounds of ``strategy`` on ``grid``."""
    cfg = strategy.cfg
    if n_clients < 3:
        raise ConfigError("ddp needs at least 3 clients per round (SecAgg+ masks pairs "
                          "among them)")
    k, t = ddp.secagg_shares(n_clients, cfg.privacy.ddp_dropout)
    if cfg.fed.secagg_shares:
        k = cfg.fed.secagg_shares
        t = cfg.fed.secagg_threshold or k // 2 + 1
    shares: int | float = k if k < n_clients else 1.0
    threshold: int | float = t if k < n_clients else (t / n_clients + 1e-9)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
            clipping_range=float(ddp.CLIENT_BOUND), quantization_range=2 * ddp.CLIENT_BOUND,
            modulus_range=ddp.MODULUS, timeout=cfg.fed.round_timeout),
        evaluate_workflow=_no_evaluation)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=releases),
                           strategy=strategy)
    workflow(grid, legacy)
