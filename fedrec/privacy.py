"""DP-SGD through Opacus: the only module that imports opacus.

``make_private`` swaps Opacus objects into the one training loop (``fedrec.train``):
a GradSampleModule, a DPOptimizer (noise, accounting) and, in ghost mode, a DP loss
whose ``backward()`` clips every example's gradient. fedrec extends Opacus in two
documented places, and uses its machinery for everything else:

1. Norm samplers registered with Opacus for ``fedrec.model.Embedding`` and
   ``fedrec.model.Linear``. A DP example looks up one row per table, or K rows
   ``[B, K]``; its gradient is the sum of the output gradients of the rows it looked up,
   so its squared norm is ``sum_{k,k'} [idx_k == idx_k'] <g_k, g_k'>``: exact, also for
   repeated rows, in O(B K^2 d) with no ``[B, n_rows, d]`` tensor. A linear layer's norm
   is the Gram form ``sum_{k,k'} <g_k, g_k'> <a_k, a_k'>`` (or ``||a|| ||g||`` for K = 1).
2. Book-keeping instead of Opacus's second backward pass. Opacus's ghost clipping runs
   backward twice: once for the norms, once more on the loss reweighted by the clipping
   factors c_b. The hooks of the first pass already hold every layer's activations a and
   output gradients g, so fedrec forms the clipped gradient directly
   (``sum_b c_b sum_k g_bk a_bk^T`` for a linear weight, ``index_add`` of ``c_b g_bk``
   for an embedding): the same tensor, with no second pass through the network. It is
   used when every trainable layer is a fedrec Embedding or Linear; any other model gets
   Opacus's two-pass backward. Tests check both against brute-force per-example
   gradients.

Unit of privacy: one training example, which is one rating together with its sampled
negatives. Epsilon is therefore per rating (record-level DP).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import (
    DPLossFastGradientClipping,
    DPTensorFastGradientClipping,
)
from torch import nn

from fedrec.config import PrivacyConfig
from fedrec.model import Embedding, Linear

UNIT_OF_PRIVACY = "one rating (with its sampled negatives)"
USER_UNIT_OF_PRIVACY = "one client's whole data (one user in cross-device mode)"

History = list[tuple[float, float, int]]  # Opacus accountant history: (sigma, q, steps)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Per-example Gram matrices ``[B, K, K]`` of ``x [B, K, d]`` (elementwise; on CPU this
    beats batched matmul for small K)."""
    return (x.unsqueeze(2) * x.unsqueeze(1)).sum(-1)


@register_norm_sampler(Embedding)
def embedding_norm_sample(
    layer: Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-example gradient norms of an embedding lookup.

    Args:
        layer: the embedding.
        activations: ``[ids]`` with ids ``[B]`` or ``[B, K]``.
        backprops: output gradients ``[B, d]`` or ``[B, K, d]``.

    Returns:
        ``{weight: norms [B]}``.
    """
    ids = activations[0]
    g = backprops.reshape(ids.shape[0], -1, layer.embedding_dim)  # [B, K, d]
    ids = ids.reshape(ids.shape[0], -1)  # [B, K]
    layer._fedrec_bk = (ids, g)
    if ids.shape[1] == 1:
        sq = (g * g).sum(dim=(1, 2))
    else:
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [B, K, K]
        sq = (_gram(g) * same).sum(dim=(1, 2)).clamp(min=0)
    return {layer.weight: sq.sqrt()}


register_grad_sampler(Embedding)(compute_embedding_grad_sample)
register_grad_sampler(Linear)(compute_linear_grad_sample)


@register_norm_sampler(Linear)
def linear_norm_sample(
    layer: Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-example gradient norms of a linear layer applied at K positions.

    The weight gradient of example b is ``G_b = sum_k g_bk a_bk^T``. Its squared norm is
    ``sum_{k,k'} <g_bk, g_bk'> <a_bk, a_bk'>`` (Gram form, O(K^2 (d_in + d_out))) or is
    computed from ``G_b`` itself (O(K d_in d_out)); the cheaper one is used.
    """
    a = activations[0].to(backprops.dtype)
    g = backprops
    if g.dim() == 2:  # one position per example: ||G_b|| = ||g_b|| ||a_b||
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    a = a.reshape(a.shape[0], -1, a.shape[-1])  # [B, K, d_in]
    g = g.reshape(g.shape[0], -1, g.shape[-1])  # [B, K, d_out]
    k, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    layer._fedrec_bk = (a, g)
    out: dict[nn.Parameter, torch.Tensor] = {}
    gg = None
    if layer.weight.requires_grad:
        if k == 1:
            sq = (g * g).sum((1, 2)) * (a * a).sum((1, 2))
        elif d_in * d_out <= 3 * k * (d_in + d_out):
            sq = torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))
        else:
            gg = _gram(g)
            sq = (gg * _gram(a)).sum((1, 2))
        out[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1).norm(dim=1) if gg is None else gg.sum((1, 2)).clamp(min=0).sqrt()
    return out


