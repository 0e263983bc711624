import numpy as np
import pytest

from fedrec.aggregate import Update, aggregate


def _cur() -> dict[str, np.ndarray]:
    return {"item_emb.weight": np.zeros((3, 2), np.float32),
            "mlp.0.weight": np.zeros((2, 2), np.float32)}


def test_weighted_fedavg_without_masks() -> None:
    a = Update({k: np.ones_like(v) for k, v in _cur().items()}, weight=1)
    b = Update({k: 4 * np.ones_like(v) for k, v in _cur().items()}, weight=3)
    out = aggregate([a, b], _cur(), ["item_emb.weight"])
    assert np.allclose(out["item_emb.weight"], 3.25) and np.allclose(out["mlp.0.weight"], 3.25)


def test_touched_rows_are_not_diluted() -> None:
    cur = _cur()
    a = Update({"item_emb.weight": np.array([[1, 1], [0, 0], [0, 0]], np.float32),
                "mlp.0.weight": np.ones((2, 2), np.float32)}, 1, np.array([1, 0, 0], np.float32))
    b = Update({"item_emb.weight": np.array([[0, 0], [2, 2], [0, 0]], np.float32),
                "mlp.0.weight": 3 * np.ones((2, 2), np.float32)}, 1, np.array([0, 1, 0], np.float32))
    out = aggregate([a, b], cur, ["item_emb.weight"])
    # row 0 only from a, row 1 only from b, row 2 untouched keeps the global value
    assert np.allclose(out["item_emb.weight"], [[1, 1], [2, 2], [0, 0]])
    assert np.allclose(out["mlp.0.weight"], 2.0)  # not item-indexed: plain average
    plain = aggregate([Update(a.arrays, 1), Update(b.arrays, 1)], cur, ["item_emb.weight"])
    assert np.allclose(plain["item_emb.weight"], [[0.5, 0.5], [1, 1], [0, 0]])


def test_only_the_keys_of_the_global_model_are_aggregated() -> None:
    extra = {**{k: np.ones_like(v) for k, v in _cur().items()}, "user_emb.weight": np.ones(9)}
    out = aggregate([Update(extra, 1)], _cur(), [])
    assert set(out) == set(_cur())


def test_server_lr_scales_the_averaged_step() -> None:
    cur = {"item_emb.weight": np.ones((3, 2), np.float32)}
    upd = Update({"item_emb.weight": 2 * np.ones((3, 2), np.float32)}, 1,
                 np.array([1, 1, 0], np.float32))
    out = aggregate([upd], cur, ["item_emb.weight"], server_lr=3.0)
    # touched rows step 3x the averaged change; the untouched row stays put
    assert np.allclose(out["item_emb.weight"], [[4, 4], [4, 4], [1, 1]])


