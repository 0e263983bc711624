"""Context of a rating (hour of day, day of week, the item's age then): what the feature
models read, where they may read it, and what a reply shows."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pytest
import torch

from fedrec.config import ModelConfig, RunConfig
from fedrec.data import load_dataset
from fedrec.data.sampling import ExampleBuilder
from fedrec.errors import ConfigError
from fedrec.features import (
    AGE_EDGES,
    AGE_ROW,
    CONTEXT_ROWS,
    HOUR_ROW,
    WEEKDAY_ROW,
    Features,
    context_columns,
    example_context,
    model_features,
    serving_times,
    uses_context,
    with_context,
)
from fedrec.model import build_model

SMALL = {"synthetic-users": 20, "synthetic-items": 30, "dim": 4, "mlp-layers": "8,4",
         "seed": 1, "model": "deepfm"}


def test_columns_are_the_ratings_own_utc_hour_weekday_and_year() -> None:
    times = np.array([100_000_000, 880_000_000, 893_456_789, 1_700_000_000.7])
    cols = context_columns(times)
    for t, (hour, weekday, year) in zip(times, cols):
        when = dt.datetime.fromtimestamp(int(t), dt.UTC)  # an independent clock
        assert (hour, weekday, year) == (HOUR_ROW + when.hour, WEEKDAY_ROW + when.weekday(),
                                         when.year)
    assert cols[:, :2].min() >= 1 and cols[:, :2].max() < AGE_ROW  # never the empty row
    u = with_context(np.array([4, 7, 7, 1]), times)
    assert u[:, 0].tolist() == [4, 7, 7, 1] and (u[:, 1:].numpy() == cols).all()


def test_times_that_are_not_unix_seconds_give_no_context(tmp_path) -> None:
    """Milliseconds, NaN, negative times and the row numbers of a file without a time
    column are no moments: those ratings get an empty context, each on its own (one
    rating's removal changes no other example's context)."""
    from fedrec.config import DataConfig

    bad = np.array([1_700_000_000_000.0, np.nan, -5.0, np.inf, 50.0])
    assert (context_columns(bad) == 0).all()
    mixed = context_columns(np.array([893_456_789.0, np.nan]))
    assert (mixed[0] > 0).all() and (mixed[1] == 0).all()
    f = tmp_path / "r.csv"
    f.write_text("u,i\n" + "".join(f"u{k % 3},i{k % 5}\n" for k in range(30)))
    data = load_dataset(DataConfig(dataset="csv", data_file=str(f), user_col="u",
                                   item_col="i", time_col="", rating_col=""))
    assert (context_columns(data.timestamps) == 0).all()
    first = data.timestamps[data.users == 0]
    assert (np.diff(first) > 0).all()  # row order is still the order of time
    model = _model("deepfm", reads=True)  # an empty moment leaves the age slot empty too
    _, m, _ = model._context(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 2, 3]]))
    assert (m == 0).all()


@pytest.mark.parametrize(("flat", "central", "used"), [
    ({"dp": False}, True, True),  # centralized: the data owner trains
    ({"dp": True}, True, True),  # centralized DP-SGD: the unit is a rating with its time
    ({"dp": False}, False, False),  # federated without DP: the reply shows the hours
    ({"dp": False, "user-dp": True}, False, False),  # the server sees the raw update
    ({"dp": True}, False, True),  # record-level DP: a rating's time is in its unit
    ({"dp": False, "ddp": True, "user-target-epsilon": 8.0}, False, True),
    ({"dp": False, "context": "on"}, False, True),
    ({"dp": True, "context": "off"}, False, False),
])
def test_context_only_where_the_unit_covers_it(flat: dict, central: bool, used: bool) -> None:
    cfg = RunConfig.from_flat({**SMALL, "context": "auto", **flat})
    cfg = cfg.for_central() if central else cfg
    assert uses_context(cfg) is used
    data = load_dataset(cfg.data)
    feats = model_features(cfg, data)
    assert feats is not None and feats.context is used
    assert (example_context(cfg, data) is None) is not used  # the examples carry it or not


def test_context_needs_a_feature_model() -> None:
    with pytest.raises(ConfigError, match="context"):
        RunConfig.from_flat({"model": "mf", "context": "on"})
    with pytest.raises(ConfigError, match="context"):
        RunConfig.from_flat({"model": "deepfm", "context": "yes"})


def _model(name: str, reads: bool) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    years = torch.tensor([1990, 0, 1996, 1998, 1950])
    feats = Features(torch.randint(0, 9, (5, 3), generator=g),
                     torch.randint(0, 9, (3, 2), generator=g), None, years, reads)
    model = build_model(ModelConfig(model=name, dim=4, mlp_layers="8,4", context="on",
                                    init_std=0.5), 3, 5, features=feats)
    with torch.no_grad():
        model.context_bias.weight.normal_(0.0, 1.0, generator=g)
    return model


@pytest.mark.parametrize("name", ["deepfm", "widedeep"])
def test_context_moves_scores_only_when_read(name: str) -> None:
    users, items = torch.tensor([0, 2]), torch.tensor([[1, 4, 0], [0, 3, 2]])
    noon = with_context(users.numpy(), np.array([1_000_000_800.0, 1_000_000_800.0]))
    night = with_context(users.numpy(), np.array([1_000_036_800.0, 1_000_036_800.0]))
    model = _model(name, reads=True)
    assert not torch.allclose(model(noon, items), model(night, items))
    assert not torch.allclose(model(noon, items), model(users, items))
    ignoring = _model(name, reads=False)  # tables present, context not read
    assert torch.equal(ignoring(noon, items), ignoring(users, items))
    # the context tables are shared weights, never local, never indexed by user or item
    shared, local = set(model.shared_keys()), set(model.local_keys())
    assert {"context_emb.weight", "context_bias.weight"} <= shared - local
    assert not {"context_emb.weight", "context_bias.weight"} & set(model.item_keys())
    assert model.context_emb.weight.shape[0] == CONTEXT_ROWS
    with pytest.raises(ValueError, match="users"):
        model(torch.zeros(2, 2, dtype=torch.long), items)


def test_item_age_buckets() -> None:
    """The age slot: year of the rating minus the item's release year, in AGE_EDGES
    buckets (a rating before the release year counts as age 0); unknown year: empty."""
    model = _model("deepfm", reads=True)
    ctx = torch.tensor([[5, 30, 1990], [5, 30, 1999], [5, 30, 1985], [5, 30, 2040]])
    with torch.no_grad():
        model.context_emb.weight.copy_(torch.arange(CONTEXT_ROWS).unsqueeze(1).float())
        e, m, _ = model._context(ctx, torch.tensor([[0, 1, 4]] * 4))
    ids = e[:, 2:, 0].long().tolist()
    bucket = {age: AGE_ROW + int(np.searchsorted(AGE_EDGES, age, side="right"))
              for age in (0, 9, 35, 40, 49, 50, 90)}
    assert ids[0] == [bucket[0], 0, bucket[40]]  # item 1's year is unknown
    assert ids[1] == [bucket[9], 0, bucket[49]]
    assert ids[2] == [bucket[0], 0, bucket[35]]  # 1985 before 1990: age 0
    assert ids[3] == [bucket[50], 0, bucket[90]]
    assert m[:, 3].tolist() == [0.0] * 4 and m[:, :2].min() == 1.0


def test_examples_carry_their_ratings_context() -> None:
    cfg = RunConfig.from_flat({**SMALL, "context": "on"}).for_central()
    data = load_dataset(cfg.data)
    cols = context_columns(data.timestamps)
    ex = ExampleBuilder(data, implicit=True, negatives=2, seed=0, context=cols).build()
    assert ex.users.shape == (len(data), 4)
    assert (ex.users[:, 0].numpy() == data.users).all() and (ex.users[:, 1:].numpy() == cols).all()
    with pytest.raises(ValueError, match="context"):
        ExampleBuilder(data, implicit=True, negatives=2, seed=0, context=cols[1:])


def _central_model() -> tuple:
    """A small split and an untrained DeepFM that reads context."""
    from fedrec.data import load_split

    cfg = RunConfig.from_flat({**SMALL, "context": "on"}).for_central()
    split = load_split(cfg.data)
    return split, build_model(cfg.model, split.n_users, split.n_items,
                              features=model_features(cfg, split.train))


def test_full_ranking_serves_each_user_at_its_first_held_out_rating(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrec.evaluate import evaluate_counts

    split, model = _central_model()
    seen: list[torch.Tensor] = []
    real = model.score_all

    def spy(users: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        seen.append(users.clone())
        return real(users, chunk)

    monkeypatch.setattr(model, "score_all", spy)
    evaluate_counts(model, split.train, split.test, ks=(5,), implicit=True)
    served = torch.cat(seen)
    users = np.unique(split.test.users)
    first = [split.test.timestamps[split.test.users == u].min() for u in users]
    assert torch.equal(served, with_context(users, np.array(first)))
    assert np.array_equal(serving_times(users, split.test), first)


def _reply_rows(setting: str, flat: dict) -> np.ndarray:
    from fedrec.federated import fit_client, init_shared, partition_data

    cfg = RunConfig.from_flat({**SMALL, "num-clients": 20, "context": setting, **flat})
    data = partition_data(cfg, 3, 20)
    shared = init_shared(cfg, data.n_items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_client(cfg, data, shared, None, seed=0, server_round=1)
    key = "context_emb.weight"
    return np.flatnonzero((np.asarray(res.shared[key]) != shared[key]).any(-1)), data


@pytest.mark.parametrize("flat", [{"dp": False}, {"dp": False, "user-dp": True,
                                                  "user-target-epsilon": 8.0}])
def test_a_reply_shows_no_hours_by_default(flat: dict) -> None:
    """Without DP or with the server's user-level noise, a reply's context rows stay
    unmoved under context=auto; with context=on the rows of the client's own hours and
    weekdays move, the leak ``uses_context`` keeps out (so this test can fail)."""
    auto, _ = _reply_rows("auto", flat)
    assert len(auto) == 0
    on, data = _reply_rows("on", flat)
    cols = context_columns(data.train.timestamps)
    hours_days = set(cols[:, 0]) | set(cols[:, 1])
    assert set(on[on < AGE_ROW]) == hours_days
    assert set(on) - hours_days <= set(range(AGE_ROW, CONTEXT_ROWS))


def test_record_level_dp_reads_context_and_noises_every_row() -> None:
    """Under record-level DP (auto: read) every context row comes back noised, not only
    the rows of the client's hours."""
    rows, _ = _reply_rows("auto", {"dp": True, "target-epsilon": 8.0})
    assert set(rows) == set(range(CONTEXT_ROWS))


