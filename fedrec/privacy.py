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

Randomness on the DP path (Gaussian noise, Poisson sampling, DP negatives) comes from
``dp_generator``/``dp_seed``: torch generators whose whole Mersenne Twister state (624
words) is drawn from the operating system (``os.urandom``) on every call, and numpy seeds
of 64 OS bits, never from configuration, so nobody who knows the run config (the server
included) can regenerate a client's noise. Noise is drawn in Opacus's
``secure_mode`` (four draws summed, robust to floating-point attacks). A reproducible
stream exists for experiments only (``insecure-noise-seed`` >= 0); its outputs say the
noise is not secret and deployment refuses it.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
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
from fedrec.errors import PrivacyError
from fedrec.model import Embedding, Linear

UNIT_OF_PRIVACY = "one rating (with its sampled negatives)"
USER_UNIT_OF_PRIVACY = "one client's whole data (one user in cross-device mode)"

History = list[tuple[float, float, int]]  # Opacus accountant history: (sigma, q, steps)

NOT_SECRET = ("NOT SECRET: insecure-noise-seed is set, so anyone who knows the run config "
              "can regenerate the DP noise (experiments only)")


# purposes of DP random streams (part of the stream key of an insecure seed)
NOISE, SAMPLING, NEGATIVES, EVAL_NOISE, USER_NOISE = 1, 2, 3, 4, 5
CHUNK_NOISE = 6  # the batched engine's draws for a chunk of clients (fedrec.batched)
CHUNK_SAMPLING, CHUNK_NEGATIVES = 7, 8  # its Poisson batches and negatives for a chunk


class BudgetError(ValueError):
    """The privacy budget left cannot pay for the planned steps."""


def noise_is_secret(cfg: PrivacyConfig) -> bool:
    """False when ``insecure-noise-seed`` makes DP randomness reproducible."""
    return cfg.insecure_noise_seed < 0


def dp_seed(cfg: PrivacyConfig, *stream: int) -> int:
    """64-bit seed for one DP random stream.

    OS entropy by default. With ``insecure-noise-seed`` >= 0 (experiments only) a
    deterministic function of that seed and ``stream`` (e.g. partition, round, purpose).
    """
    if noise_is_secret(cfg):
        return int.from_bytes(os.urandom(8), "little")
    import numpy as np

    seq = np.random.SeedSequence([cfg.insecure_noise_seed, *[int(x) & 0xFFFFFFFF
                                                             for x in stream]])
    return int(seq.generate_state(1, np.uint64)[0])


