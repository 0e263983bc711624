"""Title embeddings (item-text=on): offline encoder, cache, the model's text path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec import text
from fedrec.config import DataConfig, ModelConfig
from fedrec.data import load_dataset
from fedrec.data.interactions import Interactions
from fedrec.errors import ConfigError
from fedrec.features import ITEM_SLOTS, USER_SLOTS, Features, features_of
from fedrec.model import build_model
from fedrec.text import TEXT_DIM, title_vectors

TITLES = ["Heat (1995)", "Heat", "", "Toy Story (1995)", "Toy Story 2 (1999)"]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private disk cache and an empty memory cache for each test."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "_MEMORY", {})
    return tmp_path / "cache" / "text"


def test_title_vectors_offline_unit_norm_year_stripped(_cache: Path) -> None:
    """The packaged encoder runs with no network: one unit vector per title, equal with
    and without the year, zero for an empty title; near titles are nearer."""
    v = title_vectors(TITLES)
    assert v.shape == (len(TITLES), TEXT_DIM) and v.dtype == np.float32
    assert np.array_equal(v[0], v[1])
    assert not v[2].any()
    norms = np.linalg.norm(v[[0, 3, 4]], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    assert v[3] @ v[4] > v[3] @ v[0]  # "Toy Story" is nearer "Toy Story 2" than "Heat"
    assert (_cache / f"{text.catalogue_key(TITLES)}.npy").is_file()


def test_the_disk_cache_is_used_and_a_bad_one_is_recomputed(
        _cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = title_vectors(TITLES).copy()
    path = _cache / f"{text.catalogue_key(TITLES)}.npy"

    def no_encoder(titles: list[str]) -> np.ndarray:
        raise AssertionError("encoded again although the cache holds the vectors")

    monkeypatch.setattr(text, "_MEMORY", {})
    monkeypatch.setattr(text, "_embed", no_encoder)
    assert np.array_equal(title_vectors(TITLES), first)  # read from disk
    path.write_bytes(b"not a numpy file")
    monkeypatch.setattr(text, "_MEMORY", {})
    with pytest.raises(AssertionError, match="encoded again"):  # damaged: never trusted
        title_vectors(TITLES)
    import io
    import zipfile

    npz = io.BytesIO()
    np.savez(npz, first)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("x", "y")
    huge = io.BytesIO()
    np.save(huge, first * 1e30)
    for damaged in (b"", npz.getvalue(), b"PK\x03\x04 not a zip", zipped.getvalue(),
                    huge.getvalue()):
        path.write_bytes(damaged)
        monkeypatch.setattr(text, "_MEMORY", {})
        with pytest.raises(AssertionError, match="encoded again"):
            title_vectors(TITLES)
    monkeypatch.undo()
    monkeypatch.setenv("FEDREC_CACHE", str(_cache.parent))
    monkeypatch.setattr(text, "_MEMORY", {})
    assert np.array_equal(title_vectors(TITLES), first)
    assert np.array_equal(np.load(path), first)  # rewritten


def test_a_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wordllama", None)
    text._encoder.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"pip install 'fedrec\[text\]'"):
            title_vectors(["A title nobody cached"])
    finally:
        text._encoder.cache_clear()


def _features(n_users: int, n_items: int, seed: int, with_text: bool) -> Features:
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_items, TEXT_DIM, generator=g) if with_text else None
    if vectors is not None:
        vectors[3] = 0.0  # an item without a title
    return Features(torch.randint(0, 8, (n_items, ITEM_SLOTS), generator=g),
                    torch.randint(0, 8, (n_users, USER_SLOTS), generator=g), vectors)


@pytest.mark.parametrize("name", ["deepfm", "widedeep"])
def test_text_path_scores_and_split(name: str) -> None:
    """The title projection is a shared weight and the vectors are in no state dict; an
    item's text moves its score, an item without text gets no text term; the catalogue
    path equals the per-example lookups (scores and gradients)."""
    cfg = ModelConfig(model=name, dim=4, mlp_layers="8,4", feature_buckets=8,
                      item_text="on")
    m = build_model(cfg, 5, 9, seed=1, features=_features(5, 9, 0, True)).double()
    assert "text_proj.weight" in m.shared_keys()
    assert "item_text" not in m.state_dict()
    users, items = torch.tensor([0, 1, 4, 4]), torch.tensor([[1, 2], [3, 3], [5, 8], [0, 7]])
    out = {}
    for per_example in (True, False):
        m.zero_grad()
        m.per_example_lookups = per_example
        scores = m(users, items)
        scores.square().sum().backward()
        out[per_example] = (scores.detach(), {n: p.grad.clone() for n, p in
                                              m.named_parameters() if p.grad is not None})
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-12)
    for n, g in out[True][1].items():
        assert torch.allclose(g, out[False][1][n], rtol=1e-12, atol=1e-15), n
    assert out[True][1]["text_proj.weight"].abs().sum() > 0
    off_cfg = ModelConfig(model=name, dim=4, mlp_layers="8,4", feature_buckets=8)
    feats = _features(5, 9, 0, True)
    off = build_model(off_cfg, 5, 9, features=Features(feats.items, feats.users)).double()
    state = {k: v for k, v in m.state_dict().items() if k != "text_proj.weight"}
    off.load_state_dict(state)
    with torch.no_grad():
        before = m(users, items)
        m.item_text[1] += 1.0
        after = m(users, items)
        plain = off(users, items)
    assert not torch.allclose(before[0, 0], after[0, 0])  # item 1's text moved its score
    # item 3 has no title: scored as by the same model without text (no term, no count)
    assert torch.allclose(after[1], plain[1], rtol=1e-12)
    assert not torch.allclose(after[0], plain[0])


def test_features_carry_titles_and_a_mismatch_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.data").write_text("1\t10\t5\t100\n2\t20\t3\t101\n")
    g = "|".join(["0"] * 19)
    (d / "u.item").write_text(f"10|Heat (1995)|01-Jan-1995||http://x|{g}\n"
                              f"20|Toy Story (1995)|01-Jan-1995||http://y|{g}\n")
    data: Interactions = load_dataset(DataConfig(dataset="ml-100k", data_dir=str(d)))
    feats = features_of(data, 64, text=True)
    assert feats.text is not None and feats.text.shape == (2, TEXT_DIM)
    assert torch.allclose(feats.text, torch.from_numpy(np.array(title_vectors(data.titles))))
    assert features_of(data, 64).text is None
    off = build_model(ModelConfig(model="deepfm", dim=4, mlp_layers="8,4"), 2, 2)
    with pytest.raises(ValueError, match="item-text=off but the features have it"):
        off.set_features(feats)
    on = build_model(ModelConfig(model="deepfm", dim=4, mlp_layers="8,4", item_text="on"), 2, 2)
    with pytest.raises(ValueError, match="item-text=on but the features lack it"):
        on.set_features(features_of(data, 64))


def test_item_text_trains_under_record_level_dp(tmp_path: Path) -> None:
    """A client with titles trains DP-SGD through Opacus (two-pass ghost clipping: the
    projection reads a buffer); the reply carries the projection, moved; an id-only
    model refuses item-text=on with the key named."""
    from fedrec.config import RunConfig
    from fedrec.data.split import temporal_split
    from fedrec.errors import ConfigError as Err
    from fedrec.federated import fit_client, init_shared, split_for_users

    d = tmp_path / "ml-100k"
    d.mkdir()
    lines = [f"{u}\t{i}\t{1 + (u * i) % 5}\t{100 + u * 10 + i}" for u in (1, 2, 3)
             for i in range(10, 30)]
    (d / "u.data").write_text("\n".join(lines) + "\n")
    g = "|".join(["0"] * 19)
    (d / "u.item").write_text("".join(f"{i}|Movie number {i} (199{i % 10})|01-Jan-1995||"
                                      f"http://x|{g}\n" for i in range(10, 30)))
    flat = {"dataset": "ml-100k", "data-dir": str(d), "model": "deepfm", "dim": 4,
            "mlp-layers": "8,4", "item-text": "on", "dp": True, "target-epsilon": 8.0,
            "negatives": 2}
    cfg = RunConfig.from_flat(flat)
    split = temporal_split(load_dataset(cfg.data), "fraction", 0.2, 0)
    shared = init_shared(cfg, split.n_items)
    res = fit_client(cfg, split_for_users(split, np.array([0, 1, 2])), shared, None, seed=0,
                     server_round=1)
    assert res.shared is not None and 0 < res.epsilon <= 8.0 + 1e-6
    assert not np.allclose(res.shared["text_proj.weight"], shared["text_proj.weight"])
    with pytest.raises(Err, match="config key 'item-text'"):
        RunConfig.from_flat({**flat, "model": "mf"})
