"""Item and user feature files for any dataset: what they add, and their errors."""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import DataConfig, RunConfig
from fedrec.data import load_dataset, load_split
from fedrec.errors import DataError
from fedrec.features import _WARNED, features_of, hash_value, item_values

RATINGS = "\n".join(["userId,movieId,rating,ts"]
                    + [f"u{u},m{i},{1 + (u + i) % 5},{u * 10 + i}"
                       for u in range(6) for i in range(5) if (u + i) % 3])


def _cfg(tmp_path: Path, items: str | None = None, users: str | None = None,
         **extra: str) -> DataConfig:
    (tmp_path / "r.csv").write_text(RATINGS + "\n")
    paths = {}
    for name, text in (("items.csv", items), ("users.csv", users)):
        if text is not None:
            (tmp_path / name).write_text(text)
            paths[name] = str(tmp_path / name)
    return DataConfig(dataset="csv", data_file=str(tmp_path / "r.csv"), user_col="userId",
                      item_col="movieId", time_col="ts",
                      item_features_file=paths.get("items.csv", ""),
                      user_features_file=paths.get("users.csv", ""), **extra)


ITEMS = ('movieId,title,genres,director,country\n'
         'm0,"Heat, the remake (1995)",Action|Drama,Mann,US|UK\n'
         'm1,Alien (1979),Sci-Fi,Scott,\n'
         'm9,Never rated (2001),Drama,Nobody,FR\n')
USERS = "userId,age,plan\nu0,25-34,free\nu1,35-44,paid\nu2,,paid\n"


def test_generic_files_add_titles_genres_fields_and_user_features(tmp_path: Path) -> None:
    data = load_dataset(_cfg(tmp_path, ITEMS, USERS))
    m0, m1, m2 = (list(data.item_ids).index(m) for m in ("m0", "m1", "m2"))
    assert data.titles[m0] == "Heat, the remake (1995)"  # a quoted comma stays in
    assert item_values(data.titles[m0], data.genres[m0]) == [
        "genre=Action", "genre=Drama", "director=Mann", "country=US", "country=UK",
        "decade=1990"]
    assert item_values(data.titles[m1], data.genres[m1]) == [
        "genre=Sci-Fi", "director=Scott", "decade=1970"]  # an empty cell: no value
    assert data.titles[m2] == "" and data.genres[m2] == ""  # not in the file
    u0, u2, u3 = (list(data.user_ids).index(u) for u in ("u0", "u2", "u3"))
    assert data.user_features[u0] == "age=25-34|plan=free"
    assert data.user_features[u2] == "plan=paid" and data.user_features[u3] == ""
    feats = features_of(data, 1024)
    assert feats.items.shape == (data.n_items, 6) and feats.users.shape == (data.n_users, 2)
    assert feats.items[m0].tolist() == [hash_value(v, 1024) for v in item_values(
        data.titles[m0], data.genres[m0])]
    # they follow the split (and the k-core renumbering) into training data
    split = load_split(_cfg(tmp_path, ITEMS, USERS, min_interactions=2))
    assert sorted(split.train.user_features) == sorted(data.user_features)


def test_a_feature_model_trains_on_generic_feature_files(tmp_path: Path) -> None:
    from fedrec.central import run_centralized

    cfg = RunConfig.from_flat({
        "dataset": "csv", "data-file": str(_cfg(tmp_path, ITEMS, USERS).data_file),
        "user-col": "userId", "item-col": "movieId", "time-col": "ts",
        "item-features-file": str(tmp_path / "items.csv"),
        "user-features-file": str(tmp_path / "users.csv"), "model": "deepfm", "dim": 4,
        "epochs": 1, "dp": False}, central=True)
    _, metrics, _ = run_centralized(cfg, load_split(cfg.data))
    assert np.isfinite(metrics["recall@20"])


def test_parquet_feature_files(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    pd.read_csv(io.StringIO(ITEMS), dtype=str, keep_default_na=False).to_parquet(
        tmp_path / "items.parquet")
    data = load_dataset(replace(_cfg(tmp_path),
                                item_features_file=str(tmp_path / "items.parquet")))
    m1 = list(data.item_ids).index("m1")
    assert item_values(data.titles[m1], data.genres[m1])[:2] == ["genre=Sci-Fi",
                                                                 "director=Scott"]


@pytest.mark.parametrize(("items", "users", "message"), [
    ("id,title\nm0,Heat\n", None,
     r"items.csv, line 1: missing column 'movieId' \(the ratings' id column\); found "
     r"columns \['id', 'title'\]"),
    ("movieId;title\nm0;Heat\n", None, r"missing column 'movieId'.*\(set --sep\)"),
    ("movieId,director\nm0,Mann\nm1,Scott,extra\n", None,
     r"items.csv, line 3: expected 2 fields separated by ',' as in the header, found 3"),
    ("movieId,director\nm0,Mann\n\nm1,Scott\nm0,Other\n", None,
     r"items.csv, lines 2, 5: id 'm0' appears more than once"),
    ("movieId,director\nm0,Mann\n ,Scott\n", None, r"items.csv, line 3: empty 'movieId'"),
    ("movieId,director\n", None, r"items.csv: no rows after the header"),
    ("  \n", None, r"items.csv: file is empty; expected a header and one row per id"),
    ("movieId,director\nx1,Mann\n", None,
     r"items.csv: none of its ids is one of the data's 5 items"),
    (None, "userId\nu0\n", r"users.csv: no feature columns besides 'userId'"),
])
def test_bad_feature_files_are_named_with_the_line(tmp_path: Path, items: str | None,
                                                    users: str | None, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(_cfg(tmp_path, items, users))


def test_a_missing_feature_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.csv: file not found"):
        load_dataset(replace(_cfg(tmp_path), user_features_file=str(tmp_path / "nope.csv")))


def test_values_past_the_slots_are_reported(tmp_path: Path, caplog) -> None:
    fields = ",".join(f"f{i}" for i in range(10))
    users = f"userId,{fields}\nu0,{','.join('x' * 10)}\n"
    data = load_dataset(_cfg(tmp_path, None, users))
    _WARNED.clear()  # whatever another test logged before
    with caplog.at_level(logging.WARNING):
        feats = features_of(data, 64)
    assert feats.users.shape[1] == 8
    assert "1 of 6 rows have more than 8 feature values" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the next round's clients: said once a run
        features_of(data, 64)
    assert "feature values" not in caplog.text


def test_explanations_name_a_feature_files_field() -> None:
    from fedrec.recommend import Recommendation

    rec = Recommendation("m0", "Heat", 1.0, ["Alien"], "director=Mann", 3)
    assert rec.explanation() == "because you liked Alien; you liked 3 titles with director Mann"
    rec = Recommendation("m0", "Heat", 1.0, [], "Film-Noir", 5)
    assert rec.explanation() == "you liked 5 Film-Noir titles"