def secure_normal(shape: tuple[int, ...] | int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise in float64 drawn as Opacus's ``secure_mode`` does (one draw
    discarded, then the sum of four draws halved), robust to floating-point attacks."""
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    torch.normal(0.0, 1.0, size=(1,), generator=generator)
    draws = torch.normal(0.0, 1.0, size=(4, *size), generator=generator, dtype=torch.float64)
    return draws.sum(0) / 2


def dp_generator(cfg: PrivacyConfig, *stream: int,
                 device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for DP noise or sampling (see ``dp_seed``); unless the
    test-only seed is set, its whole state comes from OS entropy (``secret_generator``)."""
    if noise_is_secret(cfg):
        return secret_generator(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(dp_seed(cfg, *stream))
    return gen


# torch's CPU generator state (CPUGeneratorImplState): initial seed (u64), left (i32),
# seeded (i32), next (u64), then the 624 Mersenne Twister words, one per u64
_MT_OFFSET, _MT_WORDS, _CPU_STATE_BYTES = 24, 624, 5056


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator whose state nobody can regenerate: a CPU generator's 624-word
    Mersenne Twister state is filled from ``os.urandom`` (``manual_seed`` keeps only the
    low 32 bits of a seed: 2^32 candidates could be tried against a noisy update); a
    CUDA generator (Philox) takes a 64-bit OS seed, all of which it keeps.

    Raises:
        PrivacyError: torch's CPU generator state is not the layout this relies on.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    if gen.device.type != "cpu":
        return gen
    state = gen.get_state().clone()
    if state.numel() != _CPU_STATE_BYTES:
        raise PrivacyError(f"torch's CPU generator state has {state.numel()} bytes, not "
                           f"{_CPU_STATE_BYTES}: cannot seed it from OS entropy")
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), np.uint32).astype("<u8")
    raw = state.numpy()
    raw[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
    gen.set_state(state)
    if not torch.equal(gen.get_state()[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS],
                       state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS]):
        raise PrivacyError("torch did not take the generator state fedrec set")
    return gen


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Per-example Gram matrices ``[B, K, K]`` of ``x [B, K, d]`` (batched matmul: on this
    CPU 5-40x faster than the elementwise product it replaced, for K from 5 to 21)."""
    return torch.bmm(x, x.transpose(1, 2))


def lookup_sq_norms(g: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Squared norms ``[B]`` of each example's gradient on one embedding table, from the
    output gradients ``g [B, K, d]`` of its lookups ``ids [B, K]``.

    An example's table gradient has one row per distinct id: the sum of the ``g_k`` that
    look it up. Without repeats the squared norm is ``sum_k ||g_k||^2``; for the (rare)
    examples that repeat a row (found by sorting their ids) the ``g_k`` of each id are
    summed first and the sums squared, so no large terms cancel in floating point (an
    inner-product form could round a real norm down to 0: an unclipped example).
    """
    # pow-then-sum: torch's cascade summation (vector_norm's float32 accumulation loses a
    # long small tail next to one large entry: an under-estimate, measured by a review)
    sq = g.flatten(1).pow(2).sum(1)
    if ids.shape[1] > 1:
        ordered, order = ids.sort(dim=1)
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        rows = (~starts).any(dim=1).nonzero().flatten()
        if rows.numel():
            segment = (starts[rows].long().cumsum(1) - 1).unsqueeze(-1)  # [R, K, 1]
            gr = g[rows].gather(1, order[rows].unsqueeze(-1).expand(-1, -1, g.shape[-1]))
            sums = torch.zeros_like(gr).scatter_add_(1, segment.expand_as(gr), gr)
            sq = sq.index_copy(0, rows, (sums * sums).sum(dim=(1, 2)))
    return sq


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
    sq = lookup_sq_norms(g, ids)
    return {layer.weight: sq.sqrt()}


register_grad_sampler(Embedding)(compute_embedding_grad_sample)
register_grad_sampler(Linear)(compute_linear_grad_sample)


# The Gram form is summed in float64, whose rounding is about (K^2 + d) * 1.1e-16 of the
# size of its terms; a result below this share of that size is recomputed from G_b.
GRAM_CANCELLATION = 1e-2
# What a multiply-add of the Gram form costs next to one of G_b's, which runs in the
# layer's dtype: float64 plus the conversions measured 2-4x dearer on this CPU
# (NeuMF's 64 -> 64 and 64 -> 32 layers at K = 21: 11.0 ms vs 4.9 ms a batch of 1024,
# a one-off micro-benchmark; the end-to-end effect: benchmark_central.py --dp-only)
GRAM_COST = 2


