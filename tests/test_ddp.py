"""Distributed user-level DP: encoding, exact sums, accounting, and the SecAgg+ path."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrec import ddp, privacy
from fedrec.config import RunConfig
from fedrec.data import load_split
from fedrec.federated import ddp_client_round, init_shared, split_for_users
from fedrec.partition import partition_users

FLAT = {"synthetic-users": 30, "synthetic-items": 50, "dim": 4, "batch-size": 32,
        "negatives": 2, "partition": "cross-silo", "num-clients": 5, "min-clients": 5,
        "rounds": 2, "dp": False, "ddp": True, "user-target-epsilon": 8.0, "verbose": False}


def _plan(mu: float = 0.0, dim: int = 40, n_min: int = 4) -> ddp.DDPPlan:
    return ddp.DDPPlan(clip=0.5, eval_clip=3.0, l_update=2.0 ** 16, l_eval=2.0 ** 15,
                       dim=dim, n_min=n_min, mu_client=mu)


def test_encoded_integers_sum_to_the_clipped_updates_within_the_rounding_bound() -> None:
    rng = np.random.default_rng(0)
    plan = _plan()
    updates = [rng.normal(0, 1, 31) for _ in range(5)]  # norms >> clip: all clipped
    counts = [rng.uniform(0, 1, 9) for _ in range(5)]
    total = sum(ddp.encode(u, c, plan, rng) for u, c in zip(updates, counts))
    upd, cnt = ddp.decode(total, plan, 31)
    clipped = sum(u * min(1.0, 0.5 / np.linalg.norm(u)) for u in updates)
    # randomized rounding moves each client by < 1 per integer coordinate
    assert np.linalg.norm(upd - clipped) <= 5 * math.sqrt(31) * 0.5 / 2 ** 16
    assert np.allclose(cnt, sum(counts), atol=5 * 3.0 / 2 ** 15)
    assert all(np.linalg.norm(u * min(1.0, 0.5 / np.linalg.norm(u))) <= 0.5 + 1e-12
               for u in updates)


def test_noise_shares_add_up_to_the_planned_skellam_variance() -> None:
    rng = np.random.default_rng(1)
    plan = _plan(mu=50.0, dim=20000, n_min=8)
    zero = np.zeros(plan.dim - 9)
    total = sum(ddp.encode(zero, np.zeros(9), plan, rng) for _ in range(8))
    # Sk(8 x 50): variance 2 x 400 = 800; 20,000 coordinates pin it to ~1%
    assert np.var(total) == pytest.approx(2 * plan.mu_total, rel=0.05)
    assert abs(np.mean(total)) < 1.0


def test_skellam_shares_of_many_clients_are_one_draw_of_their_sum() -> None:
    rng = np.random.default_rng(2)
    plan = _plan(mu=50.0, dim=20000, n_min=8)
    total = ddp.skellam_shares(plan, 8, rng)
    assert np.var(total) == pytest.approx(2 * 8 * 50.0, rel=0.05)
    # without its share a client's integers are its rounded values only, unbiased
    assert not ddp.encode(np.zeros(plan.dim - 9), np.zeros(9), plan, rng, share=False).any()
    x = np.full(plan.dim - 9, 1e-6) * np.arange(plan.dim - 9) % 3e-6  # fractions 0, 1/3, 2/3
    ints = ddp.encode(x, np.zeros(9), plan, rng, share=False)[:-9]
    scaled = x * plan.l_update / plan.clip * min(1.0, plan.clip / np.linalg.norm(x))
    assert np.all(np.abs(ints - scaled) < 1)
    assert np.mean(ints - scaled) == pytest.approx(0.0, abs=0.02)


@pytest.mark.parametrize("exact", [False, True])
def test_in_process_sum_carries_the_survivors_noise_shares_once(
        exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched in-process run adds the survivors' shares to the sum as one draw (its
    clients' replies carry none), or, with exact_noise, each reply carries its own: either
    way the secure sum minus the clients' noise-free integers has variance 2 mu per
    surviving client."""
    import fedrec.inprocess as inprocess

    replies: list[tuple[np.ndarray, ddp.DDPPlan]] = []
    totals: list[np.ndarray] = []
    original = inprocess.ddp_client_round

    def client(*args: Any, **kwargs: Any) -> Any:
        rep = original(*args, **{**kwargs, "share": False})  # its noise-free integers
        if rep.ints is not None:
            replies.append((rep.ints, args[5]))
            if kwargs.get("share", True):  # the share it sends
                rep.ints = rep.ints + ddp.skellam_shares(args[5], 1, np.random.default_rng())
        return rep

    monkeypatch.setattr(inprocess, "ddp_client_round", client)
    monkeypatch.setattr(ddp.DDPServer, "mean_update", _wrap(ddp.DDPServer.mean_update,
                                                            totals))
    flat = {**FLAT, "partition": "cross-device", "rounds": 1, "user-target-epsilon": 2.0,
            "synthetic-items": 400}  # ~2,000 coordinates a sum: its variance to ~3%
    noises = []
    for _ in range(2):  # OS entropy: a second run draws other noise
        replies.clear()
        totals.clear()
        inprocess.run_inprocess(RunConfig.from_flat(flat), exact_noise=exact)
        assert len(totals) == 2  # the training release and the final evaluation release
        start = 0
        for total in totals:
            plan = replies[start][1]
            n = sum(1 for _, p in replies[start:] if p is plan)
            noise = total - sum(ints for ints, _ in replies[start:start + n])
            start += n
            assert n == 30 and plan.mu_client > 100
            assert np.var(noise) == pytest.approx(2 * n * plan.mu_client, rel=0.15)
            noises.append(noise)
    assert not np.array_equal(noises[0], noises[2])