_BK_TYPES = (Embedding, Linear)


def _bookkeeping_grads(layer: nn.Module, coef: torch.Tensor) -> None:
    """Set ``p.grad`` of one layer to the clipped sum ``sum_b c_b grad_b`` from the
    activations and output gradients its norm sampler kept."""
    saved = layer.__dict__.pop("_fedrec_bk", None)
    if saved is None:  # not reached by this batch's graph: zero gradient
        for p in layer.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return
    x, g = saved
    gc = g * coef.view(-1, 1, 1).to(g.dtype)  # [B, K, d_out]
    if isinstance(layer, Embedding):
        grad = torch.zeros_like(layer.weight)
        grad.index_add_(0, x.reshape(-1), gc.reshape(-1, gc.shape[-1]))
        layer.weight.grad = grad
        return
    assert isinstance(layer, Linear)
    g2, a2 = gc.reshape(-1, gc.shape[-1]), x.reshape(-1, x.shape[-1])
    if layer.weight.requires_grad:
        layer.weight.grad = g2.T @ a2  # [d_out, d_in]
    if layer.bias is not None and layer.bias.requires_grad:
        layer.bias.grad = g2.sum(0)


class _BookkeepingDPTensor(DPTensorFastGradientClipping):
    """Opacus's DP loss tensor with the second backward replaced by book-keeping."""

    def backward(self) -> None:  # type: ignore[override]
        """One backward pass for the norms, then the clipped gradients directly."""
        if self.loss_reduction == "mean":
            reduced = self.loss_per_sample.mean(dim=0)
        else:
            reduced = self.loss_per_sample.sum(dim=0)
        layers = [m for m in self.module.modules() if isinstance(m, _BK_TYPES)]
        # Gradients w.r.t. the embedding tables alone reach every layer's hook (the
        # tables sit below everything) and skip the weight gradients of the rest.
        tables = [m.weight for m in layers if isinstance(m, Embedding) and m.weight.requires_grad]
        with warnings.catch_warnings():
            # PyTorch notes that hooks on embedding layers (integer inputs) fire on output
            # gradients: that is exactly what the norm samplers use.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            reduced.backward(inputs=tables or None)
        self.optimizer.zero_grad()
        coef = self.module.get_clipping_coef()
        for layer in layers:
            _bookkeeping_grads(layer, coef)


class _BookkeepingDPLoss(DPLossFastGradientClipping):
    """Opacus's DP loss wrapper returning ``_BookkeepingDPTensor``."""

    def __call__(self, *args: object, **kwargs: object) -> DPTensorFastGradientClipping:
        t = super().__call__(*args, **kwargs)
        return _BookkeepingDPTensor(t.module, t.optimizer, t.loss_per_sample,
                                    t.loss_reduction)


def supports_bookkeeping(model: nn.Module) -> bool:
    """True if every module holding trainable parameters is a fedrec Embedding/Linear."""
    return all(isinstance(m, _BK_TYPES) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False)))


