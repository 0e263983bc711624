"""DP-SGD: exact per-example clipping against brute force, and accounting."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from fedrec.config import ModelConfig, PrivacyConfig
from fedrec.model import build_model
from fedrec.privacy import (
    RowLoss,
    _BookkeepingDPLoss,
    calibrate_noise,
    epsilon_of,
    make_private,
    supports_bookkeeping,
)

B, K, U, N_ITEMS = 12, 4, 6, 9


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, U, (B,), generator=g)
    items = torch.randint(0, N_ITEMS, (B, K), generator=g)
    items[0] = torch.tensor([2, 2, 5, 2])  # repeated rows inside one example
    items[1] = torch.tensor([3, 3, 3, 3])
    targets = torch.zeros(B, K)
    targets[:, 0] = 1
    return users, items, targets


def _brute_force(model: torch.nn.Module, objective: str) -> list[torch.Tensor]:
    users, items, targets = _batch()
    loss = RowLoss(objective, reduction="sum")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for b in range(B):
        out = loss(model(users[b:b + 1], items[b:b + 1]), targets[b:b + 1])
        g = torch.autograd.grad(out, params)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    return grads


@pytest.mark.parametrize("name", ["mf", "neumf", "mlp"])
@pytest.mark.parametrize("objective", ["bce", "bpr"])
@pytest.mark.parametrize("bookkeeping", [True, False])
def test_ghost_clipping_is_exact(name: str, objective: str, bookkeeping: bool) -> None:
    """Per-example norms and the clipped gradient equal brute force, both with fedrec's
    book-keeping and with Opacus's own two-pass ghost clipping."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=name, dim=5, mlp_layers="6,3"), U, N_ITEMS, seed=0)
    model.double()
    brute = _brute_force(model, objective)
    norms = torch.stack([g.norm() for g in brute])
    clip = float(norms.median())  # some examples clipped, some not
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = PrivacyConfig(dp=True, max_grad_norm=clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, opt, RowLoss(objective), cfg, sample_rate=0.5,
                          noise_multiplier=0.0)
    po.optimizer.expected_batch_size = B
    assert isinstance(po.criterion, _BookkeepingDPLoss)
    criterion = po.criterion if bookkeeping else DPLossFastGradientClipping(
        po.model, po.optimizer, RowLoss(objective), "mean")
    users, items, targets = _batch()
    loss = criterion(po.model(users, items), targets)
    loss.backward()
    got = po.model.per_sample_gradient_norms
    assert torch.allclose(got, norms, rtol=1e-6, atol=1e-7)  # sqrt of a cancelled 0
    po.optimizer.pre_step()  # clip, add (zero) noise, scale by the expected batch size
    dp_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = sum(f * g for f, g in zip(factors, brute)) / B
    assert torch.allclose(dp_grad, expected, rtol=1e-6, atol=1e-10)
    assert (factors < 1).any() and (factors == 1).any()


def test_hooks_mode_matches_ghost_norms() -> None:
    model = build_model(ModelConfig(model="neumf", dim=4, mlp_layers="4,2"), U, N_ITEMS, seed=1)
    model.double()
    brute = torch.stack([g.norm() for g in _brute_force(model, "bce")])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, opt, RowLoss("bce"),
                          PrivacyConfig(dp=True, grad_sample_mode="hooks"),
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


def test_accountant_continues_history() -> None:
    model = build_model(ModelConfig(model="mf", dim=3), U, N_ITEMS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, opt, RowLoss("bce"), PrivacyConfig(dp=True),
                          sample_rate=0.5, noise_multiplier=1.0, history=[(1.0, 0.5, 10)])
    po.optimizer.expected_batch_size = B
    users, items, targets = _batch()
    po.criterion(po.model(users, items), targets).backward()
    po.optimizer.step()
    assert po.accountant.history == [(1.0, 0.5, 11)]


def test_bookkeeping_only_for_fedrec_layers() -> None:
    model = build_model(ModelConfig(model="neumf", dim=3, mlp_layers="4"), U, N_ITEMS)
    assert supports_bookkeeping(model)
    model.mlp.append(torch.nn.LayerNorm(4))
    assert not supports_bookkeeping(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), RowLoss("bce"),
                          PrivacyConfig(dp=True), sample_rate=0.5, noise_multiplier=1.0)
    assert type(po.criterion) is DPLossFastGradientClipping