@register_norm_sampler(Linear)
def linear_norm_sample(
    layer: Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-example gradient norms of a linear layer applied at K positions.

    The weight gradient of example b is ``G_b = sum_k g_bk a_bk^T``. Its squared norm is
    ``sum_{k,k'} <g_bk, g_bk'> <a_bk, a_bk'>`` (Gram form, O(K^2 (d_in + d_out)), in
    float64) or is computed from ``G_b`` itself (O(K d_in d_out), in the layer's dtype, as
    Opacus's per-sample gradients are); the cheaper one is used (``GRAM_COST``). The Gram
    form's terms can cancel, so it is summed in float64, and an example whose result is
    small next to the size of its terms (``(sum_k |g_bk| |a_bk|)^2``) or not a number
    is recomputed from ``G_b`` (float64): rounding cannot shrink a Gram-form norm by more
    than about (K^2 + d) 1e-14 of itself, for any layer width. ``G_b`` in the layer's
    dtype carries that dtype's rounding, as Opacus's per-sample gradients do: each entry
    within about K u S of its value (u = 6e-8 in float32, S = sum_k |g_bk| |a_bk|), so a
    norm's relative error is at most about K u S / ||G_b|| (1e-5 at K = 21 needs
    S > 8 ||G_b||; an example clipped at C then adds at most C (1 + that) to the sum).
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
    if layer.weight.requires_grad:
        if k == 1:
            sq = (g * g).sum((1, 2)) * (a * a).sum((1, 2))
        elif d_in * d_out <= GRAM_COST * k * (d_in + d_out):
            # G_b, then its 2-norm as Opacus's own clipping takes it (DPOptimizer:
            # ``g.reshape(len(g), -1).norm(2, dim=-1)``), one fused reduction
            sq = torch.linalg.vector_norm(torch.bmm(g.transpose(1, 2), a).flatten(1),
                                          dim=1).square()
        else:
            gd, ad = g.double(), a.double()
            sq = (_gram(gd) * _gram(ad)).sum((1, 2))
            scale = (gd.norm(dim=2) * ad.norm(dim=2)).sum(1).square()
            doubtful = (~(sq >= GRAM_CANCELLATION * scale)).nonzero().flatten()  # NaN too
            if doubtful.numel():
                gd, ad = gd[doubtful], ad[doubtful]
                sq = sq.index_copy(0, doubtful, torch.bmm(gd.transpose(1, 2), ad).pow(2)
                                   .sum((1, 2)))
            sq = sq.to(g.dtype)
        out[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1).norm(dim=1)  # a sum, then a norm: nothing cancels
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
        # Gradients w.r.t. the lookups' outputs alone reach every layer's hook (the
        # lookups sit below everything), and skip both the weight gradients of the
        # layers above and the dense table gradients below (book-keeping forms the
        # clipped ones). The outputs are the ones before the hooks' wrapping
        # (``_keep_lookup``); without them, the tables themselves.
        tables = [m for m in layers if isinstance(m, Embedding) and m.weight.requires_grad]
        outs = [m.__dict__.pop("_fedrec_out", None) for m in tables]
        with warnings.catch_warnings():
            # PyTorch notes that hooks on embedding layers (integer inputs) fire on output
            # gradients: that is exactly what the norm samplers use.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if tables and all(o is not None and o.requires_grad for o in outs):
                # allow_unused=False: an output from another graph (a stray forward
                # between this loss and its backward) raises instead of leaving layers
                # without norms
                torch.autograd.grad(reduced, outs)
            else:
                reduced.backward(inputs=[m.weight for m in tables] or None)
        self.optimizer.zero_grad()
        coef = self.module.get_clipping_coef()
        for layer in layers:
            _bookkeeping_grads(layer, coef)


def _keep_lookup(layer: nn.Module, args: tuple[object, ...], output: torch.Tensor) -> None:
    """Forward hook of an embedding under book-keeping: keep this batch's lookup output
    (before the backward hooks wrap it) as the point the norm pass stops at."""
    if layer.training and output.requires_grad:
        layer._fedrec_out = output


class _BookkeepingDPLoss(DPLossFastGradientClipping):
    """Opacus's DP loss wrapper returning ``_BookkeepingDPTensor``."""

    def __call__(self, *args: object, **kwargs: object) -> DPTensorFastGradientClipping:
        t = super().__call__(*args, **kwargs)
        return _BookkeepingDPTensor(t.module, t.optimizer, t.loss_per_sample,
                                    t.loss_reduction)


def supports_bookkeeping(model: nn.Module) -> bool:
    """True if every module holding trainable parameters is a fedrec Embedding/Linear and
    no embedding table is frozen (book-keeping back-propagates to the tables only, so a
    frozen one would leave the layers above it without output gradients), and no Linear
    layer reads a buffer (a feature model's title projection lies on no path to a table:
    its norms would never be computed)."""
    frozen = any(isinstance(m, Embedding) and not m.weight.requires_grad
                 for m in model.modules())
    from_buffer = any(getattr(m, "text_proj", None) is not None for m in model.modules())
    return not frozen and not from_buffer and all(isinstance(m, _BK_TYPES) for m in model.modules()
                              if any(p.requires_grad for p in m.parameters(recurse=False)))


class RowLoss(nn.Module):
    """Loss per DP example (one row of K scores), reduced by ``self.reduction``.

    Opacus's ghost clipping sets ``reduction="none"`` to get the ``[B]`` per-example
    losses. Objectives: ``bce`` (sum of BCE over the positive and its negatives), ``bpr``
    (mean of -log sigmoid(s_pos - s_neg) over negatives), ``softmax`` (cross-entropy of the
    positive, column 0, against its sampled negatives: sampled softmax), ``mse`` (squared
    error).
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
        elif self.objective == "softmax":
            per = torch.logsumexp(scores, 1) - scores[:, 0]
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
    generator: torch.Generator | None = None,
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
        generator: source of the Gaussian noise (``dp_generator``); default: a fresh
            OS-seeded one (Opacus alone would draw from the global generator, which code
            may have seeded).

    Returns:
        PrivateObjects whose model/optimizer/criterion replace the originals.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if cfg.max_grad_norm <= 0:
        raise ValueError("max-grad-norm 0 is 'auto': use a RunConfig's privacy section")
    if generator is None:  # never Opacus's default, the global (possibly seeded) generator
        generator = secret_generator(_device_of(model))
    if noise_multiplier < 0.3:
        warnings.warn(f"noise multiplier {noise_multiplier} is very small: epsilon will be "
                      "large", stacklevel=2)
    if hasattr(model, "per_example_lookups"):  # feature models: lookups indexed by example
        model.per_example_lookups = True
        model.dp_wrapped = True  # sticky: no later switch can turn them off
    if hasattr(model, "_dropout_gen"):
        # id-dropout masks from OS entropy: with a public stream, removing one example
        # would shift the masks of every later one (the sum would move by more than C)
        model._dropout_gen = secret_generator("cpu")
    n_examples_hint = 1  # expected_batch_size is set by set_expected_batch_size
    if cfg.grad_sample_mode == "ghost":
        gsm: nn.Module = GradSampleModuleFastGradientClipping(
            model, max_grad_norm=cfg.max_grad_norm, use_ghost_clipping=True,
            loss_reduction="mean")
        dp_opt: DPOptimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=n_examples_hint, loss_reduction="mean",
            generator=generator, secure_mode=True)
        loss_cls = (_BookkeepingDPLoss if supports_bookkeeping(model)
                    else DPLossFastGradientClipping)
        if loss_cls is _BookkeepingDPLoss:
            for layer in model.modules():
                if isinstance(layer, Embedding):
                    layer.register_forward_hook(_keep_lookup)
        dp_crit: nn.Module | DPLossFastGradientClipping = loss_cls(
            gsm, dp_opt, criterion, loss_reduction="mean")
    else:
        gsm = GradSampleModule(model, loss_reduction="mean")
        dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                             max_grad_norm=cfg.max_grad_norm,
                             expected_batch_size=n_examples_hint, loss_reduction="mean",
                             generator=generator, secure_mode=True)
        dp_crit = criterion
    accountant = create_accountant(cfg.accountant)
    accountant.history = list(history or [])
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateObjects(gsm, dp_opt, dp_crit, accountant, sample_rate)


def set_expected_batch_size(optimizer: DPOptimizer, size: float) -> None:
    """Opacus divides the noisy sum by this (the expected batch size).

    Centralized: ``q * n``, with the dataset size n treated as public. Federated clients
    pass the configured batch size, a constant: dividing by their own ``q * n`` would
    scale the whole noisy update by their data size and reveal it.
    """
    optimizer.expected_batch_size = max(1, round(size))


def add_entry(history: Sequence[tuple[float, float, int]], entry: tuple[float, float, int]
              ) -> History:
    """``history`` + ``entry``, joined to the last entry when (sigma, q) match (as Opacus's
    accountant does)."""
    out = [(float(s), float(q), int(n)) for s, q, n in history]
    if out and out[-1][:2] == (float(entry[0]), float(entry[1])):
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(entry[2]))
    else:
        out.append((float(entry[0]), float(entry[1]), int(entry[2])))
    return out


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float,
               accountant: str = "rdp") -> float:
    """Epsilon spent by an accountant history at ``delta`` (0 for an empty history).

    Cached: clients that share a sampling rate and schedule share the computation. With
    the RDP accountant each entry's RDP curve is Opacus's own, cached per (sigma, q) and
    summed in history order exactly as ``RDPAccountant.get_privacy_spent`` does (tested
    equal), so composing a longer history recomputes only what is new.
    """
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    if accountant == "rdp":
        return _epsilon_rdp_cached(key, float(delta))
    return _epsilon_cached(key, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_rdp_cached(history: Entries, delta: float) -> float:
    """``epsilon_of`` with the RDP accountant, per distinct (history, delta)."""
    return _epsilon_of_rdp(_rdp_sum(history), delta)


RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=8192)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """Opacus's RDP of one step of the sampled Gaussian mechanism at ``RDP_ORDERS``."""
    curve = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                orders=list(RDP_ORDERS)), np.float64)
    curve.flags.writeable = False
    return curve


