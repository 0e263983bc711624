"""Side features: loading, hashing, and the privacy split of the feature models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.config import DataConfig, ModelConfig
from fedrec.data import load_dataset
from fedrec.errors import DataError
from fedrec.features import (
    ITEM_SLOTS,
    USER_SLOTS,
    Features,
    features_of,
    hash_value,
    item_values,
    user_values,
)
from fedrec.model import build_model

FEATURE_MODELS = ["deepfm", "widedeep"]


def _write(path: Path, text: str, encoding: str = "latin-1") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def _ml_100k(tmp_path: Path, users: str) -> Path:
    d = tmp_path / "ml-100k"
    _write(d / "u.data", "1\t10\t5\t100\n2\t10\t3\t101\n1\t20\t4\t102\n")
    g = ["0"] * 19
    g[1] = g[8] = "1"  # Action, Drama
    none = "|".join(["0"] * 19)
    _write(d / "u.item", f"10|Heat (1995)|01-Jan-1995||http://x|{'|'.join(g)}\n"
                         f"20|Untitled|01-Jan-1996||http://y|{none}\n")
    _write(d / "u.user", users)
    return d


def test_ml_100k_user_and_item_features(tmp_path: Path) -> None:
    d = _ml_100k(tmp_path, "1|24|M|technician|85711\n2|53|F|other|E2A4B\n")
    data = load_dataset(DataConfig(dataset="ml-100k", data_dir=str(d)))
    assert data.user_features == ["age=18-24|gender=M|occupation=technician|zip=8",
                                  "age=50-55|gender=F|occupation=other|zip=E"]
    assert item_values("Heat (1995)", "Action|Drama") == ["genre=Action", "genre=Drama",
                                                         "decade=1990"]
    assert item_values("Untitled", "") == []
    feats = features_of(data, 64)
    # as many slots as the richest item (user) needs
    assert feats.items.shape == (2, 3) and feats.users.shape == (2, 4)
    heat = list(data.item_ids).index("10")
    assert feats.items[heat, :3].tolist() == [hash_value(v, 64) for v in
                                              ("genre=Action", "genre=Drama", "decade=1990")]
    assert (feats.items[1 - heat] == 0).all()
    assert ((feats.users > 0) & (feats.users < 64)).all()
    assert user_values(data.user_features[0])[2] == "occupation=technician"


def test_bad_users_file_names_line(tmp_path: Path) -> None:
    d = _ml_100k(tmp_path, "1|24|M|technician|85711\n2|old|F|other|94043\n")
    with pytest.raises(DataError, match=r"u\.user, line 2: expected an integer age"):
        load_dataset(DataConfig(dataset="ml-100k", data_dir=str(d)))


def test_hashing_is_stable() -> None:
    """Ids must agree across processes and machines (CRC-32, not Python's salted hash)."""
    assert hash_value("genre=Drama", 2048) == 1 + 4054725924 % 2047  # zlib.crc32(b"genre=Drama")
    assert all(1 <= hash_value(f"v{i}", 5) < 5 for i in range(50))


def _features(n_users: int, n_items: int, buckets: int, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randint(0, buckets, (n_items, ITEM_SLOTS), generator=g),
                    torch.randint(0, buckets, (n_users, USER_SLOTS), generator=g))


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_user_features_never_leave(name: str) -> None:
    """A user's features sit in a non-persistent buffer: not in any state dict, so not in
    what a client sends or stores; clients differing only in their users' features and
    embeddings hold identical shared state. Feature-value tables are shared."""
    cfg = ModelConfig(model=name, dim=4, mlp_layers="8,4", feature_buckets=32)
    a = build_model(cfg, 5, 9, seed=1, features=_features(5, 9, 32, 0))
    b = build_model(cfg, 5, 9, seed=1, features=_features(5, 9, 32, 0))
    b.set_features(Features(a.item_values.clone(), _features(5, 9, 32, 7).users))
    with torch.no_grad():
        b.user_emb.weight.add_(1.0)
    assert "user_values" not in a.state_dict() and "item_values" not in a.state_dict()
    sa, sb = a.shared_state_dict(), b.shared_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {"user_value_emb.weight", "item_value_emb.weight"} <= set(sa)
    assert not torch.equal(a.user_values, b.user_values)
    users, items = torch.tensor([0, 1, 4]), torch.tensor([[1, 2], [3, 4], [5, 8]])
    assert not torch.allclose(a(users, items), b(users, items))  # the features are used


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_features_change_scores_and_bad_ids_are_refused(name: str) -> None:
    cfg = ModelConfig(model=name, dim=4, mlp_layers="8,4", feature_buckets=16)
    plain = build_model(cfg, 3, 6, seed=0)
    featured = build_model(cfg, 3, 6, seed=0, features=_features(3, 6, 16, 2))
    users, items = torch.tensor([0, 2]), torch.tensor([[0, 1, 5], [2, 3, 4]])
    assert not torch.allclose(plain(users, items), featured(users, items))
    with pytest.raises(ValueError, match=r"user_values: expected shape \(3, 1..8\)"):
        plain.set_features(Features(torch.zeros(6, ITEM_SLOTS, dtype=torch.long),
                                    torch.zeros(4, USER_SLOTS, dtype=torch.long)))
    with pytest.raises(ValueError, match="outside"):
        plain.set_features(Features(torch.full((6, ITEM_SLOTS), 16), torch.zeros(
            3, USER_SLOTS, dtype=torch.long)))


def test_client_view_keeps_only_its_users_features(tmp_path: Path) -> None:
    from fedrec.data.split import temporal_split
    from fedrec.federated import split_for_users

    d = _ml_100k(tmp_path, "1|24|M|technician|85711\n2|53|F|other|94043\n")
    data = load_dataset(DataConfig(dataset="ml-100k", data_dir=str(d)))
    split = temporal_split(data, "fraction", 0.5, 0)
    client = split_for_users(split, np.array([1]))
    assert client.train.user_features == [data.user_features[1]]
    assert features_of(client.train, 64).users.shape == (1, 4)


@pytest.mark.parametrize(("name", "mode"), [
    ("deepfm", {"dp": False}), ("widedeep", {"dp": True, "target-epsilon": 8.0}),
    ("deepfm", {"dp": False, "user-dp": True, "user-target-epsilon": 8.0}),
    ("widedeep", {"dp": False, "ddp": True, "user-target-epsilon": 8.0}),
], ids=["none", "record", "user", "distributed"])
def test_feature_models_train_federated_in_every_mode(name: str, mode: dict) -> None:
    """One client after another (the batched engine refuses per-user features) in each
    DP mode; without DP above a random ranking (0.365 Recall@20 on this split)."""
    from fedrec.batched import unsupported
    from fedrec.config import RunConfig
    from fedrec.inprocess import run_inprocess

    cfg = RunConfig.from_flat({"synthetic-users": 60, "synthetic-items": 80, "dim": 8,
                               "mlp-layers": "16,8", "eval-every": 0, "seed": 1,
                               "model": name, "rounds": 2, **mode})
    assert unsupported(cfg) is not None
    _, rows = run_inprocess(cfg)
    assert 0 < rows[-1]["recall@20"] <= 1
    if not any(mode.get(k) for k in ("dp", "user-dp", "ddp")):
        assert rows[-1]["recall@20"] > 0.365 + 0.05
    for key in ("epsilon-max", "user-epsilon"):
        assert rows[-1].get(key, 0.0) <= 8.0 + 1e-6


def test_feature_reasons_are_true_of_the_users_liked_items() -> None:
    """'you liked N <genre> titles': the genre is the recommended item's, and N counts the
    user's liked (highly rated) training items of that genre."""
    import warnings

    from fedrec.config import RunConfig
    from fedrec.federated import fit_client, init_shared, partition_data
    from fedrec.recommend import liked_cut, recommend

    cfg = RunConfig.from_flat({"synthetic-users": 60, "synthetic-items": 80, "dim": 8,
                               "mlp-layers": "16,8", "seed": 1, "dp": False,
                               "model": "deepfm", "num-clients": 3})
    data = partition_data(cfg, 0, 3)
    shared = init_shared(cfg, data.n_items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_client(cfg, data, shared, None, seed=0, server_round=1)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in res.shared.items()}
    reasons = 0
    for uid, user in enumerate(data.user_ids[:5]):
        liked = data.train.items[(data.train.users == uid)
                                 & (data.train.ratings >= liked_cut(data, cfg))]
        for rec in recommend(cfg, data, res.state, tensors, user, k=5):
            if rec.feature:
                reasons += 1
                item = list(data.train.item_ids).index(rec.item)
                assert rec.feature in data.train.genres[item].split("|")
                assert rec.feature_count == sum(
                    rec.feature in data.train.genres[j].split("|") for j in liked) >= 2
                assert f"you liked {rec.feature_count} {rec.feature} titles" in rec.explanation()
    assert reasons


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_catalogue_content_path_equals_per_example_lookups(name: str) -> None:
    """Non-private training computes each item's content once per catalogue item; the
    scores and every gradient equal those of the per-example lookups DP-SGD uses."""
    cfg = ModelConfig(model=name, dim=4, mlp_layers="8,4", feature_buckets=8)
    out = {}
    for per_example in (True, False):
        m = build_model(cfg, 5, 9, seed=1, features=_features(5, 9, 8, 0)).double()
        m.per_example_lookups = per_example
        users, items = torch.tensor([0, 1, 4, 4]), torch.tensor([[1, 2], [3, 3], [5, 8], [0, 7]])
        scores = m(users, items)
        scores.square().sum().backward()
        out[per_example] = (scores.detach(), {n: p.grad for n, p in m.named_parameters()})
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-12)
    for n, g in out[True][1].items():
        assert torch.allclose(g, out[False][1][n], rtol=1e-12, atol=1e-15), n


