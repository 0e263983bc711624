"""Loaders, cleaning, bad input, splits and sampling, on files the tests write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import DataConfig
from fedrec.data import PairSet, load_dataset, load_split, sampled_eval_lists
from fedrec.data.interactions import build_interactions
from fedrec.data.sampling import ExampleBuilder, sample_negatives
from fedrec.data.split import k_core, temporal_split
from fedrec.data.synthetic import generate_synthetic
from fedrec.errors import DataError


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_ml_100k_with_titles_and_genres(tmp_path: Path) -> None:
    d = tmp_path / "ml-100k"
    _write(d / "u.data", "1\t10\t5\t100\n2\t10\t3\t101\n1\t20\t4\t102\n")
    flags = "|".join(["0"] * 19)
    g = ["0"] * 19
    g[1] = "1"
    _write(d / "u.item", f"10|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(g)}\n"
                         f"20|Caf\xe9 (1996)|01-Jan-1996||http://y|{flags}\n", "latin-1")
    data = load_dataset(DataConfig(dataset="ml-100k", data_dir=str(d)))
    assert (data.n_users, data.n_items, len(data)) == (2, 2, 3)
    titles = dict(zip(data.item_ids, data.titles))
    assert titles["10"] == "Toy Story (1995)" and titles["20"] == "Caf\xe9 (1996)"
    assert dict(zip(data.item_ids, data.genres))["10"] == "Action"
    assert set(data.users) == {0, 1} and set(data.items) == {0, 1}


def test_ml_1m_and_movietweetings(tmp_path: Path) -> None:
    d = tmp_path / "ml-1m"
    _write(d / "ratings.dat", "1::5::4::978300760\n1::6::2::978300761\n2::5::5::978300762\n")
    _write(d / "movies.dat", "5::Heat (1995)::Action|Crime\n6::Casino (1995)::Drama\n",
           "latin-1")
    data = load_dataset(DataConfig(dataset="ml-1m", data_dir=str(d)))
    assert len(data) == 3 and "Heat (1995)" in data.titles
    t = tmp_path / "mt"
    _write(t / "ratings.dat", "1::0114508::8::1381006850\n2::0114508::0::1381006851\n"
                              "2::0208092::10::1381006852\n")
    _write(t / "movies.dat", "0114508::Species (1995)::Horror|Sci-Fi\n")
    mt = load_dataset(DataConfig(dataset="movietweetings", data_dir=str(t)))
    assert len(mt) == 3 and mt.rating_range == (0, 10)
    assert "0114508" in list(mt.item_ids)


def test_ml_latest_small(tmp_path: Path) -> None:
    d = tmp_path / "ml-latest-small"
    _write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"
                              "1,3,0.5,964981247\n2,1,5.0,964982224\n")
    _write(d / "movies.csv", 'movieId,title,genres\n1,"Toy Story, The (1995)",Animation\n')
    data = load_dataset(DataConfig(dataset="ml-latest-small", data_dir=str(d)))
    assert len(data) == 3
    assert "Toy Story, The (1995)" in data.titles


def test_generic_csv_and_parquet(tmp_path: Path) -> None:
    f = _write(tmp_path / "r.tsv", "u\ti\tr\nalice\tx\t1\nbob\tx\t2\nalice\ty\t3\n")
    cfg = DataConfig(dataset="csv", data_file=str(f), sep="\t", user_col="u", item_col="i",
                     rating_col="r", time_col="")
    data = load_dataset(cfg)
    assert (data.n_users, data.n_items) == (2, 2)
    pq = tmp_path / "r.parquet"
    pd.DataFrame({"user": [1, 2], "item": [3, 3], "rating": [4.0, 5.0],
                  "timestamp": [1, 2]}).to_parquet(pq)
    assert len(load_dataset(DataConfig(dataset="csv", data_file=str(pq)))) == 2


def test_cleaning_drops_duplicates_missing_and_out_of_range(tmp_path: Path) -> None:
    f = _write(tmp_path / "r.csv", "user,item,rating,timestamp\n1,1,4,1\n1,1,5,2\n"
                                   "2,,3,3\n2,2,-1,4\n2,3,nan,5\n3,3,2,6\n")
    data = load_dataset(DataConfig(dataset="csv", data_file=str(f)))
    assert len(data) == 2
    assert data.cleaning == {"missing-value": 2, "out-of-range-rating": 1, "duplicate": 1}
    # the latest duplicate is kept
    assert 5.0 in data.ratings


@pytest.mark.parametrize(("content", "kwargs", "message"), [
    ("user,item,timestamp\n1,2,3\n", {}, r"line 1: missing column 'rating'"),
    ("user,item,rating,timestamp\n1,2,4,5\n1,3,good,6\n", {}, r"line 3: rating field is 'good'; expected a number"),
    ("", {}, "file is empty"),
    ("user;item;rating;timestamp\n1;2;3;4\n", {}, r"line 1: expected a header .* seems to use ';'"),
    ("user,item,rating,timestamp\n1,2,3,4\n1,2,3,4,5,6\n", {}, r"line 3: expected 4 fields"),
])
def test_bad_csv_gives_one_clear_error(tmp_path: Path, content: str, kwargs: dict,
                                       message: str) -> None:
    f = _write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(DataConfig(dataset="csv", data_file=str(f), **kwargs))
    assert str(f) in str(err.value)


def test_bad_encoding_and_binary(tmp_path: Path) -> None:
    f = tmp_path / "latin.csv"
    f.write_bytes(b"user,item,rating,timestamp\n1,2,3,4\n1,\xe9,3,4\n")
    with pytest.raises(DataError, match=r"line 3: cannot decode byte 0xe9 as utf-8"):
        load_dataset(DataConfig(dataset="csv", data_file=str(f)))
    assert len(load_dataset(DataConfig(dataset="csv", data_file=str(f), encoding="latin-1"))) == 2
    b = tmp_path / "bin.csv"
    b.write_bytes(b"user,item\n\x00\x01\x02")
    with pytest.raises(DataError, match="binary content"):
        load_dataset(DataConfig(dataset="csv", data_file=str(b)))


def test_ml_100k_wrong_separator_names_line(tmp_path: Path) -> None:
    d = tmp_path / "ml"
    _write(d / "u.data", "1,2,3,4\n")
    with pytest.raises(DataError, match=r"u.data, line 1: expected at least 4 fields .*TAB"):
        load_dataset(DataConfig(dataset="ml-100k", data_dir=str(d)))


def test_missing_data_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fedrec data download ml-100k"):
        load_dataset(DataConfig(dataset="ml-100k", data_dir=str(tmp_path)))


def test_synthetic_is_deterministic_and_long_tailed() -> None:
    a, b = generate_synthetic(200, 300, seed=3), generate_synthetic(200, 300, seed=3)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.ratings, b.ratings)
    assert not np.array_equal(a.items, generate_synthetic(200, 300, seed=4).items)
    pop = np.sort(np.bincount(a.items, minlength=a.n_items))[::-1]
    top10 = pop[: len(pop) // 10].sum() / pop.sum()
    assert top10 > 0.25  # long tail: the top 10% of items hold a large share
    assert all(t for t in a.titles) and a.synthetic


def test_temporal_split_fraction_and_leave_last_out() -> None:
    data = generate_synthetic(50, 100, seed=0)
    s = temporal_split(data, "fraction", 0.2, seed=0)
    assert len(s.train) + len(s.test) == len(data)
    for u in range(data.n_users):
        tr_t = s.train.timestamps[s.train.users == u]
        te_t = s.test.timestamps[s.test.users == u]
        assert len(tr_t) >= 1 and (len(te_t) == 0 or tr_t.max() <= te_t.min())
        n = len(tr_t) + len(te_t)
        assert len(te_t) == max(1, round(0.2 * n))
    loo = temporal_split(data, "leave-last-out", 0.2, seed=0)
    assert np.all(np.bincount(loo.test.users) == 1)


def test_k_core_and_threshold(tmp_path: Path) -> None:
    data = generate_synthetic(100, 200, seed=0)
    core = k_core(data, 15)
    assert np.bincount(core.users).min() >= 15 and np.bincount(core.items).min() >= 15
    assert core.users.max() == core.n_users - 1  # remapped to [0, n)
    s = load_split(DataConfig(synthetic_users=100, synthetic_items=200, threshold=4))
    assert s.train.ratings.min() >= 4


def test_negatives_are_unseen() -> None:
    data = generate_synthetic(40, 60, seed=0)
    seen = PairSet(data.users, data.items, data.n_items)
    neg = sample_negatives(data.users, seen, 5, np.random.default_rng(0))
    assert not seen.contains(np.repeat(data.users, 5), neg.ravel()).any()
    ex = ExampleBuilder(data, implicit=True, negatives=3, seed=0).build()
    assert ex.items.shape == (len(data), 4) and ex.targets[:, 0].eq(1).all()
    assert ex.targets[:, 1:].eq(0).all()


def test_sampled_eval_lists() -> None:
    data = generate_synthetic(30, 200, seed=0)
    s = temporal_split(data, "leave-last-out", 0.2, seed=0)
    seen = PairSet(data.users, data.items, data.n_items)
    users, lists = sampled_eval_lists(s.test, seen, 99, seed=0)
    assert lists.shape == (len(s.test), 100)
    assert np.array_equal(lists[:, 0], s.test.items)
    assert not seen.contains(np.repeat(users, 99), lists[:, 1:].ravel()).any()


def test_presplit_files_share_ids(tmp_path: Path) -> None:
    tr = _write(tmp_path / "train.csv", "user,item,rating,timestamp\na,x,1,1\nb,y,1,2\na,z,1,3\n")
    te = _write(tmp_path / "test.csv", "user,item,rating,timestamp\na,y,1,4\nb,x,1,5\n")
    s = load_split(DataConfig(dataset="csv", data_file=str(tr), test_file=str(te)))
    assert (len(s.train), len(s.test), s.n_users, s.n_items) == (3, 2, 2, 3)
    pairs = {(s.test.user_ids[u], s.test.item_ids[i]) for u, i in zip(s.test.users, s.test.items)}
    assert pairs == {("a", "y"), ("b", "x")}


def test_validation_split_is_carved_from_training_only() -> None:
    from fedrec.config import RunConfig

    full = load_split(RunConfig.from_flat({"seed": 2}).data)
    val = load_split(RunConfig.from_flat({"seed": 2, "validation": True}).data)

    def pairs(d):  # noqa: ANN001, ANN202
        return set(zip(d.users.tolist(), d.items.tolist()))

    assert pairs(val.train) | pairs(val.test) == pairs(full.train)
    assert not (pairs(val.train) | pairs(val.test)) & pairs(full.test)
    assert not pairs(val.train) & pairs(val.test)


@pytest.mark.parametrize("mode", ["fraction", "random"])
def test_one_more_rating_never_moves_another_users_ratings(mode: str) -> None:
    """Ties in time are broken by each row's own hash, so adding a rating of user A
    changes nothing for other users; in random mode no other rating moves at all."""
    rows = [(f"u{u}", f"i{i}", 1.0, 7) for u in range(6) for i in range(u, u + 8)]  # all tied
    extra = [("u0", "i99", 1.0, 7)]

    def split_of(table):  # noqa: ANN001, ANN202
        df = pd.DataFrame(table, columns=["user", "item", "rating", "timestamp"])
        df["line"] = range(len(df))
        data = build_interactions(df, source="t", name="t", rating_range=(0, 5))
        sp = temporal_split(data, mode, 0.25, seed=3)
        return {(data.user_ids[u], data.item_ids[i]) for u, i in
                zip(sp.test.users, sp.test.items)}

    before, after = split_of(rows), split_of(extra + rows)  # a row earlier in the file
    others = lambda s: {p for p in s if p[0] != "u0"}  # noqa: E731
    assert others(before) == others(after)
    if mode == "random":
        assert before - after == set() and after - before <= {("u0", "i99")}


def test_implicit_only_csv_without_a_rating_column(tmp_path: Path) -> None:
    from fedrec.config import RunConfig
    from fedrec.errors import ConfigError

    path = tmp_path / "clicks.csv"
    path.write_text("user,item\nu1,i1\nu1,i2\nu2,i1\nu2,i3\nu3,i2\nu3,i3\nu3,i1\n")
    cfg = RunConfig.from_flat({"dataset": "csv", "data-file": str(path), "rating-col": "",
                               "time-col": ""})
    split = load_split(cfg.data)
    assert len(split.train) + len(split.test) == 7 and (split.train.ratings == 1).all()
    with pytest.raises(ConfigError, match="rating-col"):
        RunConfig.from_flat({"dataset": "csv", "rating-col": "", "feedback": "explicit"})


def test_fixed_negatives_file_reproduces_a_published_protocol(tmp_path: Path) -> None:
    import torch

    from fedrec.config import RunConfig
    from fedrec.errors import DataError
    from fedrec.evaluate import evaluate_counts
    from fedrec.metrics import finalize

    base = {"synthetic-users": 20, "synthetic-items": 40, "split": "leave-last-out"}
    split = load_split(RunConfig.from_flat(base).data)
    test = split.test
    lines = []
    for u, i in zip(test.user_ids[test.users], test.item_ids[test.items]):
        lines.append(f"({u},{i})\t" + "\t".join(str(x) for x in test.item_ids[:3]))
    path = tmp_path / "test.negative"
    path.write_text("\n".join(lines) + "\n")
    fixed = load_split(RunConfig.from_flat({**base, "negatives-file": str(path)}).data)
    assert fixed.test.negatives.shape == (len(test), 3)

    class ByIndex:  # scores item j as j: the positive ranks against items 0, 1, 2
        n_items = split.n_items

        def __call__(self, users, items):  # noqa: ANN001, ANN204
            return items.double()

        def parameters(self):  # noqa: ANN201
            return iter([torch.zeros(1)])

        def eval(self):  # noqa: ANN201
            return self

        def train(self, mode=True):  # noqa: ANN001, ANN201
            return self

        training = False

    counts = evaluate_counts(ByIndex(), fixed.train, fixed.test, ks=(1,), implicit=True)  # type: ignore[arg-type]
    hit = (fixed.test.items >= 2).mean()  # no negative of 0, 1, 2 scores above index >= 2
    assert finalize(counts, (1,))["hr@1"] == pytest.approx(hit)
    path.write_text(lines[0] + "\n")
    with pytest.raises(DataError, match="no negatives for held-out pair"):
        load_split(RunConfig.from_flat({**base, "negatives-file": str(path)}).data)
    path.write_text(lines[0] + "\tnot-an-item\n")
    with pytest.raises(DataError, match="line 1: items \\['not-an-item'\\]"):
        load_split(RunConfig.from_flat({**base, "negatives-file": str(path)}).data)
