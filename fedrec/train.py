"""The one training loop, for centralized and federated, private and non-private runs.

Nothing here knows about DP: ``fedrec.privacy.make_private`` returns a model, optimizer
and loss that act like their non-private counterparts. With DP, batches are Poisson
samples (each example in with probability q), as the accountant assumes; without DP,
batches are slices of a shuffled permutation. Batches are index tensors into examples
held as tensors, with no per-example DataLoader.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from fedrec.config import TrainConfig
from fedrec.data.sampling import ExampleBuilder


@dataclass
class TrainResult:
    """What a call to ``train_epochs`` did."""

    epoch_losses: list[float] = field(default_factory=list)  # mean example loss per epoch
    examples: int = 0  # examples processed (sum of batch sizes)
    steps: int = 0  # optimizer steps
    seconds: float = 0.0  # wall time

    @property
    def loss(self) -> float:
        """Mean loss of the last epoch (NaN if none)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def build_optimizer(params: Iterator[nn.Parameter] | list[nn.Parameter],
                    cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD with the configured learning rate and L2 penalty."""
    if cfg.lr <= 0 or cfg.optimizer == "auto":
        raise ValueError("lr 0 / optimizer 'auto' are unresolved: use a RunConfig's train "
                         "section")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_per_epoch(n: int, batch_size: int, *, poisson: bool,
                    sample_rate: float | None = None) -> int:
    """Steps ``batch_indices`` yields per epoch: ``round(1 / q)`` for Poisson batches
    (q = ``sample_rate`` or batch / n), else ``ceil(n / batch_size)`` slices."""
    if poisson:
        q = sample_rate if sample_rate is not None else min(1.0, batch_size / max(1, n))
        return max(1, round(1 / q))
    return max(1, math.ceil(n / batch_size))


def batch_indices(n: int, batch_size: int, *, poisson: bool, generator: torch.Generator,
                  sample_rate: float | None = None) -> Iterator[torch.Tensor]:
    """Index batches for one epoch.

    Poisson: ``round(1 / q)`` steps, each keeping every example with probability q
    (``sample_rate``, default ``batch_size / n``; batches vary in size and may be empty).
    Otherwise: shuffled slices of ``batch_size``.
    """
    if poisson:
        q = sample_rate if sample_rate is not None else min(1.0, batch_size / n)
        steps = steps_per_epoch(n, batch_size, poisson=True, sample_rate=q)
        block = max(1, (1 << 22) // max(1, n))  # steps per draw: ~16 MB of uniforms
        for first in range(0, steps, block):  # the same numbers as a draw per step
            keep = torch.rand(min(block, steps - first), n, generator=generator) < q
            yield from keep.nonzero()[:, 1].split(keep.sum(1).tolist())
    else:
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(batch_size)


def _empty_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A step in which no example contributed (an empty Poisson batch).

    Under DP the optimizer still adds noise and the accountant still counts the step.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
            if hasattr(p, "grad_sample"):
                p.grad_sample = torch.zeros(1, *p.shape, device=p.device, dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad()


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    builder: ExampleBuilder,
    cfg: TrainConfig,
    *,
    poisson: bool = False,
    epochs: int | None = None,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
    on_step: Callable[[], None] | None = None,
    sample_rate: float | None = None,
    generator: torch.Generator | None = None,
) -> TrainResult:
    """Train for ``epochs`` (default ``cfg.epochs``) over examples from ``builder``.

    Args:
        model: scores ``users [B]``, ``items [B, K]`` -> ``[B, K]``; possibly DP-wrapped.
        optimizer: possibly a DPOptimizer.
        criterion: a ``RowLoss`` (or its DP wrapper).
        builder: produces examples (fresh negatives each epoch).
        cfg: batch size and epochs.
        poisson: Poisson batches (required under DP).
        epochs: overrides ``cfg.epochs``.
        seed: seeds batch sampling (when no ``generator`` is given).
        on_epoch: called with (epoch index, mean loss) after each epoch.
        on_step: called after each step (progress bars).
        sample_rate: Poisson rate q (default ``batch_size / n``); must match the
            accountant's.
        generator: source of batch sampling; under DP an OS-seeded one
            (``fedrec.privacy.dp_generator``), since amplification by sampling assumes
            nobody can predict the batches.

    Returns:
        TrainResult with per-epoch losses and counts.
    """
    device = next(model.parameters()).device
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs if epochs is None else epochs):
        ex = builder.build()
        users, items, targets = ex.users.to(device), ex.items.to(device), ex.targets.to(device)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for idx in batch_indices(len(ex), cfg.batch_size, poisson=poisson, generator=gen,
                                 sample_rate=sample_rate):
            result.steps += 1
            if len(idx) == 0:
                _empty_step(model, optimizer)
                continue
            idx = idx.to(device)
            scores = model(users[idx], items[idx])
            loss = criterion(scores, targets[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            if on_step is not None:
                on_step()
        result.examples += seen
        mean_loss = float(loss_sum) / max(1, seen)
        result.epoch_losses.append(mean_loss)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    result.seconds = time.perf_counter() - start
    return result
