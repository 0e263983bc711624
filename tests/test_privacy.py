"""DP-SGD: exact per-example clipping against brute force, and accounting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.overrides import TorchFunctionMode

from fedrec import privacy
from fedrec.config import ModelConfig, PrivacyConfig
from fedrec.features import ITEM_SLOTS, USER_SLOTS, Features, with_context
from fedrec.model import Embedding, Linear, build_model
from fedrec.privacy import (
    PrivateObjects,
    RowLoss,
    _BookkeepingDPLoss,
    calibrate_noise,
    epsilon_of,
    make_private,
    supports_bookkeeping,
)
from fedrec.text import TEXT_DIM

B, K, U, N_ITEMS = 12, 4, 6, 9

# (dim, mlp-layers). With K = 4, every "small" Linear layer takes the direct bmm formula;
# "large" is the default NeuMF shape, whose first MLP layers (64 -> 64, 64 -> 32) take the
# Gram formula. mse rows have K = 1 (the k == 1 formulas); "tower" applies Linear layers
# to the user vector alone (2-D activations, one layer without bias).
SIZES = {"small": (5, "6,3"), "large": (32, "64,32,16")}
CASES = [(name, size, objective)
         for name in ("mf", "neumf", "mlp", "deepfm", "widedeep", "deepfm-text", "deepfm-ctx",
                      "widedeep-ctx", "tower")
         for size in SIZES for objective in ("bce", "bpr", "mse")]
BUCKETS = 7  # few feature-value rows, so examples share and repeat them


class _Tower(nn.Module):
    """Scores ``<q_i, head(tanh(proj(p_u)))>``: Linear layers with one position per
    example; ``proj`` has no bias; ``use_head=False`` leaves ``head`` out of the graph."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user_emb, self.item_emb = Embedding(U, dim), Embedding(N_ITEMS, dim)
        self.proj = Linear(dim, dim, bias=False)
        self.head = Linear(dim, dim)
        self.use_head = True

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.user_emb(users)))  # [B, d]
        if self.use_head:
            h = self.head(h)
        return (self.item_emb(items) * h.unsqueeze(1)).sum(-1)  # [B, K]


def _model(name: str, size: str) -> nn.Module:
    dim, mlp = SIZES[size]
    if name == "tower":
        return _Tower(dim).double()
    text = name.endswith("-text")  # title vectors through a shared projection
    ctx = name.endswith("-ctx")  # each example's context (hour, weekday, the item's age)
    cfg = ModelConfig(model=name.split("-")[0], dim=dim, mlp_layers=mlp, init_std=0.5,
                      feature_buckets=BUCKETS, item_text="on" if text else "off",
                      context="on" if ctx else "off")
    g = torch.Generator().manual_seed(3)
    # value ids with empty slots (0) and values repeated within a row and across rows
    vectors = None
    if text:  # item 4 has no title: its text is zero and left out
        vectors = torch.randn(N_ITEMS, TEXT_DIM, generator=g)
        vectors[4] = 0.0
    features = Features(torch.randint(0, BUCKETS, (N_ITEMS, ITEM_SLOTS), generator=g),
                        torch.randint(0, BUCKETS, (U, USER_SLOTS), generator=g), vectors,
                        # release years, two unknown (0): their age slot stays empty
                        torch.tensor([1990, 0, 1996, 1998, 1999, 0, 1980, 1997, 1995]), ctx)
    model = build_model(cfg, U, N_ITEMS, seed=0, features=features).double()
    if cfg.model in ("deepfm", "widedeep"):
        with torch.no_grad():  # non-zero biases and crosses, so every table's gradient counts
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.5, generator=g)
    return model


