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


def run_facts(command: str) -> dict[str, Any]:
    """What produced a run: command, package versions, Python and the git commit of the
    fedrec source (when it is a git checkout), for ``config.json``."""
    import platform
    import subprocess
    from importlib import metadata

    from fedrec import __version__

    facts: dict[str, Any] = {"fedrec_version": __version__, "command": command,
                             "python": platform.python_version()}
    for pkg in ("torch", "flwr", "opacus", "numpy"):
        try:
            facts[f"{pkg}_version"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            facts[f"{pkg}_version"] = None
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], timeout=10,
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "fedrec", "server", "client"], timeout=10,
                               capture_output=True, text=True).stdout.strip()
        facts["git_commit"] = (out.stdout.strip() + ("+dirty" if dirty else "")
                               if out.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        facts["git_commit"] = None
    return facts


def plot_curves(rows: list[dict[str, Any]], x: str, metrics: list[str], path: Path,
                title: str) -> None:
    """A PNG of ``metrics`` against ``x`` (one panel each), for rows that have them."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(isinstance(r.get(m), int | float) and
                                       math.isfinite(r[m]) for r in rows)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, m in zip(axes[0], shown):
        pts = [(r[x], r[m]) for r in rows if isinstance(r.get(m), int | float)
               and math.isfinite(r[m])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
        ax.set_xlabel(x)
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())


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
