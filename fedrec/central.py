"""Centralized training and evaluation: the non-federated baseline on the same parts.

Same data, model, loop (``train_epochs``), DP wrapper and evaluator as federated runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrec import privacy
from fedrec.config import RunConfig
from fedrec.data import ExampleBuilder, Split
from fedrec.evaluate import evaluate_counts
from fedrec.features import example_context, model_features
from fedrec.metrics import finalize
from fedrec.model import RecModel, build_model
from fedrec.train import (
    TrainResult,
    build_optimizer,
    resolve_device,
    steps_per_epoch,
    train_epochs,
)

log = logging.getLogger(__name__)


def rating_offset(split: Split) -> float:
    """Fixed score offset: the middle of the rating scale for explicit data, else 0.

    Derived from the dataset's declared scale, not from the ratings, so it costs no
    privacy.
    """
    if split.implicit:
        return 0.0
    lo, hi = split.train.rating_range
    return (lo + hi) / 2 if math.isfinite(hi) else lo


@dataclass
class Trainer:
    """Model, optimizer and loss ready for ``train_epochs`` (DP-wrapped when asked)."""

    raw_model: RecModel  # the unwrapped model (for evaluation and state dicts)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    private: privacy.PrivateObjects | None
    noise_multiplier: float

    def epsilon(self, delta: float, accountant: str) -> float:
        """Epsilon spent so far (0 without DP)."""
        if self.private is None:
            return 0.0
        return privacy.epsilon_of(self.private.accountant.history, delta, accountant)


def noise_multiplier(cfg: RunConfig, sample_rate: float, steps: int) -> float:
    """Sigma for a run of ``steps`` DP steps at ``sample_rate``: calibrated to
    ``target-epsilon`` when it is > 0 (cached per argument set), else ``noise-multiplier``."""
    p = cfg.privacy
    if p.target_epsilon > 0:
        return privacy.calibrate_noise(p.target_epsilon, p.delta, sample_rate, steps,
                                       p.accountant)
    return p.noise_multiplier


def build_trainer(cfg: RunConfig, model: RecModel, n_examples: int, *, steps: int,
                  history: privacy.History | None = None,
                  sample_rate: float | None = None, sigma: float | None = None,
                  normalizer: float | None = None,
                  generator: torch.Generator | None = None) -> Trainer:
    """Optimizer and loss for ``model``; with DP, the Opacus-wrapped versions.

    Args:
        cfg: run configuration.
        model: the raw model (already on its device).
        n_examples: training examples (for the sampling rate q = batch / n).
        steps: DP steps of the whole planned run (for target-epsilon calibration).
        history: accountant history to continue.
        sample_rate: Poisson rate q (default ``sample-rate``, else batch / n).
        sigma: noise multiplier (default: calibrated by ``noise_multiplier``).
        normalizer: what the noisy gradient sum is divided by (default q * n).
        generator: the noise source (default: a fresh OS-seeded one).
    """
    optimizer = build_optimizer(model.parameters(), cfg.train)
    criterion = privacy.RowLoss(cfg.train.objective)
    if not cfg.privacy.dp:
        if hasattr(model, "per_example_lookups"):  # no per-example norms needed
            model.per_example_lookups = False
        return Trainer(model, model, optimizer, criterion, None, 0.0)
    q = sample_rate or dp_sample_rate(cfg, n_examples)
    if sigma is None:
        sigma = noise_multiplier(cfg, q, steps)
    po = privacy.make_private(model, optimizer, criterion, cfg.privacy, sample_rate=q,
                              noise_multiplier=sigma, history=history, generator=generator)
    privacy.set_expected_batch_size(po.optimizer, normalizer or q * n_examples)
    return Trainer(model, po.model, po.optimizer, po.criterion, po, sigma)


def dp_sample_rate(cfg: RunConfig, n_examples: int) -> float:
    """Centralized Poisson rate: ``sample-rate``, else batch-size / n (n public)."""
    return cfg.privacy.sample_rate or min(1.0, cfg.train.batch_size / max(1, n_examples))


def run_centralized(
    cfg: RunConfig,
    split: Split,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[], None] | None = None,
    stop: Callable[[dict[str, Any], RecModel], bool] | None = None,
) -> tuple[RecModel, dict[str, float], list[dict[str, Any]]]:
    """Train centrally and evaluate (``stop(row, model)`` True ends training early).

    With ``early-stopping`` N > 0 a validation split is carved from the training data
    (each user's latest ``test-fraction``), the model trains on the rest, is checked on
    validation every epoch and stops after N epochs without a better Recall@K; the best
    epoch's model is evaluated on the test split (``best_epoch`` in the metrics). The
    test split is never used for the choice.

    Returns:
        (trained raw model, final metrics, per-epoch rows).
    """
    cfg = cfg.for_central()
    if cfg.train.early_stopping:
        return _run_with_early_stopping(cfg, split, on_epoch=on_epoch, on_step=on_step)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, split.n_users, split.n_items,
                        offset=rating_offset(split), seed=cfg.data.seed,
                        features=model_features(cfg, split.train)).to(device)
    dp = cfg.privacy.dp
    pc = cfg.privacy
    neg_rng = (np.random.default_rng(privacy.dp_seed(pc, 0, privacy.NEGATIVES)) if dp
               else np.random.default_rng(cfg.data.seed))
    builder = ExampleBuilder(split.train, implicit=split.implicit,
                             negatives=cfg.data.negatives, seed=neg_rng,
                             uniform=cfg.uniform_negatives,
                             context=example_context(cfg, split.train))
    n = len(split.train)
    q = dp_sample_rate(cfg, n)
    trainer = build_trainer(cfg, model, n, sample_rate=q, steps=cfg.train.epochs * steps_per_epoch(
        n, cfg.train.batch_size, poisson=True, sample_rate=q),
        generator=privacy.dp_generator(pc, 0, privacy.NOISE, device=device) if dp else None)
    sampler = privacy.dp_generator(pc, 0, privacy.SAMPLING) if dp else None
    ks = cfg.eval.ks
    rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}

    def _evaluate() -> dict[str, float]:
        counts = evaluate_counts(model, split.train, split.test, ks=ks,
                                 implicit=split.implicit,
                                 eval_negatives=cfg.data.eval_negatives, seed=cfg.data.seed)
        return finalize(counts, ks)

    start = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        res: TrainResult = train_epochs(trainer.model, trainer.optimizer, trainer.criterion,
                                        builder, cfg.train, poisson=dp,
                                        epochs=1, seed=cfg.data.seed * 1000 + epoch,
                                        on_step=on_step, sample_rate=q if dp else None,
                                        generator=sampler)
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": res.loss,
                               "seconds": time.perf_counter() - start,
                               "examples_per_s": res.examples / max(res.seconds, 1e-9)}
        last = epoch + 1 == cfg.train.epochs
        every = cfg.eval.eval_every
        if last or (every and (epoch + 1) % every == 0):
            metrics = _evaluate()
            row.update(metrics)
        if cfg.privacy.dp:
            row["epsilon"] = trainer.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
        done = stop is not None and stop(row, model)
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if done:
            break
    metrics = dict(metrics)
    metrics["train_seconds"] = time.perf_counter() - start
    if cfg.privacy.dp:
        metrics["epsilon"] = trainer.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
        metrics["delta"] = cfg.privacy.delta
        metrics["noise_multiplier"] = trainer.noise_multiplier
        metrics["sample_rate"] = q
        metrics["noise_secret"] = privacy.noise_is_secret(cfg.privacy)
    return model, metrics, rows



def _run_with_early_stopping(
    cfg: RunConfig, split: Split, *, on_epoch: Callable[[dict[str, Any]], None] | None,
    on_step: Callable[[], None] | None,
) -> tuple[RecModel, dict[str, float], list[dict[str, Any]]]:
    """``run_centralized`` with a validation split and patience (see there)."""
    from fedrec.data.split import temporal_split

    inner = temporal_split(split.train, cfg.data.split, cfg.data.test_fraction, cfg.data.seed)
    inner.implicit = split.implicit
    k = f"recall@{max(cfg.eval.ks)}"
    best: dict[str, Any] = {}
    patience = cfg.train.early_stopping

    def stop(row: dict[str, Any], model: RecModel) -> bool:
        for m in [m for m in row if "@" in m]:  # these were measured on validation
            row[f"validation-{m}"] = row.pop(m)
        score = row.get(f"validation-{k}")
        if score is not None and score > best.get("score", -1.0):
            best.update(score=score, epoch=row["epoch"],
                        state={n: t.detach().clone() for n, t in model.state_dict().items()})
        return row["epoch"] - best.get("epoch", 0) >= patience

    every = cfg.replace(**{"eval-every": 1, "early-stopping": 0})
    model, _, rows = run_centralized(every, inner, on_epoch=on_epoch, on_step=on_step,
                                     stop=stop)
    model.load_state_dict(best["state"])
    counts = evaluate_counts(model, split.train, split.test, ks=cfg.eval.ks,
                             implicit=split.implicit, eval_negatives=cfg.data.eval_negatives,
                             seed=cfg.data.seed)
    metrics: dict[str, float] = {**finalize(counts, cfg.eval.ks), "best_epoch": best["epoch"],
                                 f"validation-{k}": best["score"], "epochs_run": len(rows)}
    return model, metrics, rows