def _batch(objective: str = "bce", dtype: torch.dtype = torch.float64,
           model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch; for a ``model`` that reads context, users come with it (hours and
    weekdays repeated across examples, years that give several item ages)."""
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, U, (B,), generator=g)
    if getattr(model, "reads_context", False):
        t = torch.randint(800_000_000, 900_000_000, (B,), generator=g).numpy()  # 1995-98
        t[:3] = t[0]  # three examples at the same moment
        users = with_context(users.numpy(), t)
    if objective == "mse":  # explicit feedback: one rated item per example, K = 1
        items = torch.randint(0, N_ITEMS, (B, 1), generator=g)
        return users, items, torch.randint(1, 6, (B, 1), generator=g).to(dtype)
    items = torch.randint(0, N_ITEMS, (B, K), generator=g)
    items[0] = torch.tensor([2, 2, 5, 2])  # repeated rows inside one example
    items[1] = torch.tensor([3, 3, 3, 3])
    targets = torch.zeros(B, K, dtype=dtype)
    targets[:, 0] = 1
    return users, items, targets


def _brute_force(model: nn.Module, objective: str) -> list[torch.Tensor]:
    """Per-example gradients over the trainable parameters, one autograd call each."""
    users, items, targets = _batch(objective, model=model)
    loss = RowLoss(objective, reduction="sum")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for b in range(B):
        out = loss(model(users[b:b + 1], items[b:b + 1]), targets[b:b + 1])
        g = torch.autograd.grad(out, params, allow_unused=True, materialize_grads=True)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    return grads


def _private(model: nn.Module, objective: str, clip: float,
             bookkeeping: bool) -> tuple[PrivateObjects, DPLossFastGradientClipping]:
    """Ghost clipping without noise; fedrec's book-keeping loss or Opacus's two-pass one."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, opt, RowLoss(objective), PrivacyConfig(dp=True, max_grad_norm=clip),
                          sample_rate=0.5, noise_multiplier=0.0)
    po.optimizer.expected_batch_size = B
    assert isinstance(po.criterion, _BookkeepingDPLoss) == supports_bookkeeping(model)
    criterion = po.criterion if bookkeeping else DPLossFastGradientClipping(
        po.model, po.optimizer, RowLoss(objective), "mean")
    return po, criterion


def _clipped_mean(brute: list[torch.Tensor], norms: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus's clipped average: factors ``clip / (norm + 1e-6)`` capped at 1."""
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return sum(f * g for f, g in zip(factors, brute)) / B


def _dp_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def _assert_exact(model: nn.Module, objective: str, bookkeeping: bool) -> None:
    brute = _brute_force(model, objective)
    norms = torch.stack([g.norm() for g in brute])
    clip = float(norms.median())  # some examples clipped, some not
    po, criterion = _private(model, objective, clip, bookkeeping)
    users, items, targets = _batch(objective, model=model)
    criterion(po.model(users, items), targets).backward()
    # bpr's example 1 (positive = negatives) has norm 0: its ghost norm is the sqrt of a
    # cancelled sum, hence the absolute tolerance
    assert torch.allclose(po.model.per_sample_gradient_norms, norms, rtol=1e-9,
                          atol=1e-7 * float(norms.max()))
    po.optimizer.pre_step()  # clip, add (zero) noise, scale by the expected batch size
    assert torch.allclose(_dp_grad(model), _clipped_mean(brute, norms, clip),
                          rtol=1e-9, atol=1e-14)
    factors = clip / (norms + 1e-6)
    assert (factors < 1).any() and (factors > 1).any()


@pytest.mark.parametrize("bookkeeping", [True, False], ids=["bookkeeping", "two-pass"])
@pytest.mark.parametrize(("name", "size", "objective"), CASES)
def test_ghost_clipping_is_exact(name: str, size: str, objective: str, bookkeeping: bool) -> None:
    """Per-example norms and the clipped gradient equal brute force, both with fedrec's
    book-keeping and with Opacus's own two-pass ghost clipping, for every model, objective
    and formula (``test_cases_reach_every_norm_formula`` checks the formulas are reached)."""
    _assert_exact(_model(name, size), objective, bookkeeping)


class _TorchCalls(TorchFunctionMode):
    """Records the names of the torch functions called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("repeats", [False, True], ids=["distinct-rows", "repeated-rows"])
def test_embedding_norms_equal_each_examples_gradient(repeats: bool) -> None:
    """The embedding norm (diagonal plus the pairs of positions that repeat a row) equals
    the norm of each example's own table gradient, with and without repeated rows."""
    layer = Embedding(10, 3).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(6)])
    if repeats:
        ids[2], ids[4] = torch.tensor([7, 1, 7, 7]), torch.tensor([5, 5, 0, 0])
        ids[0] = torch.tensor([4, 9, 2, 4])  # a repeat that is not side by side
    back = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    norms = privacy.embedding_norm_sample(layer, [ids], back)[layer.weight]
    for b in range(6):
        grad = torch.zeros(10, 3, dtype=torch.float64).index_add_(0, ids[b], back[b])
        assert norms[b].item() == pytest.approx(grad.norm().item(), rel=1e-12), b