def test_in_process_sum_takes_a_share_per_client_that_survived(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With clients dropping after masking, the folded draw has one share for each client
    whose integers reached the sum: not the sampled count, not the planned minimum."""
    import fedrec.inprocess as inprocess

    took: list[int] = []
    sent: list[int] = []
    draw, client = inprocess.skellam_shares, inprocess.ddp_client_round

    def shares(plan: Any, n: int, rng: Any) -> Any:
        took.append(n)
        return draw(plan, n, rng)

    def counted(*args: Any, **kwargs: Any) -> Any:
        rep = client(*args, **kwargs)
        sent.append(kwargs["server_round"])
        return rep

    monkeypatch.setattr(inprocess, "skellam_shares", shares)
    monkeypatch.setattr(inprocess, "ddp_client_round", counted)
    flat = {**FLAT, "partition": "cross-device", "rounds": 1, "user-target-epsilon": 2.0}
    inprocess.run_inprocess(RunConfig.from_flat(flat), dropouts=0.2)
    per_release = [sent.count(r) for r in sorted(set(sent))]
    assert took == per_release == [24, 24]  # 30 sampled, 6 dropped (n_min: 27)


def _wrap(method: Any, seen: list[np.ndarray]) -> Any:
    def wrapped(self: Any, total: np.ndarray, plan: Any, denominator: int) -> Any:
        seen.append(total.copy())
        return method(self, total, plan, denominator)
    return wrapped


def test_skellam_accounting_against_hand_computed_values() -> None:
    # alpha 2, mu 100, l2 10, l1 20: 2*100/400 + min((3*100 + 120)/160000, 60/400)
    assert privacy.skellam_rdp(2, 100.0, 10.0, 20.0) == pytest.approx(0.5 + 420 / 160000)
    # alpha 3, mu 1, l2 4, l1 4: 3*16/4 + min((5*16 + 24)/16, 12/4) = 12 + 3
    assert privacy.skellam_rdp(3, 1.0, 4.0, 4.0) == pytest.approx(15.0)
    # large mu: the correction vanishes and Skellam composes like a Gaussian of std z l2
    l2, l1 = 65_600.0, 65_600.0 * 240
    mu = privacy.calibrate_skellam(8.0, 1e-5, [], l2, l1, 6)
    z = math.sqrt(2 * mu) / l2
    assert privacy.skellam_epsilon([(mu, l2, l1, 6)], 1e-5) <= 8.0
    assert privacy.skellam_epsilon([(mu, l2, l1, 6)], 1e-5) == pytest.approx(8.0, rel=1e-3)
    assert z == pytest.approx(privacy.calibrate_noise(8.0, 1e-5, 1.0, 6), rel=0.01)
    # resuming with history: the remaining budget is spread, never exceeded
    spent = [(mu, l2, l1, 3)]
    more = privacy.calibrate_skellam(8.0, 1e-5, spent, l2, l1, 6)
    assert more > mu
    assert privacy.skellam_epsilon(spent + [(more, l2, l1, 6)], 1e-5) <= 8.0
    with pytest.raises(privacy.BudgetError):
        privacy.calibrate_skellam(8.0, 1e-5, [(mu, l2, l1, 6)], l2, l1, 1)


def test_6040_clients_sum_without_wrap_around_through_flowers_quantisation() -> None:
    """Flower's own quantise/dequantise with fedrec's parameters is the identity on the
    clients' integers, and 6,040 clients at the extreme values sum without wrapping."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    n, c, t, m = 6040, ddp.CLIENT_BOUND, 2 * ddp.CLIENT_BOUND, ddp.MODULUS
    rng = np.random.default_rng(2)
    values = rng.choice([-c, c, 0, 1, -1], size=(n, 7)).astype(np.float64)
    values[:, 0] = c  # every client at the top of the range in one coordinate
    values[:, 1] = -c
    quantized = [quantize([v], float(c), t)[0] for v in values]
    assert all(np.array_equal(q, v + c) for q, v in zip(quantized, values))  # identity
    summed = np.mod(np.sum(quantized, axis=0), m)  # what unmasking yields
    mean = (dequantize([summed], float(c), t)[0] - (n - 1) * c) * (t / (n * t))
    from server.secagg import secure_sum
    assert np.array_equal(secure_sum(mean, n), values.sum(axis=0).astype(np.int64))
    assert n * c < m // 2  # the bound the centred decoding needs


@pytest.mark.parametrize("eps", [0.5, 8.0])
@pytest.mark.parametrize("n", [3, 943, 6040])
def test_a_client_value_stays_far_inside_the_secure_sum_bound(eps: float, n: int) -> None:
    cfg = RunConfig.from_flat({**FLAT, "user-target-epsilon": eps, "rounds": 20})
    plan = ddp.plan_round(cfg, sampled=n, dim=60_000, history=[], releases_left=21)
    assert plan.l_update + 12 * math.sqrt(2 * plan.mu_client) < ddp.CLIENT_BOUND


def test_secagg_shares_are_logarithmic_and_a_majority() -> None:
    k, t = ddp.secagg_shares(943, 0.1)
    assert 3 <= k <= 31 and t == k // 2 + 1
    fail = sum(math.comb(k, j) * 0.9 ** j * 0.1 ** (k - j) for j in range(t))
    assert 943 * fail <= 1e-3
    assert ddp.secagg_shares(5, 0.1) == (5, 3)


def _client(cfg: RunConfig, pid: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    split = load_split(cfg.data)
    users = partition_users("cross-silo", split.n_users, cfg.fed.num_clients, 0)[pid]
    return split_for_users(split, users), init_shared(cfg, split.n_items)


def test_a_client_refuses_a_plan_with_too_little_noise_for_its_cap() -> None:
    cfg = RunConfig.from_flat(FLAT)
    data, shared = _client(cfg)
    dim = sum(v.size for v in shared.values()) + len(ddp.count_keys(cfg))
    good = ddp.plan_round(cfg, sampled=5, dim=dim, history=[], releases_left=3)
    rep = ddp_client_round(cfg, data, shared, None, None, good, seed=0, server_round=1)
    assert rep.ints is not None and 0 < rep.epsilon <= 8.0
    assert rep.ledger.user_history and rep.ledger.unit.startswith("one client")
    stingy = ddp.client_plan(cfg, dim=dim, n_min=good.n_min, mu_client=good.mu_client / 50)
    refused = ddp_client_round(cfg, data, shared, None, None, stingy, seed=0, server_round=1)
    assert refused.ints is None and refused.ledger.user_history == []


# --- the Flower SecAgg+ path ----------------------------------------------------------

class _Recorder:
    """Wraps a Grid: keeps every reply the ServerApp receives (what the server sees)."""

    replies: list[Any] = []

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        got = list(self.inner.send_and_receive(messages, timeout=timeout))
        _Recorder.replies += got
        return got


def test_secagg_path_equals_in_process_and_the_server_sees_only_masked_vectors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import server.secagg as secagg
    from fedrec.attack import membership_auc
    from fedrec.federated import item_keys, shared_order
    from fedrec.inprocess import run_inprocess
    from tests.test_apps import _simulate

    original = secagg.run_secagg
    monkeypatch.setattr(secagg, "run_secagg",
                        lambda grid, *a: original(_Recorder(grid), *a))
    _Recorder.replies = []
    flat = {**FLAT, "insecure-noise-seed": 3, "ddp-prior": True,
            "state-dir": str(tmp_path / "state"), "out-dir": str(tmp_path / "run")}
    metrics = _simulate(flat, nodes=5)
    # the loop engine: what each ClientApp computes, bit for bit (the batched engine
    # equals it to float tolerance: tests/test_batched.py)
    shared, rows = run_inprocess(RunConfig.from_flat(flat), engine="loop")
    flower = torch.load(tmp_path / "run" / "shared_model.pt")
    for key, value in shared.items():  # the same integers, summed by SecAgg+
        np.testing.assert_array_equal(value, flower[key].numpy())
    flower_rows = json.loads((tmp_path / "run" / "rounds.json").read_text())
    for ours, theirs in zip(rows, flower_rows):
        for key in ("recall@20", "released-recall@20", "user-epsilon"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key
    assert metrics["user_epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert metrics["user_unit_of_privacy"].startswith("one client's whole data")

    # What the server received: SecAgg+ protocol records (public keys, encrypted shares,
    # masked vectors, unmasking shares) and, in the clear, weight 1 and status "Success"
    from flwr.common import bytes_to_ndarray

    cfg = RunConfig.from_flat(flat)
    n_items = load_split(cfg.data).n_items
    order, keys = shared_order(cfg, n_items), item_keys(cfg, n_items)
    protocol = {"pk1", "pk2", "ctxts", "dsts", "masked_params", "nids", "shares"}
    update_dim = sum(shared[k].size for k in order)
    items = np.unique(_client(cfg, 0)[0].train.items)
    aucs = []
    for msg in _Recorder.replies:
        assert not msg.has_error()
        content = msg.content
        assert all(len(r) == 0 for r in content.array_records.values())  # cleared by the mod
        assert {k: dict(v) for k, v in content.metric_records.items()} in (
            {}, {"fitres.num_examples": {"num_examples": 1}})
        config = {k: dict(v) for k, v in content.config_records.items()}
        assert set(config.pop("secaggplus_configs")) <= protocol
        assert config in ({}, {"fitres.metrics": {},
                               "fitres.status": {"code": 0, "message": "Success"}})
        masked = dict(content.config_records["secaggplus_configs"]).get("masked_params")
        if masked is None:
            continue
        vector = bytes_to_ndarray(masked[1]).ravel()  # masked[0]: the weight factor
        assert vector.min() >= 0 and vector.max() < ddp.MODULUS  # uniform mod 2^48
        prior_release = len(vector) < update_dim  # the item-count release (n_items + counts)
        if prior_release:
            continue
        returned = unflatten_like(vector[:update_dim].astype(np.float64), shared, order)
        sent = {k: np.zeros(v.shape) for k, v in shared.items()}
        aucs.append(membership_auc(sent, returned, keys, items, n_items))
    assert len(aucs) == 5 * 3  # 5 clients x (2 training + 1 evaluation) releases (+ prior)
    assert abs(float(np.mean(aucs)) - 0.5) < 0.1  # the norm attack on a masked vector


def unflatten_like(vector: np.ndarray, like: dict[str, np.ndarray], order: list[str]
                   ) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for k in order:
        out[k] = vector[start:start + like[k].size].reshape(like[k].shape)
        start += like[k].size
    return out


def test_secagg_round_completes_with_dropouts_below_the_threshold(tmp_path: Path) -> None:
    """One client in ten drops after masking in every round (it raises in fit); SecAgg+
    recovers the sum of the others and epsilon stays within the target (9 >= n_min)."""
    from tests.test_apps import _simulate

    flat = {**FLAT, "num-clients": 10, "min-clients": 10, "fault-rate": 0.1,
            "fault-kind": "raise", "state-dir": str(tmp_path / "state"),
            "out-dir": str(tmp_path / "run")}
    metrics = _simulate(flat, nodes=10)
    rows = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert [r["clients"] for r in rows] == [9, 9]
    assert metrics["user_epsilon"] <= 8.0 + 1e-6
    assert all(math.isfinite(r["recall@20"]) for r in rows)


def test_the_prior_release_starts_item_biases_at_the_popularity_ranking() -> None:
    """Release 0 sums each client's item counts (norm 1 per user); with no noise the item
    biases become the standardised popularity counts of fedrec.baselines."""
    from fedrec.baselines import popularity_scores

    cfg = RunConfig.from_flat(FLAT)
    split = load_split(cfg.data)
    shared = init_shared(cfg, split.n_items)
    update_dim = sum(v.size for v in shared.values())
    server = ddp.DDPServer(cfg, update_dim, split.n_items, prior=True)
    plan = server.plan(5, 0)
    assert plan.clip == 1.0 and plan.dim == split.n_items + len(ddp.count_keys(cfg))
    quiet = ddp.DDPPlan(plan.clip, plan.eval_clip, plan.l_update, plan.l_eval, plan.dim,
                        plan.n_min, 0.0)
    rng = np.random.default_rng(0)
    total = sum(ddp.encode(ddp.prior_vector(c.train.users, c.train.items, split.n_items),
                           np.zeros(len(ddp.count_keys(cfg))), quiet, rng)
                for c in (split_for_users(split, users) for users in
                          partition_users("cross-silo", split.n_users, 5, 0)))
    bias = server.apply_prior(total, quiet, shared)[ddp.PRIOR_KEY].ravel()
    counts = popularity_scores(split, float("inf"), 1e-5, rng)
    expected = (counts - counts.mean()) / counts.std()
    # per-client vectors of several users are clipped to norm 1 in cross-silo: same order
    assert np.corrcoef(bias, expected)[0, 1] > 0.9
    assert abs(bias.mean()) < 1e-6 and bias.std() == pytest.approx(ddp.PRIOR_SCALE, rel=1e-3)
