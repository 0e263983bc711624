"""Loaders for MovieLens 100K/1M/latest-small, MovieTweetings and generic CSV/Parquet."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fedrec.data.interactions import Interactions, build_interactions
from fedrec.data.readers import read_delimited, read_parquet, read_text
from fedrec.errors import DataError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_POS = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}


def _need(folder: Path, name: str, dataset: str) -> Path:
    path = folder / name
    if not path.exists():
        raise DataError(
            f"{path}: file not found; expected the {dataset} files in {folder} "
            f"(run 'fedrec data download {dataset}' or pass --data-dir)"
        )
    return path


def _split_lines(path: Path, sep: str, encoding: str, min_fields: int) -> list[list[str]]:
    rows = []
    for no, line in enumerate(read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < min_fields:
            raise DataError(f"{path}, line {no}: expected {min_fields} fields separated by "
                            f"{sep!r}, found {len(parts)}")
        rows.append(parts)
    return rows


# MovieLens 1M's age groups (its users.dat codes), used for ML-100K's exact ages too
AGE_GROUPS = ((1, "under-18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"),
              (50, "50-55"), (56, "56+"))
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer",
    "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)


def age_group(age: int) -> str:
    """MovieLens 1M's age group of an age in years."""
    return [name for low, name in AGE_GROUPS if age >= low or low == 1][-1]


def _user_meta(path: Path, rows: list[list[str]], gender: int, age: int, occupation: int,
               zip_code: int, *, coded: bool) -> pd.DataFrame:
    """``user``/``features`` columns from a users file (``coded``: ML-1M's codes)."""
    feats = []
    for no, r in enumerate(rows, start=1):
        try:
            years = int(r[age])
            occ = ML1M_OCCUPATIONS[int(r[occupation])] if coded else r[occupation].strip()
        except (ValueError, IndexError):
            raise DataError(f"{path}, line {no}: expected an integer age and "
                            f"{'an occupation code 0-20' if coded else 'an occupation'}, "
                            f"got {r[age]!r}, {r[occupation]!r}") from None
        feats.append(f"age={age_group(years)}|gender={r[gender].strip()}|occupation={occ}"
                     f"|zip={r[zip_code].strip()[:1]}")
    return pd.DataFrame({"user": [r[0].strip() for r in rows], "features": feats})


def load_ml_100k(folder: Path) -> Interactions:
    """MovieLens 100K: ``u.data`` (TAB: user, item, rating, time), ``u.item`` (titles,
    genres) and ``u.user`` (age, gender, occupation, zip code)."""
    path = _need(folder, "u.data", "ml-100k")
    ratings = read_delimited(path, sep="\t", columns=_POS, header=False)
    meta = None
    if (folder / "u.item").exists():
        rows = _split_lines(folder / "u.item", "|", "latin-1", 5 + len(ML100K_GENRES))
        meta = pd.DataFrame({
            "item": [r[0].strip() for r in rows],
            "title": [r[1] for r in rows],
            "genres": ["|".join(g for g, f in zip(ML100K_GENRES, r[5:]) if f.strip() == "1")
                       for r in rows],
        })
    users = None
    if (folder / "u.user").exists():
        rows = _split_lines(folder / "u.user", "|", "latin-1", 5)
        users = _user_meta(folder / "u.user", rows, 2, 1, 3, 4, coded=False)
    return build_interactions(ratings, source=str(path), name="ml-100k",
                              rating_range=(1, 5), item_meta=meta, user_meta=users)


def _movies_dat(path: Path, encoding: str) -> pd.DataFrame:
    rows = _split_lines(path, "::", encoding, 2)
    return pd.DataFrame({
        "item": [r[0].strip() for r in rows],
        "title": [r[1] for r in rows],
        "genres": [r[2] if len(r) > 2 else "" for r in rows],
    })


def load_ml_1m(folder: Path) -> Interactions:
    """MovieLens 1M: ``ratings.dat`` (``::``-separated), ``movies.dat`` and ``users.dat``
    (Latin-1)."""
    path = _need(folder, "ratings.dat", "ml-1m")
    ratings = read_delimited(path, sep="::", columns=_POS, header=False)
    movies = folder / "movies.dat"
    meta = _movies_dat(movies, "latin-1") if movies.exists() else None
    users = None
    if (folder / "users.dat").exists():
        rows = _split_lines(folder / "users.dat", "::", "latin-1", 5)
        users = _user_meta(folder / "users.dat", rows, 1, 2, 3, 4, coded=True)
    return build_interactions(ratings, source=str(path), name="ml-1m",
                              rating_range=(1, 5), item_meta=meta, user_meta=users)


def load_ml_latest_small(folder: Path) -> Interactions:
    """MovieLens latest-small: ``ratings.csv`` (0.5-5 stars) and ``movies.csv``."""
    path = _need(folder, "ratings.csv", "ml-latest-small")
    cols = {"user": "userId", "item": "movieId", "rating": "rating", "timestamp": "timestamp"}
    ratings = read_delimited(path, sep=",", columns=cols, header=True)
    meta = None
    movies = folder / "movies.csv"
    if movies.exists():
        try:
            m = pd.read_csv(movies, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise DataError(f"{movies}: cannot parse ({err})") from None
        meta = pd.DataFrame({"item": m["movieId"].str.strip(), "title": m["title"],
                             "genres": m["genres"]})
    return build_interactions(ratings, source=str(path), name="ml-latest-small",
                              rating_range=(0.5, 5), item_meta=meta)


def load_movietweetings(folder: Path) -> Interactions:
    """MovieTweetings: ``ratings.dat`` (``user::item::rating 0-10::time``), ``movies.dat``."""
    path = _need(folder, "ratings.dat", "movietweetings")
    ratings = read_delimited(path, sep="::", columns=_POS, header=False)
    meta = _movies_dat(folder / "movies.dat", "utf-8") if (folder / "movies.dat").exists() else None
    return build_interactions(ratings, source=str(path), name="movietweetings",
                              rating_range=(0, 10), item_meta=meta)


def load_table(
    path: Path,
    *,
    sep: str = ",",
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    time_col: str = "timestamp",
    encoding: str = "utf-8",
) -> Interactions:
    """A generic CSV/TSV or Parquet file with a header naming its columns.

    Ratings must be finite and >= 0; ``rating_col=""`` reads implicit-only data (every
    row a positive, rating 1); ``time_col=""`` uses row order as time.
    """
    cols: dict[str, str | int | None] = {
        "user": user_col, "item": item_col, "rating": rating_col or None,
        "timestamp": time_col or None,
    }
    if path.suffix.lower() in (".parquet", ".pq"):
        ratings = read_parquet(path, columns=cols)
    else:
        ratings = read_delimited(path, sep=sep, columns=cols, header=True, encoding=encoding)
    return build_interactions(ratings, source=str(path), name=path.stem,
                              rating_range=(0.0, math.inf))


LOADERS: dict[str, Callable[[Path], Interactions]] = {
    "ml-100k": load_ml_100k,
    "ml-1m": load_ml_1m,
    "ml-latest-small": load_ml_latest_small,
    "movietweetings": load_movietweetings,
}