def test_a_repeated_row_whose_lookups_cancel_is_not_rounded_to_zero() -> None:
    """float32: two lookups of one row, large and nearly opposite. Their sum (what the
    example adds to the table) has norm ~1; an inner-product form (diagonal plus pairs)
    cancels to ~0 and the example would pass unclipped."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(8, generator=gen) * 3000
    w = torch.randn(8, generator=gen)
    w /= w.norm()
    g = torch.stack([v, -v + w]).unsqueeze(0)  # [1, K=2, d], float32
    true = (g[0, 0].double() + g[0, 1].double()).norm().item()
    got = privacy.lookup_sq_norms(g, torch.tensor([[5, 5]])).sqrt().item()
    assert got == pytest.approx(true, rel=1e-3)


def test_a_linear_gram_norm_whose_terms_cancel_is_recomputed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """float32, Gram form (K = 2, d 8 -> 64): the two positions' gradients are large and
    nearly opposite on one input, so G_b = w a^T has norm |w| |a| ~ 1 while the Gram
    terms cancel to ~0; the example's norm is recomputed, weight and bias."""
    gen = torch.Generator().manual_seed(5)
    d_in, d_out = 8, 64
    layer = Linear(d_in, d_out)
    v = torch.randn(d_out, generator=gen) * 1e7
    w = torch.randn(d_out, generator=gen)
    w /= w.norm()
    a_vec = torch.randn(d_in, generator=gen)
    a_vec /= a_vec.norm()
    typical_a = torch.randn(1, 2, d_in, generator=gen)
    typical_g = torch.randn(1, 2, d_out, generator=gen)
    a = torch.cat([torch.stack([a_vec, a_vec]).unsqueeze(0), typical_a])  # [2, K, d_in]
    g = torch.cat([torch.stack([v, -v + w]).unsqueeze(0), typical_g])  # [2, K, d_out]
    assert d_in * d_out > privacy.GRAM_COST * 2 * (d_in + d_out)  # the Gram form is taken
    grams: list[int] = []
    real_gram = privacy._gram
    monkeypatch.setattr(privacy, "_gram", lambda x: grams.append(1) or real_gram(x))
    norms = privacy.linear_norm_sample(layer, [a], g)
    assert grams  # the Gram form ran (and its recheck caught example 0)
    for b in range(2):
        grad = sum(torch.outer(g[b, k].double(), a[b, k].double()) for k in range(2))
        assert norms[layer.weight][b].item() == pytest.approx(grad.norm().item(), rel=1e-3)
        bias = (g[b, 0].double() + g[b, 1].double()).norm().item()
        assert norms[layer.bias][b].item() == pytest.approx(bias, rel=1e-3)


def test_a_wide_linear_gram_norm_just_above_the_recheck_is_not_rounded_down() -> None:
    """A review's case: float32 sums over a wide output (4,096) lose every small tail
    term, a result just above the recheck threshold was 1.2e-3 low; and entries near
    1e19 made the Gram form NaN (never rechecked). Both must match the true norm."""
    d = 4096
    t = 0.999 * 2.0 ** -12
    g = torch.full((2, 2, d), t)
    g[0, 0, :8], g[0, 1, :8] = 1.0, -1.2236
    a = torch.zeros(2, 2, 8)
    a[0, :, 0] = 1.0
    g[1] = 0.0
    g[1, 0, 0], g[1, 1, 0], g[1, 1, 1] = 2e19, -2e19, 1e19
    a[1, :, 0], a[1, 1, 1] = 1e-19, 1e-19
    layer = Linear(8, d)
    norms = privacy.linear_norm_sample(layer, [a], g)[layer.weight]
    for b in range(2):
        grad = sum(torch.outer(g[b, k].double(), a[b, k].double()) for k in range(2))
        assert norms[b].item() == pytest.approx(grad.norm().item(), rel=1e-5), b


