"""Strict readers for delimited rating files: every failure names the file and line.

A reader returns a pandas DataFrame with numeric columns ``user``, ``item``, ``rating``,
``timestamp`` and ``line`` (the 1-based line number in the file, kept for later errors).
Ids are kept as they appear in the file; ``fedrec.data.interactions`` remaps them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.errors import DataError

ROLES = ("user", "item", "rating", "timestamp")
ROW_ORDER_OFFSET = 2.0 ** 40  # row numbers stand for times below -2^40 (order kept)
_MISSING = ("", "nan", "na", "n/a", "null", "none")  # read as a missing value
_CANDIDATE_SEPS = ("\t", ",", ";", "|", "::", " ")


def _show_sep(sep: str) -> str:
    return {"\t": "TAB", " ": "SPACE"}.get(sep, repr(sep))


def read_text(path: Path, encoding: str = "utf-8", expected: str = "rating rows") -> str:
    """Read a whole text file; empty, binary or undecodable content is a DataError
    (``expected``: what an empty file should have held, for its message)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty; expected {expected}")
    if b"\x00" in raw[:65536]:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: binary content (NUL byte); expected a text file")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: cannot decode byte 0x{raw[err.start]:02x} as {encoding}; "
            "pass the file's encoding (e.g. --encoding latin-1)"
        ) from None
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None


def _guess_sep(line: str) -> str | None:
    counts = {s: line.count(s) for s in _CANDIDATE_SEPS if s in line}
    return max(counts, key=lambda s: counts[s]) if counts else None


def _column(path: Path, role: str, raw: pd.Series, line_no: np.ndarray) -> pd.Series:
    """Validate one role's column: ids stay strings, rating/timestamp become float.

    Empty fields become missing values (dropped by cleaning, and counted); text where a
    number is expected is a DataError naming the line.
    """
    col = raw.astype(str).str.strip()
    if role in ("user", "item"):
        return col.where(col != "", None)
    missing = col.str.lower().isin(_MISSING).to_numpy()
    values = pd.to_numeric(col.where(~missing, ""), errors="coerce")
    bad = values.isna().to_numpy() & ~missing
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}, line {line_no[i]}: {role} field is {col.iloc[i]!r}; expected a number"
        )
    return values.astype(np.float64)


def _with_defaults(out: pd.DataFrame) -> pd.DataFrame:
    """``out`` with the columns a file may lack: times from row order (far below any
    real Unix time, so no row number is ever read as a moment:
    ``fedrec.features.context_columns``) and, for implicit-only data (clicks,
    purchases), a rating of 1 on every row."""
    if "timestamp" not in out:
        out["timestamp"] = np.arange(len(out), dtype=np.float64) - ROW_ORDER_OFFSET
    if "rating" not in out:
        out["rating"] = np.ones(len(out), dtype=np.float64)
    return out


def parse_error(path: Path, err: pd.errors.ParserError, line_no: Sequence[int], sep: str,
                as_in: str = "") -> DataError:
    """pandas' parse error as a DataError naming the file's line (``line_no``: the file's
    line of each line pandas read) and the fields expected (``as_in``: where from)."""
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if m:
        return DataError(f"{path}, line {line_no[int(m.group(2)) - 1]}: expected "
                         f"{m.group(1)} fields separated by {_show_sep(sep)}{as_in}, "
                         f"found {m.group(3)}")
    return DataError(f"{path}: cannot parse as {_show_sep(sep)}-separated text: {err}")


def read_delimited(
    path: Path,
    *,
    sep: str,
    columns: dict[str, str | int | None],
    header: bool,
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """Parse a delimited ratings file into numeric user/item/rating/timestamp columns.

    Args:
        path: the file.
        sep: field separator (may be several characters, e.g. ``::``).
        columns: role -> column name (header files) or 0-based position (headerless);
            ``timestamp`` may map to None (row order is then used as time).
        header: whether the first line holds column names.
        encoding: text encoding.

    Raises:
        DataError: naming the file, the line and what was expected.
    """
    text = read_text(path, encoding)
    lines = text.splitlines()
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if header:
        head_no, head = numbered[0]
        numbered = numbered[1:]
        names = head.split(sep)
        if len(names) == 1 and len(columns) > 1:
            guess = _guess_sep(head)
            hint = f"; the file seems to use {_show_sep(guess)}" if guess else ""
            raise DataError(
                f"{path}, line {head_no}: expected a header of several columns separated "
                f"by {_show_sep(sep)}, found one field {head!r}{hint} (set --sep)"
            )
        names = [n.strip().strip('"') for n in names]
        positions: dict[str, int] = {}
        for role, name in columns.items():
            if name is None:
                continue
            if name not in names:
                raise DataError(
                    f"{path}, line {head_no}: missing column {name!r} for {role}; "
                    f"found columns {names}"
                )
            positions[role] = names.index(str(name))
        width = len(names)
    else:
        positions = {role: int(c) for role, c in columns.items() if c is not None}
        width = max(positions.values()) + 1
    if not numbered:
        raise DataError(f"{path}: no data rows after the header; expected rating rows")
    body = "\n".join(ln for _, ln in numbered)
    line_no = np.fromiter((n for n, _ in numbered), dtype=np.int64, count=len(numbered))
    c_sep = sep
    if len(sep) > 1:
        body = body.replace(sep, "\x1f")
        c_sep = "\x1f"
    try:
        df = pd.read_csv(
            io.StringIO(body), sep=c_sep, header=None, dtype=str, keep_default_na=False,
            na_filter=False, engine="c", quoting=3 if not header else 0,
            skip_blank_lines=False,
        )
    except pd.errors.ParserError as err:
        raise parse_error(path, err, line_no, sep) from None
    if df.shape[1] < width:
        first = numbered[0][1]
        guess = _guess_sep(first)
        hint = f"; the file seems to use {_show_sep(guess)}" if guess and guess != sep else ""
        raise DataError(
            f"{path}, line {numbered[0][0]}: expected at least {width} fields separated by "
            f"{_show_sep(sep)}, found {df.shape[1]}{hint} (set --sep)"
        )
    if header and df.shape[1] != width:
        # more fields than header names somewhere
        raise DataError(
            f"{path}, line {line_no[0]}: expected {width} fields as in the header, "
            f"found {df.shape[1]}"
        )
    out = pd.DataFrame({"line": line_no})
    for role in ROLES:
        if role in positions:
            out[role] = _column(path, role, df.iloc[:, positions[role]], line_no)
    return _with_defaults(out)


def parquet_frame(path: Path, expected: str = "rating rows") -> pd.DataFrame:
    """A whole Parquet file; missing, unreadable or empty is a DataError (``expected``:
    what an empty file should have held, for its message)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_parquet(path)
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(
            f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    if df.empty:
        raise DataError(f"{path}: file is empty; expected {expected}")
    return df


def read_parquet(path: Path, *, columns: dict[str, str | int | None]) -> pd.DataFrame:
    """Read a Parquet ratings file; column names come from ``columns``."""
    df = parquet_frame(path)
    out = pd.DataFrame({"line": np.arange(1, len(df) + 1)})
    for role in ROLES:
        name = columns.get(role)
        if name is None:
            continue
        if name not in df.columns:
            raise DataError(
                f"{path}: missing column {name!r} for {role}; found columns {list(df.columns)}"
            )
        col = df[name].astype(str).where(df[name].notna(), "")
        out[role] = _column(path, role, col, out["line"].to_numpy())
    return _with_defaults(out)