def test_dp_always_gets_per_example_lookups() -> None:
    """A model a non-private trainer switched to the catalogue path is switched back when
    wrapped for DP-SGD (Opacus's per-example norms need lookups indexed by example)."""
    import warnings

    from fedrec.central import build_trainer
    from fedrec.config import RunConfig

    cfg = RunConfig.from_flat({"model": "deepfm", "dim": 4, "mlp-layers": "8,4", "dp": False,
                               "lr": 0.01, "optimizer": "adam", "max-grad-norm": 1.0})
    model = build_model(cfg.model, 5, 9, features=_features(5, 9, 2048, 0))
    build_trainer(cfg, model, 100, steps=1)
    assert model.per_example_lookups is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_trainer(cfg.replace(dp=True), model, 100, steps=1, sigma=1.0)
    assert model.per_example_lookups is True


@pytest.mark.parametrize(("flat", "central", "used"), [
    ({"dp": False}, True, True),  # non-private centralized: nothing is promised
    ({"dp": True}, True, False),  # record-level: every rating carries the features
    ({"dp": False}, False, False),  # federated without DP: the reply shows them
    ({"dp": False, "user-dp": True}, False, False),  # the server sees the raw update
    ({"dp": True}, False, False),
    ({"dp": False, "ddp": True, "user-target-epsilon": 8.0}, False, True),
    ({"dp": False, "user-features": "on"}, False, True),
    ({"dp": False, "ddp": True, "user-target-epsilon": 8.0, "user-features": "off"}, False,
     False),
])
def test_user_features_only_where_protected(flat: dict, central: bool, used: bool) -> None:
    from fedrec.config import RunConfig
    from fedrec.features import model_features, uses_user_features

    cfg = RunConfig.from_flat({"model": "deepfm", "synthetic-users": 20,
                               "synthetic-items": 30, **flat})
    cfg = cfg.for_central() if central else cfg
    assert uses_user_features(cfg) is used
    feats = model_features(cfg, load_dataset(cfg.data))
    assert feats is not None and bool((feats.users > 0).any()) is used
    assert (feats.items > 0).any()  # item features are public: always used