def test_cases_reach_every_norm_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """CASES exercise every branch of the norm samplers and of book-keeping, and the cost
    rule picks bmm or Gram where one is clearly cheaper: a change of sizes or of the rule
    cannot silently drop a formula from ``test_ghost_clipping_is_exact``."""
    seen: set[str] = set()
    linear_calls: list[tuple[int, int, int, str]] = []  # (k, d_in, d_out, formula)
    grams: list[torch.Size] = []
    real_gram, real_bk = privacy._gram, privacy._bookkeeping_grads

    def gram_spy(x: torch.Tensor) -> torch.Tensor:
        grams.append(x.shape)
        return real_gram(x)

    def embedding_spy(layer, activations, backprops):  # type: ignore[no-untyped-def]
        out = privacy.embedding_norm_sample(layer, activations, backprops)
        ids = activations[0].reshape(activations[0].shape[0], -1)
        repeats = int((ids.unsqueeze(2) == ids.unsqueeze(1)).sum()) > ids.numel()
        seen.add("embedding-k1" if ids.shape[1] == 1 else
                 "embedding-repeats" if repeats else "embedding-distinct")
        return out

    def linear_spy(layer, activations, backprops):  # type: ignore[no-untyped-def]
        n = len(grams)
        with _TorchCalls() as calls:
            out = privacy.linear_norm_sample(layer, activations, backprops)
        a, g = layer._fedrec_bk
        k = a.shape[1]
        formula = ("k1" if k == 1 else "gram" if len(grams) > n
                   else "bmm" if "bmm" in calls.names else "unknown")
        linear_calls.append((k, a.shape[2], g.shape[2], formula))
        seen.add(f"linear-{formula}")
        seen.add(f"linear-{backprops.dim()}d")
        seen.add("bias-none" if layer.bias is None else f"bias-{formula}")
        return out

    def bk_spy(layer: nn.Module, coef: torch.Tensor) -> None:
        kind = type(layer).__name__
        if isinstance(layer, Linear):
            kind += "-bias" if layer.bias is not None else "-no-bias"
        seen.add(f"bookkeeping-{kind}")
        real_bk(layer, coef)

    samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    monkeypatch.setattr(privacy, "_gram", gram_spy)
    monkeypatch.setattr(privacy, "_bookkeeping_grads", bk_spy)
    monkeypatch.setitem(samplers, Embedding, embedding_spy)
    monkeypatch.setitem(samplers, Linear, linear_spy)
    for name, size, objective in CASES:
        model = _model(name, size)
        po, criterion = _private(model, objective, 1.0, bookkeeping=True)
        users, items, targets = _batch(objective, model=model)
        criterion(po.model(users, items), targets).backward()

    assert seen >= {
        "embedding-k1", "embedding-repeats",
        "linear-2d", "linear-3d", "linear-k1", "linear-bmm", "linear-gram",
        "bias-none", "bias-k1", "bias-bmm", "bias-gram",
        "bookkeeping-Embedding", "bookkeeping-Linear-bias", "bookkeeping-Linear-no-bias",
    }, seen
    assert "linear-unknown" not in seen
    # bmm costs K d_in d_out, Gram GRAM_COST K^2 (d_in + d_out) (float64): take bmm when it
    # is no dearer, and Gram when bmm is clearly dearer (both cases occur in CASES)
    cost = privacy.GRAM_COST
    bmm_cheaper = [f for k, i, o, f in linear_calls if k > 1 and i * o <= cost * k * (i + o)]
    gram_cheaper = [f for k, i, o, f in linear_calls if k > 1 and i * o > 6 * k * (i + o)]
    assert bmm_cheaper and set(bmm_cheaper) == {"bmm"}
    assert gram_cheaper and set(gram_cheaper) == {"gram"}


def test_layer_left_out_of_the_graph_gets_zero_gradient() -> None:
    """Book-keeping gives a layer this batch's graph does not reach a zero gradient (not
    None, which the DP optimizer would fail on). Opacus keeps that layer's norms from the
    last batch that reached it: the norms used then over-estimate, which is safe, not exact."""
    model, objective = _model("tower", "small"), "bce"
    model.use_head = False
    brute = _brute_force(model, objective)  # zero for head
    true_norms = torch.stack([g.norm() for g in brute])
    clip = float(true_norms.median())
    model.use_head = True
    po, criterion = _private(model, objective, clip, bookkeeping=True)
    users, items, targets = _batch(objective)
    criterion(po.model(users, items), targets).backward()  # reaches head
    po.optimizer.zero_grad(set_to_none=True)  # as fedrec.train does
    model.use_head = False
    criterion(po.model(users, items), targets).backward()  # does not
    used = po.model.per_sample_gradient_norms
    assert (used >= true_norms * (1 - 1e-9)).all()
    po.optimizer.pre_step()
    assert torch.allclose(_dp_grad(model), _clipped_mean(brute, used, clip),
                          rtol=1e-9, atol=1e-14)
    assert not model.head.weight.grad.any() and not model.head.bias.grad.any()