def test_server_adam_takes_one_normalised_step_and_checkpoints_its_moments() -> None:
    from fedrec.aggregate import ServerOptimizer
    from fedrec.config import FedConfig

    cur = {"w": np.zeros((2, 2), dtype=np.float32)}
    ups = [Update({"w": np.full((2, 2), 0.5, dtype=np.float32)}, 1.0),
           Update({"w": np.full((2, 2), 1.5, dtype=np.float32)}, 1.0)]
    opt = ServerOptimizer(FedConfig(server_opt="adam", server_lr=0.1), item_keys=[])
    new = opt.step(ups, cur)
    g = 1.0  # averaged update
    m, v = 0.1 * g, 0.01 * g * g
    np.testing.assert_allclose(new["w"], 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    again = ServerOptimizer(FedConfig(server_opt="adam", server_lr=0.1), item_keys=[])
    again.load_state_dict(opt.state_dict())
    np.testing.assert_allclose(again.step(ups, new)["w"], opt.step(ups, new)["w"])
    plain = ServerOptimizer(FedConfig(server_opt="avg", server_lr=2.0), item_keys=[])
    np.testing.assert_allclose(plain.step(ups, cur)["w"], 2.0)


def test_updates_given_as_rows_average_like_whole_arrays() -> None:
    """An update that holds only some item rows (the batched engine's) averages as the
    whole array it stands for, mixed with whole updates, with any weights and with
    touched masks; a mask naming a row the update does not hold is refused."""
    import pytest

    from fedrec.aggregate import MeanAccumulator

    rng = np.random.default_rng(0)
    current = {"item": rng.normal(size=(6, 3)), "w": rng.normal(size=(2,))}
    rows = [np.array([1, 4]), np.array([], dtype=np.int64), None]
    wholes, parts = [], []
    for r in rows:
        whole = {k: v + rng.normal(size=v.shape) for k, v in current.items()}
        if r is not None:
            keep = np.ones(6, bool)
            keep[r] = False
            whole["item"][keep] = current["item"][keep]
            parts.append({"item": whole["item"][r], "w": whole["w"]})
        else:
            parts.append(whole)
        wholes.append(whole)
    for weights in ([1.0, 1.0, 1.0], [3.0, 0.5, 2.0]):
        dense, sparse = MeanAccumulator(current, ["item"]), MeanAccumulator(current, ["item"])
        for whole, part, r, w in zip(wholes, parts, rows, weights):
            dense.add(Update(whole, w))
            sparse.add(Update(part, w, None, r))
        for key in current:
            np.testing.assert_allclose(sparse.average()[key], dense.average()[key])
    # with touched masks (rows averaged over the clients that trained them)
    masks = [np.isin(np.arange(6), [1, 4]).astype(np.float32), np.zeros(6, np.float32),
             np.isin(np.arange(6), [0, 4, 5]).astype(np.float32)]
    dense, sparse = MeanAccumulator(current, ["item"]), MeanAccumulator(current, ["item"])
    for whole, part, r, mask, w in zip(wholes, parts, rows, masks, [3.0, 0.5, 2.0]):
        dense.add(Update(whole, w, mask))
        sparse.add(Update(part, w, mask, r))
    for key in current:
        np.testing.assert_allclose(sparse.average()[key], dense.average()[key])
    with pytest.raises(ValueError, match="touched rows are not among its rows"):
        MeanAccumulator(current, ["item"]).add(Update(parts[0], 1.0, masks[2], rows[0]))
    with pytest.raises(ValueError, match="touched rows are not among its rows"):
        MeanAccumulator(current, ["item"]).add(Update(parts[1], 1.0, masks[0], rows[1]))


def test_clipped_sum_of_updates_given_as_rows_equals_whole_arrays() -> None:
    """User-level DP's clipped sum: an update given as rows has the norm and clipped
    contribution of the whole update it stands for (big ones clipped, small ones not)."""
    import pytest

    from fedrec.aggregate import ClippedSum

    rng = np.random.default_rng(1)
    current = {"item": rng.normal(size=(6, 3)), "w": rng.normal(size=(2,))}
    dense, sparse = ClippedSum(current, 0.5), ClippedSum(current, 0.5, ["item"])
    for r, size in ((np.array([0, 3]), 1.0), (np.array([5]), 0.01), (None, 2.0)):
        whole = {k: v + size * rng.normal(size=v.shape) for k, v in current.items()}
        part = dict(whole)
        if r is not None:
            keep = np.ones(6, bool)
            keep[r] = False
            whole["item"][keep] = current["item"][keep]
            part["item"] = whole["item"][r]
        assert sparse.add(part, r) == pytest.approx(dense.add(whole), rel=1e-12)
    for key in current:
        np.testing.assert_allclose(sparse.sums[key], dense.sums[key])


@pytest.mark.parametrize(("rows", "item"), [
    (np.array([3, 1]), np.zeros((2, 3))),  # not increasing
    (np.array([1, 1]), np.zeros((2, 3))),  # repeated: one contribution would be lost
    (np.array([-1]), np.zeros((1, 3))),  # would wrap to the last row
    (np.array([6]), np.zeros((1, 3))),  # past the catalogue
    (np.array([0.0, 2.0]), np.zeros((2, 3))),  # not integers
    (np.array([0, 2, 4]), np.zeros((1, 3))),  # one row standing for three
])
def test_malformed_row_updates_are_refused(rows: np.ndarray, item: np.ndarray) -> None:
    """An update given as rows must name distinct catalogue rows in order and hold each
    of them, in both accumulators; nothing is added when it does not."""
    from fedrec.aggregate import ClippedSum, MeanAccumulator

    current = {"item": np.zeros((6, 3)), "w": np.zeros(2)}
    mean, clipped = MeanAccumulator(current, ["item"]), ClippedSum(current, 1.0, ["item"])
    arrays = {"item": item, "w": np.ones(2)}
    with pytest.raises(ValueError, match="rows"):
        mean.add(Update(arrays, 1.0, None, rows))
    with pytest.raises(ValueError, match="rows"):
        clipped.add(arrays, rows)
    assert mean.count == 0 and clipped.count == 0