@pytest.mark.parametrize("flat", [{}, {"user-dp": True, "user-target-epsilon": 8.0}])
def test_a_reply_does_not_show_the_users_features(flat: dict) -> None:
    """Without DP or with central user-level DP the server reads a client's raw update:
    by default its user-value rows do not move, so they name no value; with
    user-features=on they do (the leak docs/PRIVACY.md describes)."""
    import warnings

    from fedrec.config import RunConfig
    from fedrec.federated import fit_client, init_shared, partition_data

    moved = {}
    for setting in ("auto", "on"):
        cfg = RunConfig.from_flat({"synthetic-users": 20, "synthetic-items": 30, "dim": 4,
                                   "mlp-layers": "8,4", "seed": 1, "dp": False,
                                   "model": "deepfm", "num-clients": 20,
                                   "user-features": setting, **flat})
        data = partition_data(cfg, 3, 20)
        shared = init_shared(cfg, data.n_items)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit_client(cfg, data, shared, None, seed=0, server_round=1)
        moved[setting] = {k: np.flatnonzero((np.asarray(res.shared[k]) != shared[k]).any(-1))
                          for k in ("user_value_emb.weight", "user_value_bias.weight")}
    assert all(len(rows) == 0 for rows in moved["auto"].values())
    values = user_values(data.train.user_features[0])
    expected = sorted(hash_value(v, 2048) for v in values)
    assert sorted(moved["on"]["user_value_emb.weight"]) == expected