def test_ghost_clipping_with_frozen_tables() -> None:
    """Frozen MLP embedding tables: book-keeping (which back-propagates to the trainable
    tables only) is not used, and Opacus's two-pass clipping is exact for the MLP."""
    model = _model_frozen()
    assert not supports_bookkeeping(model)
    _assert_two_pass(model)
    _assert_exact(_model_frozen(), "bce", False)


def _assert_two_pass(model: nn.Module) -> None:
    """make_private falls back to Opacus's own two-pass DP loss for ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), RowLoss("bce"),
                          PrivacyConfig(dp=True, max_grad_norm=1.0), sample_rate=0.5, noise_multiplier=1.0)
    assert type(po.criterion) is DPLossFastGradientClipping


def _model_frozen() -> nn.Module:
    model = _model("neumf", "small")
    model.user_mlp.weight.requires_grad_(False)
    model.item_mlp.weight.requires_grad_(False)
    return model


def test_hooks_mode_matches_ghost_norms() -> None:
    model = build_model(ModelConfig(model="neumf", dim=4, mlp_layers="4,2"), U, N_ITEMS, seed=1)
    model.double()
    brute = torch.stack([g.norm() for g in _brute_force(model, "bce")])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, opt, RowLoss("bce"),
                          PrivacyConfig(dp=True, grad_sample_mode="hooks", max_grad_norm=1.0),
                          sample_rate=0.5, noise_multiplier=0.0)
    users, items, targets = _batch()
    po.criterion(po.model(users, items), targets).backward()
    per = torch.stack([torch.cat([p.grad_sample[b].reshape(-1) for p in model.parameters()])
                       for b in range(B)])
    assert torch.allclose(per.norm(dim=1), brute, rtol=1e-6)


def test_epsilon_grows_and_calibration_hits_target() -> None:
    q, steps, delta = 0.1, 200, 1e-5
    sigma = calibrate_noise(3.0, delta, q, steps)
    eps = epsilon_of([(sigma, q, steps)], delta)
    assert eps == pytest.approx(3.0, abs=0.05)
    assert epsilon_of([(sigma, q, steps * 2)], delta) > eps
    assert epsilon_of([], delta) == 0.0
    # regression value (Opacus RDP): sigma 1.0, q 0.1, 200 steps, delta 1e-5
    assert epsilon_of([(1.0, 0.1, 200)], delta) == pytest.approx(11.0, abs=0.3)


def test_epsilon_of_equals_opacus_accountant_and_calibration_is_tight() -> None:
    """The cached per-entry RDP curves compose to Opacus's own epsilon, bit for bit; the
    noise found for what remains spends the target (never more, by a hair less)."""
    from opacus.accountants import RDPAccountant

    from fedrec.privacy import calibrate_remaining

    rng = np.random.default_rng(3)
    for _ in range(30):
        hist = [(float(rng.uniform(0.4, 6)), float(rng.choice([0.005, 0.05, 0.3, 1.0])),
                 int(rng.integers(1, 400))) for _ in range(int(rng.integers(1, 5)))]
        acc = RDPAccountant()
        acc.history = list(hist)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert epsilon_of(hist, 1e-5) == acc.get_epsilon(1e-5), hist
    for history, extra, target in (([], [], 8.0), ([(1.3, 0.05, 80)], [(2.0, 1.0, 3)], 7.0),
                                   ([(0.9, 0.1, 40), (1.1, 0.1, 40)], [], 12.0)):
        sigma = calibrate_remaining(target, 1e-5, history, 0.05, 120, "rdp", extra)
        fixed = history + extra
        assert epsilon_of(fixed + [(sigma, 0.05, 120)], 1e-5) <= target
        assert epsilon_of(fixed + [(sigma * (1 - 1e-4), 0.05, 120)], 1e-5) > target
    # with no history it is Opacus's own calibration (to its tolerance)
    assert calibrate_remaining(3.0, 1e-5, [], 0.1, 200) == pytest.approx(
        calibrate_noise(3.0, 1e-5, 0.1, 200), rel=0.02)


def test_calibration_reuses_last_rounds_sigma_only_when_it_is_the_root() -> None:
    """A run that keeps its plan calibrates the sigma of its last round again (taken
    without a search); a plan with fewer or more rounds left gets its own tight sigma,
    never one that overspends."""
    from fedrec.privacy import calibrate_remaining

    q, steps, target = 0.05, 40, 6.0
    first = calibrate_remaining(target, 1e-5, [], q, steps * 5)
    history = [(first, q, steps)]
    assert calibrate_remaining(target, 1e-5, history, q, steps * 4) == first
    for left in (2, 8):  # a resume with fewer or more rounds than planned
        sigma = calibrate_remaining(target, 1e-5, history, q, steps * left)
        assert (sigma < first) == (left < 4)
        assert epsilon_of(history + [(sigma, q, steps * left)], 1e-5) <= target
        assert epsilon_of(history + [(sigma * (1 - 1e-4), q, steps * left)], 1e-5) > target


def test_accountant_continues_history() -> None:
    model = build_model(ModelConfig(model="mf", dim=3), U, N_ITEMS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, opt, RowLoss("bce"), PrivacyConfig(dp=True, max_grad_norm=1.0),
                          sample_rate=0.5, noise_multiplier=1.0, history=[(1.0, 0.5, 10)])
    po.optimizer.expected_batch_size = B
    users, items, targets = _batch(dtype=torch.float32)
    po.criterion(po.model(users, items), targets).backward()
    po.optimizer.step()
    assert po.accountant.history == [(1.0, 0.5, 11)]


def test_bookkeeping_only_for_fedrec_layers() -> None:
    model = build_model(ModelConfig(model="neumf", dim=3, mlp_layers="4"), U, N_ITEMS)
    assert supports_bookkeeping(model)
    model.mlp.append(torch.nn.LayerNorm(4))
    assert not supports_bookkeeping(model)
    _assert_two_pass(model)


def test_bookkeeping_stops_the_norm_pass_at_the_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Book-keeping's norm pass differentiates w.r.t. the lookups' outputs (kept by a
    forward hook), not the tables: no dense table gradient is formed before the clipped
    one, and the result is still exact (``_assert_exact`` on the same model)."""
    model, objective = _model("neumf", "small"), "bce"
    tables = [m for m in model.modules() if isinstance(m, Embedding)]
    po, criterion = _private(model, objective, 1.0, bookkeeping=True)
    users, items, targets = _batch(objective)
    loss = criterion(po.model(users, items), targets)
    assert all(getattr(m, "_fedrec_out", None) is not None for m in tables)
    calls: list[int] = []
    real_grad = torch.autograd.grad

    def grad_spy(outputs, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(inputs))
        assert not any(isinstance(i, nn.Parameter) for i in inputs)
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad_spy)
    loss.backward()
    assert calls == [len(tables)]
    assert not any(hasattr(m, "_fedrec_out") for m in tables)
    monkeypatch.undo()
    _assert_exact(_model("neumf", "small"), objective, bookkeeping=True)