def test_deepfm_with_context_trains_centrally() -> None:
    from fedrec.central import run_centralized
    from fedrec.data import load_split

    cfg = RunConfig.from_flat({**SMALL, "context": "auto", "epochs": 2, "dp": False})
    split = load_split(cfg.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, metrics, rows = run_centralized(cfg, split)
    assert model.reads_context and np.isfinite(rows[-1]["loss"])
    assert 0.0 <= metrics["recall@10"] <= 1.0


def test_recommend_scores_for_the_moment_served() -> None:
    """``recommend`` serves a context model at ``at`` (default: now): its scores are the
    model's with that moment's context, and another hour ranks differently."""
    from fedrec.federated import fit_client, init_shared, partition_data
    from fedrec.recommend import recommend

    cfg = RunConfig.from_flat({**SMALL, "num-clients": 3, "context": "on", "dp": False})
    data = partition_data(cfg, 1, 3)
    shared = init_shared(cfg, data.n_items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_client(cfg, data, shared, None, seed=0, server_round=1)
    g = torch.Generator().manual_seed(0)
    trained = {k: torch.from_numpy(np.asarray(v)) for k, v in res.shared.items()}
    trained["context_bias.weight"] = torch.randn(CONTEXT_ROWS, 1, generator=g) * 5
    user = data.user_ids[0]
    noon, night = 1_000_000_800.0, 1_000_036_800.0
    at_noon = recommend(cfg, data, res.state, trained, user, k=30, explain=0, at=noon)
    at_night = recommend(cfg, data, res.state, trained, user, k=30, explain=0, at=night)
    model = build_model(cfg.model, data.n_users, data.n_items, offset=data.offset,
                        features=model_features(cfg, data.train))
    model.load_state_dict({**trained, **res.state.local})
    model.eval()
    want = model.score_all(with_context(np.array([0]), np.array([noon])))[0]
    for rec in at_noon:
        item = list(data.train.item_ids).index(rec.item)
        assert rec.score == pytest.approx(float(want[item]), rel=1e-6)
    assert [r.score for r in at_noon] != [r.score for r in at_night]


def _shifted(data, seconds: float):
    """The client's data with every rating ``seconds`` later (order kept)."""
    import copy

    out = copy.deepcopy(data)
    out.train.timestamps = out.train.timestamps + seconds
    out.test.timestamps = out.test.timestamps + seconds
    return out


@pytest.mark.parametrize("name", ["deepfm", "widedeep"])
@pytest.mark.parametrize("flat", [
    {"dp": False}, {"dp": False, "user-dp": True, "user-target-epsilon": 8.0},
    {"dp": False, "eval-negatives": 5}, {"dp": False, "feedback": "explicit",
                                         "objective": "mse"}])
def test_nothing_a_client_sends_depends_on_its_times_by_default(name: str, flat: dict) -> None:
    """Without DP or with the server's user-level noise (context=auto: not read), the
    same client with its ratings 7 or 30 hours later sends bit for bit the same shared
    arrays, touched mask, loss, weight and evaluation counts; with context=on they
    differ (so the test can fail)."""
    from fedrec.federated import evaluate_client, fit_client, init_shared, partition_data

    def replies(setting: str) -> list[tuple]:
        cfg = RunConfig.from_flat({**SMALL, "model": name, "num-clients": 20,
                                   "context": setting, **flat})
        data = partition_data(cfg, 3, 20)
        shared = init_shared(cfg, data.n_items)
        out = []
        for d in (data, _shifted(data, 7 * 3600.0), _shifted(data, 30 * 3600.0)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fit_client(cfg, d, shared, None, seed=0, server_round=1)
                counts = evaluate_client(cfg, d, shared, None, seed=0)
            out.append((res, counts))
        return out

    def same(a: tuple, b: tuple) -> bool:
        (ra, ca), (rb, cb) = a, b
        return (set(ra.shared) == set(rb.shared)
                and all(np.array_equal(ra.shared[k], rb.shared[k]) for k in ra.shared)
                and ((ra.touched is None and rb.touched is None)
                     or np.array_equal(ra.touched, rb.touched))
                and ra.loss == rb.loss and ra.weight == rb.weight and ca == cb)

    auto = replies("auto")
    assert same(auto[0], auto[1]) and same(auto[0], auto[2])
    on = replies("on")
    assert not same(on[0], on[1]) or not same(on[0], on[2])


def test_sampled_and_rating_evaluation_take_each_ratings_own_moment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled protocol and rating errors score each held-out rating at its own
    time (full ranking: ``test_full_ranking_serves_...``)."""
    from fedrec.evaluate import rating_error_counts, sampled_counts

    split, model = _central_model()
    seen: list[torch.Tensor] = []
    real = model.forward

    def spy(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        seen.append(users.clone())
        return real(users, items)

    monkeypatch.setattr(model, "forward", spy)
    want = with_context(split.test.users, split.test.timestamps)
    sampled_counts(model, split.train, split.test, (5,), 4, seed=0)
    assert torch.equal(seen[-1], want)
    rating_error_counts(model, split.test)
    assert torch.equal(seen[-1], want)


def test_auto_says_once_when_it_leaves_context_out(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from fedrec.features import _WARNED

    _WARNED.discard("context")
    cfg = RunConfig.from_flat({**SMALL, "context": "auto", "dp": False})
    data = load_dataset(cfg.data)
    with caplog.at_level(logging.WARNING):
        model_features(cfg, data)
        model_features(cfg, data)  # the next client, the next round
        model_features(cfg.for_central(), data)  # read: nothing to say
    assert caplog.text.count("context is not read in this run") == 1