def _rdp_sum(history: Entries) -> np.ndarray | int:
    """Sum over entries of steps x curve, in order (Opacus's ``sum([...])``)."""
    return sum([_rdp_curve(s, q) * n for s, q, n in history])  # noqa: C419 - same as Opacus


def _epsilon_of_rdp(rdp: np.ndarray | int, delta: float) -> float:
    if isinstance(rdp, int):  # empty history
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float,
                    accountant: str) -> float:
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=delta))


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


Entries = tuple[tuple[float, float, int], ...]


@functools.lru_cache(maxsize=1024)
def _calibrate_remaining(target: float, delta: float, history: Entries, extra: Entries,
                         sample_rate: float, steps: int, accountant: str) -> float:
    fixed = list(history) + list(extra)
    spent = epsilon_of(fixed, delta, accountant)
    if spent >= target * (1 - 1e-3):  # the last 0.1% would buy only noise
        raise BudgetError(f"epsilon already spent or committed ({spent:.3f}) reaches the "
                          f"target {target:g}")

    if accountant == "rdp":
        hints = [s for s, q, _ in history if q == sample_rate]
        return _calibrate_rdp(target, delta, tuple(fixed), sample_rate, steps,
                              hints[-1] if hints else None)

    def eps(sigma: float) -> float:
        return epsilon_of(fixed + [(sigma, sample_rate, steps)], delta, accountant)

    lo, hi = _bracket(eps, target, steps)
    if eps(lo) <= target:
        return lo
    for _ in range(60):  # eps decreases in sigma; keep eps(hi) <= target
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * hi:
            break
    return hi


