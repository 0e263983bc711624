"""Results directories: resolved config, metrics.json, per-epoch/round CSV, all atomic.

A run writes into a hidden temporary folder next to ``--out`` and renames it into place
only when it has finished, so an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedrec.errors import FedrecError


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a temporary file in the same folder and rename (never a partial file).

    The file gets ``mode`` if given (else mkstemp's 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename (never a partial file)."""
    text = json.dumps(_clean(data), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode())


class RowWriter:
    """Rows of a per-epoch or per-round table, written as CSV and JSON into a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def add_row(self, row: dict[str, Any]) -> None:
        """One row of the table."""
        self.rows.append(row)

    def write_rows(self, stem: str) -> None:
        """The table as ``stem.csv`` and ``stem.json``."""
        if not self.rows:
            return
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        with (self.path / f"{stem}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        write_json_atomic(self.path / f"{stem}.json", self.rows)


class RunDir(RowWriter):
    """A results directory under construction; ``commit()`` moves it to ``out``."""

    def __init__(self, out: Path, *, overwrite: bool = False) -> None:
        self.out = out
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FedrecError(f"{out}: results directory exists and is not empty; choose "
                              "another --out or pass --overwrite")
        out.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-")))

    def write_json(self, name: str, data: Any) -> None:
        """A JSON file in the run directory."""
        write_json_atomic(self.path / name, data)

    def commit(self) -> Path:
        """Move the finished directory into place."""
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.path, self.out)
        return self.out

    def abort(self) -> None:
        """Remove the unfinished directory."""
        shutil.rmtree(self.path, ignore_errors=True)