def test_a_forward_between_loss_and_backward_cannot_leave_stale_norms() -> None:
    """A review's case: a forward between a DP loss and its backward. In eval mode it
    keeps nothing (the step stays exact); a training forward with Opacus's hooks off
    would swap in lookups of another graph: the backward raises instead of leaving
    layers without norms (and clipping with the last batch's)."""
    model, objective = _model("neumf", "small"), "bce"
    brute = _brute_force(model, objective)
    norms = torch.stack([g.norm() for g in brute])
    clip = float(norms.median())
    po, criterion = _private(model, objective, clip, bookkeeping=True)
    users, items, targets = _batch(objective)
    loss = criterion(po.model(users, items), targets)
    po.model.eval()
    po.model(users, items)  # with gradients on, in eval mode
    po.model.train()
    loss.backward()
    assert torch.allclose(po.model.per_sample_gradient_norms, norms, rtol=1e-9,
                          atol=1e-7 * float(norms.max()))
    po.optimizer.pre_step()
    assert torch.allclose(_dp_grad(model), _clipped_mean(brute, norms, clip),
                          rtol=1e-9, atol=1e-14)
    po.optimizer.zero_grad()
    loss = criterion(po.model(users, items), targets)
    po.model.disable_hooks()
    po.model(users, items)
    po.model.enable_hooks()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        loss.backward()