def _bracket(eps: Callable[[float], float], target: float, steps: int
             ) -> tuple[float, float]:
    """Noise multipliers ``lo < hi`` with ``eps(hi) <= target`` (``eps`` decreases)."""
    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise BudgetError(f"no noise multiplier spends at most {target:g} over {steps} "
                              "steps")
    return lo, hi


def _calibrate_rdp(target: float, delta: float, fixed: Entries, q: float,
                   steps: int, hint: float | None = None) -> float:
    """``_calibrate_remaining`` for the RDP accountant, with Opacus's own curves.

    The previous entries' curves are computed once (cached); the root is found with
    Brent's method (about a third of the bisection's curve evaluations) and then nudged
    up until the exact epsilon is within the target. ``hint`` (the sigma of the last
    round, which a run that keeps its plan calibrates again) is taken when it is within
    the target and 2e-6 less would not be: a root within the search's tolerance, at
    the cost of one curve instead of a search.
    """
    from scipy.optimize import brentq

    base = _rdp_sum(fixed)

    def exact(sigma: float) -> float:
        return _epsilon_of_rdp(base + _rdp_curve(sigma, q) * steps, delta)

    if hint is not None and exact(hint) <= target < exact(hint * (1 - 2e-6)):
        return hint

    lo, hi = _bracket(exact, target, steps)
    if exact(lo) <= target:
        return lo
    sigma = float(brentq(lambda x: exact(x) - target, lo, hi, rtol=1e-6))
    for k in range(60):
        if exact(sigma) <= target:
            return sigma
        sigma *= 1 + 1e-7 * 2**k
    return hi  # not reached: exact(hi) <= target


