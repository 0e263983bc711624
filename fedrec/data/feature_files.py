"""Item and user feature files of any dataset: CSV/TSV or Parquet, one row per id.

An item features file has the ratings file's item column (``item-col``), optionally
``title`` (shown in recommendations; a trailing ``(YYYY)`` gives the release decade;
``item-text=on`` embeds it) and ``genres`` (``"Drama|Crime"``); every other column is a
field whose values the feature models embed (``"director=Nolan"``; a cell may hold
several values separated by ``|``; an empty cell holds none). A user features file has
the ``user-col`` column and fields the same way (``"age=25-34"``): a user's own
features, which stay on the client (``fedrec.features``).

They add to what a built-in dataset's own files give (a file's title replaces the
dataset's). Ids the ratings do not have are ignored; an item or user the file lacks
has no values from it.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.config import DataConfig
from fedrec.data.interactions import Interactions
from fedrec.data.readers import parquet_frame, parse_error, read_text
from fedrec.errors import DataError

log = logging.getLogger(__name__)

SPECIAL = ("title", "genres")  # item columns that are not fields


def read_feature_table(path: Path, id_col: str, *, sep: str = ",",
                       encoding: str = "utf-8") -> pd.DataFrame:
    """Every column as stripped strings, plus ``line`` (the file's line of each row, or
    the row number of a Parquet file); one row per id.

    Raises:
        DataError: naming the file (and line): missing, empty or unreadable, no
            ``id_col`` column, a row of another width, an empty or repeated id.
    """
    expected = "a header and one row per id"
    if path.suffix.lower() in (".parquet", ".pq"):
        df = parquet_frame(path, expected)
        df = df.astype(str).where(df.notna(), "")
        df.columns = [str(c) for c in df.columns]
        if id_col not in df.columns:
            raise DataError(f"{path}: missing column {id_col!r} (the ratings' id column); "
                            f"found columns {list(df.columns)}")
        df["line"] = np.arange(1, len(df) + 1)
        where = "row"
    else:
        text = read_text(path, encoding, expected)
        numbered = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
        head_no = numbered[0][0]
        try:
            df = pd.read_csv(io.StringIO("\n".join(ln for _, ln in numbered)), sep=sep,
                             dtype=str, keep_default_na=False, na_filter=False,
                             engine="python" if len(sep) > 1 else "c")
        except pd.errors.ParserError as err:
            raise parse_error(path, err, [n for n, _ in numbered], sep,
                              " as in the header") from None
        df.columns = [str(c).strip() for c in df.columns]
        if id_col not in df.columns:
            raise DataError(f"{path}, line {head_no}: missing column {id_col!r} (the "
                            f"ratings' id column); found columns {list(df.columns)}"
                            + (" (set --sep)" if len(df.columns) == 1 else ""))
        df["line"] = [n for n, _ in numbered[1:]]
        where = "line"
    if df.empty:
        raise DataError(f"{path}: no rows after the header; expected one row per id")
    for col in df.columns:
        if col != "line":
            df[col] = df[col].astype(str).str.strip()
    empty = (df[id_col] == "").to_numpy()
    if empty.any():
        raise DataError(f"{path}, {where} {df['line'].iat[int(np.argmax(empty))]}: empty "
                        f"{id_col!r}; expected an id")
    dup = df[id_col].duplicated(keep=False).to_numpy()
    if dup.any():
        lines = df["line"].to_numpy()[df[id_col].to_numpy() == df[id_col].to_numpy()[dup][0]]
        raise DataError(f"{path}, {where}s {', '.join(map(str, lines[:3]))}: id "
                        f"{df[id_col].to_numpy()[dup][0]!r} appears more than once; "
                        "expected one row per id")
    return df


def field_values(row: pd.Series, fields: list[str]) -> list[str]:
    """``"field=value"`` for each value of each field of one row (cells split on ``|``)."""
    return [f"{f}={v.strip()}" for f in fields for v in str(row[f]).split("|") if v.strip()]


def _joined(table: pd.DataFrame, fields: list[str]) -> list[str]:
    return ["|".join(field_values(row, fields)) for _, row in table.iterrows()]


def with_feature_files(cfg: DataConfig, data: Interactions) -> Interactions:
    """``data`` with the values of ``item-features-file`` / ``user-features-file``
    (when set) added to its items' genres entries and its users' features."""
    titles, genres, users = data.titles, data.genres, data.user_features
    if cfg.item_features_file:
        path = Path(cfg.item_features_file)
        table = read_feature_table(path, cfg.item_col, sep=cfg.sep, encoding=cfg.encoding)
        fields = [c for c in table.columns if c not in (cfg.item_col, "line", *SPECIAL)]
        table = table.set_index(cfg.item_col)
        at = table.index.get_indexer([str(i) for i in data.item_ids])
        values = _joined(table, fields)
        titles, genres = list(titles), list(genres)
        for j, k in enumerate(at):
            if k < 0:
                continue
            if "title" in table.columns and table["title"].iat[k]:
                titles[j] = table["title"].iat[k]
            extra = [table["genres"].iat[k]] if "genres" in table.columns else []
            genres[j] = "|".join(p for p in (genres[j], *extra, values[k]) if p)
        _report(path, "items", int((at >= 0).sum()), data.n_items)
    if cfg.user_features_file:
        path = Path(cfg.user_features_file)
        table = read_feature_table(path, cfg.user_col, sep=cfg.sep, encoding=cfg.encoding)
        fields = [c for c in table.columns if c not in (cfg.user_col, "line")]
        if not fields:
            raise DataError(f"{path}: no feature columns besides {cfg.user_col!r}")
        table = table.set_index(cfg.user_col)
        at = table.index.get_indexer([str(u) for u in data.user_ids])
        values = _joined(table, fields)
        old = users or [""] * data.n_users
        users = ["|".join(p for p in (old[j], values[k] if k >= 0 else "") if p)
                 for j, k in enumerate(at)]
        _report(path, "users", int((at >= 0).sum()), data.n_users)
    return replace(data, titles=titles, genres=genres, user_features=users)


def _report(path: Path, what: str, found: int, total: int) -> None:
    if found == 0:
        raise DataError(f"{path}: none of its ids is one of the data's {total:,} {what} "
                        "(check the id column and the ratings file)")
    if found < total:
        log.warning("%s: features for %d of %d %s; the others have none from it", path,
                    found, total, what)