def test_id_dropout_masks_are_secret_under_dp() -> None:
    """Non-private runs draw reproducible id-dropout masks; DP-SGD draws them from OS
    entropy (a public stream would let one example shift every later example's mask)."""
    import warnings

    from fedrec.config import PrivacyConfig
    from fedrec.privacy import RowLoss, make_private

    cfg = ModelConfig(model="deepfm", dim=4, mlp_layers="8,4", id_dropout=0.5)
    masks = {}
    for dp in (False, True):
        draws = []
        for _ in range(2):
            m = build_model(cfg, 5, 9, seed=1)
            if dp:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), RowLoss("bce"),
                                 PrivacyConfig(dp=True, max_grad_norm=1.0), sample_rate=0.5,
                                 noise_multiplier=1.0)
            draws.append(torch.rand(64, generator=m._dropout_gen))
        masks[dp] = draws
    assert torch.equal(*masks[False]) and not torch.equal(*masks[True])


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_clipping_is_exact_with_id_dropout(name: str) -> None:
    """Per-example norms and the clipped gradient equal brute force when ids are dropped
    (the same masks: the generator's state is replayed for the DP forward)."""
    import warnings

    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from fedrec.config import PrivacyConfig
    from fedrec.privacy import RowLoss, make_private

    cfg = ModelConfig(model=name, dim=4, mlp_layers="8,4", feature_buckets=5, id_dropout=0.5)
    m = build_model(cfg, 5, 9, seed=1, features=_features(5, 9, 5, 0)).double()
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 5, (10,), generator=g)
    items = torch.randint(0, 9, (10, 4), generator=g)
    targets = torch.zeros(10, 4, dtype=torch.float64)
    targets[:, 0] = 1
    params = list(m.parameters())
    state = m._dropout_gen.get_state()
    per = RowLoss("bce", reduction="none")(m(users, items), targets)
    brute = [torch.cat([x.reshape(-1) for x in torch.autograd.grad(
        per[b], params, retain_graph=True, allow_unused=True, materialize_grads=True)])
        for b in range(10)]
    norms = torch.stack([x.norm() for x in brute])
    clip = float(norms.median())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = make_private(m, torch.optim.SGD(params, lr=1.0), RowLoss("bce"),
                          PrivacyConfig(dp=True, max_grad_norm=clip), sample_rate=0.5,
                          noise_multiplier=0.0)
    po.optimizer.expected_batch_size = 10
    m._dropout_gen.set_state(state)  # replay the brute-force masks
    DPLossFastGradientClipping(po.model, po.optimizer, RowLoss("bce"), "mean")(
        po.model(users, items), targets).backward()
    assert torch.allclose(po.model.per_sample_gradient_norms, norms, rtol=1e-9)
    po.optimizer.pre_step()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = sum(f * b for f, b in zip(factors, brute)) / 10
    got = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-14)


def test_a_dp_wrapped_model_keeps_per_example_lookups() -> None:
    """Once wrapped for DP-SGD, switching the flag off (as a non-private trainer would)
    leaves the per-example path on: the catalogue path under Opacus would give wrong
    per-example norms when a batch has as many examples as the catalogue has items."""
    import warnings

    from fedrec.config import PrivacyConfig
    from fedrec.privacy import RowLoss, make_private

    m = build_model(ModelConfig(model="deepfm", dim=4, mlp_layers="8,4"), 5, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), RowLoss("bce"),
                     PrivacyConfig(dp=True, max_grad_norm=1.0), sample_rate=0.5,
                     noise_multiplier=1.0)
    m.per_example_lookups = False
    looked_up = []
    hook = m.item_value_emb.register_forward_hook(lambda mod, args, out: looked_up.append(
        args[0].shape))
    m(torch.tensor([0, 1]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    hook.remove()
    assert looked_up[0][:2] == (2, 3)  # ids indexed by example, not the catalogue