def calibrate_remaining(target_epsilon: float, delta: float,
                        history: Sequence[tuple[float, float, int]], sample_rate: float,
                        steps: int, accountant: str = "rdp",
                        extra: Sequence[tuple[float, float, int]] = ()) -> float:
    """Noise multiplier for ``steps`` more steps at ``sample_rate`` so that the total
    (``history`` + ``extra`` + these steps) spends at most ``target_epsilon``.

    ``history`` is what was spent already (e.g. before a resume), ``extra`` other planned
    releases (e.g. noised evaluations). Cached per argument set.

    Raises:
        BudgetError: the history and ``extra`` alone reach the target.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    ext = tuple((float(s), float(q), int(n)) for s, q, n in extra if n > 0)
    if steps <= 0:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _calibrate_remaining(float(target_epsilon), float(delta), key, ext,
                                float(sample_rate), int(steps), accountant)


def per_example_norms(model: nn.Module) -> torch.Tensor:
    """Per-example gradient norms of the last ghost-clipped step (for tests/debugging)."""
    return model.per_sample_gradient_norms  # type: ignore[no-any-return,operator]


def user_level_noise(cfg: PrivacyConfig, history: Sequence[tuple[float, float, int]],
                     rounds_left: int) -> float:
    """Noise multiplier z of user-level DP-FedAvg for the next round.

    ``user-target-epsilon`` > 0: z is calibrated so that the rounds already noised
    (``history``, from the server checkpoint) plus ``rounds_left`` more spend at most the
    target, so a resume with more rounds spreads what remains. Else
    ``user-noise-multiplier``. Accounted without subsampling amplification (as if every
    client took part every round): exact at fraction 1, conservative below.

    Raises:
        BudgetError: the history alone reaches the target.
    """
    if cfg.user_target_epsilon > 0:
        return calibrate_remaining(cfg.user_target_epsilon, cfg.delta, history, 1.0,
                                   max(1, rounds_left), "rdp")
    return cfg.user_noise_multiplier


# --- Skellam mechanism (distributed user-level DP, fedrec.ddp) -------------------------

SKELLAM_ORDERS = tuple(range(2, 257))  # integer Renyi orders
SkellamHistory = list[tuple[float, float, float, int]]  # (mu, l2, l1, releases)


def skellam_rdp(alpha: int, mu: float, l2: float, l1: float) -> float:
    """RDP of the d-dimensional Skellam mechanism ``x + Sk(mu, mu)^d`` at order ``alpha``.

    Agarwal, Kairouz, Liu (NeurIPS 2021), the multi-dimensional Skellam mechanism with
    L2 / L1 sensitivities ``l2``, ``l1``: ``alpha l2^2 / (4 mu) + min(((2 alpha - 1)
    l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu))``. ``Sk(mu, mu)`` is the difference of two
    Poisson(mu) variables (variance 2 mu); a sum of independent Skellam variables is
    Skellam, so clients' shares add up exactly.
    """
    if mu <= 0:
        return math.inf
    return (alpha * l2 * l2 / (4 * mu)
            + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu)))


def skellam_epsilon(history: Sequence[tuple[float, float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of composed Skellam releases ``(mu, l2, l1, count)``."""
    return _skellam_epsilon(tuple((float(m), float(a), float(b), int(n))
                                  for m, a, b, n in history), float(delta))


@functools.lru_cache(maxsize=4096)
def _skellam_epsilon(history: tuple[tuple[float, float, float, int], ...],
                     delta: float) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    rdp = [sum(n * skellam_rdp(a, mu, l2, l1) for mu, l2, l1, n in history)
           for a in SKELLAM_ORDERS]
    with warnings.catch_warnings():  # an extreme optimal order only loosens the bound
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def add_skellam_entry(history: Sequence[tuple[float, float, float, int]],
                      entry: tuple[float, float, float, int]) -> SkellamHistory:
    """``history`` + ``entry``, joined to the last entry when (mu, l2, l1) match."""
    out = [(float(m), float(a), float(b), int(n)) for m, a, b, n in history]
    if out and out[-1][:3] == tuple(float(x) for x in entry[:3]):
        out[-1] = (*out[-1][:3], out[-1][3] + int(entry[3]))
    else:
        out.append((float(entry[0]), float(entry[1]), float(entry[2]), int(entry[3])))
    return out


def calibrate_skellam(target_epsilon: float, delta: float,
                      history: Sequence[tuple[float, float, float, int]], l2: float,
                      l1: float, releases: int,
                      scaled: Sequence[tuple[float, float, float, int]] = ()) -> float:
    """The smallest total ``mu`` such that ``history`` plus ``releases`` more releases at
    sensitivity (``l2``, ``l1``) spend at most ``target_epsilon``; ``scaled`` adds
    releases ``(factor, l2, l1, count)`` whose parameter is ``factor * mu``.

    Raises:
        BudgetError: the history alone reaches the target.
    """
    hist = [tuple(h) for h in history]
    if skellam_epsilon(hist, delta) >= target_epsilon * (1 - 1e-3):
        raise BudgetError(f"epsilon already spent ({skellam_epsilon(hist, delta):.3f}) "
                          f"reaches the target {target_epsilon:g}")

    def eps(mu: float) -> float:
        more = [(f * mu, a, b, n) for f, a, b, n in scaled]
        return skellam_epsilon(hist + more + [(mu, l2, l1, releases)], delta)

    lo, hi = 1e-6 * l2 * l2, l2 * l2
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 4
    while eps(lo) <= target_epsilon and lo > 1e-12:
        lo /= 4
    for _ in range(80):  # geometric bisection; keep eps(hi) <= target
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return hi