class RowLoss(nn.Module):
    """Loss per DP example (one row of K scores), reduced by ``self.reduction``.

    Opacus's ghost clipping sets ``reduction="none"`` to get the ``[B]`` per-example
    losses. Objectives: ``bce`` (sum of BCE over the positive and its negatives), ``bpr``
    (mean of -log sigmoid(s_pos - s_neg) over negatives), ``mse`` (squared error).
    """

    def __init__(self, objective: str, reduction: str = "mean") -> None:
        super().__init__()
        self.objective = objective
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``scores``, ``targets``: ``[B, K]``."""
        if self.objective == "bce":
            per = nn.functional.binary_cross_entropy_with_logits(
                scores, targets, reduction="none").sum(1)
        elif self.objective == "bpr":
            per = -nn.functional.logsigmoid(scores[:, :1] - scores[:, 1:]).mean(1)
        else:
            per = ((scores - targets) ** 2).sum(1)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


@dataclass
class PrivateObjects:
    """What ``make_private`` returns: use these in place of the originals."""

    model: nn.Module
    optimizer: DPOptimizer
    criterion: nn.Module | DPLossFastGradientClipping
    accountant: IAccountant
    sample_rate: float


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    cfg: PrivacyConfig,
    *,
    sample_rate: float,
    noise_multiplier: float,
    history: History | None = None,
) -> PrivateObjects:
    """Wrap model, optimizer and loss for DP-SGD with Poisson sampling at ``sample_rate``.

    Args:
        model: the (raw) model; wrapped in an Opacus GradSampleModule.
        optimizer: the optimizer over ``model``'s parameters.
        criterion: a ``RowLoss`` with reduction "mean".
        cfg: privacy settings (clipping norm, accountant, grad-sample mode).
        sample_rate: Poisson sampling rate q; expected batch = q * n.
        noise_multiplier: sigma (see ``calibrate_noise`` for a target epsilon).
        history: an earlier accountant history to continue (restarts never reset epsilon).

    Returns:
        PrivateObjects whose model/optimizer/criterion replace the originals.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier < 0.3:
        warnings.warn(f"noise multiplier {noise_multiplier} is very small: epsilon will be "
                      "large", stacklevel=2)
    n_examples_hint = 1  # expected_batch_size is set by set_expected_batch_size
    if cfg.grad_sample_mode == "ghost":
        gsm: nn.Module = GradSampleModuleFastGradientClipping(
            model, max_grad_norm=cfg.max_grad_norm, use_ghost_clipping=True,
            loss_reduction="mean")
        dp_opt: DPOptimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=n_examples_hint, loss_reduction="mean")
        loss_cls = (_BookkeepingDPLoss if supports_bookkeeping(model)
                    else DPLossFastGradientClipping)
        dp_crit: nn.Module | DPLossFastGradientClipping = loss_cls(
            gsm, dp_opt, criterion, loss_reduction="mean")
    else:
        gsm = GradSampleModule(model, loss_reduction="mean")
        dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                             max_grad_norm=cfg.max_grad_norm,
                             expected_batch_size=n_examples_hint, loss_reduction="mean")
        dp_crit = criterion
    accountant = create_accountant(cfg.accountant)
    accountant.history = list(history or [])
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateObjects(gsm, dp_opt, dp_crit, accountant, sample_rate)


def set_expected_batch_size(optimizer: DPOptimizer, n_examples: int, sample_rate: float) -> None:
    """Opacus divides the noisy sum by the expected batch size ``q * n``."""
    optimizer.expected_batch_size = max(1, round(sample_rate * n_examples))


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float,
               accountant: str = "rdp") -> float:
    """Epsilon spent by an accountant history at ``delta`` (0 for an empty history).

    Cached: clients that share a sampling rate and schedule share the computation.
    """
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon_cached(key, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float,
                    accountant: str) -> float:
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def quantize_rate(q: float) -> float:
    """Round a sampling rate down to the grid 2^(-k/4), k = 0, 1, ...

    Clients with similar data sizes then share one rate, so sigma calibration and epsilon
    computations (seconds each) are shared instead of repeated per client.
    """
    if q >= 1.0:
        return 1.0
    return float(2.0 ** (math.floor(4 * math.log2(q)) / 4))


@functools.lru_cache(maxsize=1024)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Noise multiplier that spends ``target_epsilon`` in ``steps`` steps at ``sample_rate``.

    Costs up to seconds (a binary search); cached per argument set.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


def per_example_norms(model: nn.Module) -> torch.Tensor:
    """Per-example gradient norms of the last ghost-clipped step (for tests/debugging)."""
    return model.per_sample_gradient_norms  # type: ignore[no-any-return,operator]


def user_level_noise(target_epsilon: float, noise: float, rounds: int, delta: float) -> float:
    """Noise multiplier z of user-level DP-FedAvg (Gaussian mechanism once per round).

    Accounted without subsampling amplification (as if every client took part every
    round), which is exact for fraction 1 and conservative otherwise.
    """
    if target_epsilon > 0:
        return calibrate_noise(target_epsilon, delta, 1.0, rounds, "rdp")
    return noise


def user_level_epsilon(noise: float, rounds: int, delta: float) -> float:
    """User-level epsilon after ``rounds`` releases with noise multiplier ``noise``."""
    return epsilon_of([(noise, 1.0, rounds)], delta, "rdp") if rounds > 0 else 0.0
