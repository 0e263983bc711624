"""Data: loaders, download, synthetic generation, cleaning, splits and sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.config import DataConfig
from fedrec.data.feature_files import with_feature_files
from fedrec.data.interactions import Interactions, build_interactions
from fedrec.data.loaders import LOADERS, load_table
from fedrec.data.sampling import ExampleBuilder, Examples, PairSet, sampled_eval_lists
from fedrec.data.split import Split, k_core, split_by_membership, temporal_split, to_feedback
from fedrec.data.synthetic import generate_synthetic
from fedrec.errors import DataError

__all__ = [
    "ExampleBuilder", "Examples", "Interactions", "PairSet", "Split", "load_dataset", "load_file",
    "load_split", "sampled_eval_lists",
]


def load_file(cfg: DataConfig, path: Path) -> Interactions:
    """One ratings file (CSV/TSV/Parquet) read with the configured columns."""
    return load_table(path, sep=cfg.sep, user_col=cfg.user_col, item_col=cfg.item_col,
                      rating_col=cfg.rating_col, time_col=cfg.time_col, encoding=cfg.encoding)


def load_dataset(cfg: DataConfig) -> Interactions:
    """Load (or generate) the configured dataset, cleaned, with ids in [0, n), with the
    values of its feature files (``item-features-file``, ``user-features-file``).

    Raises:
        DataError: a missing path or a malformed file.
    """
    return with_feature_files(cfg, _load_dataset(cfg))


def _load_dataset(cfg: DataConfig) -> Interactions:
    if cfg.dataset == "synthetic":
        return generate_synthetic(cfg.synthetic_users, cfg.synthetic_items,
                                  mean_activity=cfg.synthetic_activity, seed=cfg.seed)
    if cfg.dataset == "csv":
        if not cfg.data_file:
            raise DataError("dataset 'csv' needs --data-file (config key 'data-file')")
        return load_file(cfg, Path(cfg.data_file))
    if not cfg.data_dir:
        raise DataError(f"dataset {cfg.dataset!r} needs --data-dir (config key 'data-dir'), "
                        f"or run 'fedrec data download {cfg.dataset}'")
    folder = Path(cfg.data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: data directory not found")
    return LOADERS[cfg.dataset](folder)


def _load_presplit(cfg: DataConfig) -> tuple[Interactions, np.ndarray]:
    """Train file (data-file) and test file (test-file) over one shared id space."""
    train = load_file(cfg, Path(cfg.data_file))
    test = load_file(cfg, Path(cfg.test_file))
    frames = []
    for part, d in ((0, train), (1, test)):
        frames.append(pd.DataFrame({
            "user": d.user_ids[d.users], "item": d.item_ids[d.items],
            "rating": d.ratings.astype(np.float64), "timestamp": d.timestamps,
            "line": np.arange(len(d)) + part * 10**12, "part": part,
        }))
    both = pd.concat(frames, ignore_index=True)
    data = with_feature_files(cfg, build_interactions(
        both.drop(columns="part"), source=cfg.data_file, name=Path(cfg.data_file).stem,
        rating_range=(0.0, np.inf)))
    test_pairs = set(zip(both.loc[both.part == 1, "user"], both.loc[both.part == 1, "item"]))
    is_test = np.fromiter(
        ((u, i) in test_pairs for u, i in zip(data.user_ids[data.users],
                                              data.item_ids[data.items])),
        dtype=bool, count=len(data))
    return data, is_test


def load_split(cfg: DataConfig) -> Split:
    """Load, convert feedback, k-core filter and split as configured.

    With ``test-file`` set (dataset csv), the given train/test files are used as they are
    (after feedback conversion); otherwise a per-user temporal split is made. With
    ``validation`` the training part is split again the same way and its held-out part
    takes the place of the test set (for choosing hyperparameters).
    """
    implicit = cfg.feedback == "implicit"
    if cfg.test_file:
        if cfg.dataset != "csv" or not cfg.data_file:
            raise DataError("test-file needs dataset 'csv' with data-file as the train file")
        data, is_test = _load_presplit(cfg)
        keep = (data.ratings >= cfg.threshold) if implicit and cfg.threshold > 0 else None
        if keep is not None:
            data, is_test = data.subset(keep), is_test[keep]
        split = split_by_membership(data, is_test)
    else:
        data = to_feedback(load_dataset(cfg), cfg.feedback, cfg.threshold)
        data = k_core(data, cfg.min_interactions)
        split = temporal_split(data, cfg.split, cfg.test_fraction, cfg.seed)
    if cfg.validation:  # tuning: the test interactions are dropped, never seen
        split = temporal_split(split.train, cfg.split, cfg.test_fraction, cfg.seed)
    elif cfg.negatives_file:
        split.test.negatives = read_negatives(Path(cfg.negatives_file), split.test)
    split.implicit = implicit
    return split


def read_negatives(path: Path, test: Interactions) -> np.ndarray:
    """Fixed evaluation negatives ``[len(test), N]`` from a ``test.negative`` file: one line
    per held-out pair, ``(user,item)`` then N negative item ids (original ids), separated
    by tabs or spaces.

    Raises:
        DataError: naming the file and line (bad syntax, unknown item, a line of another
            length) or a held-out pair the file does not cover.
    """
    if not path.is_file():
        raise DataError(f"{path}: negatives file not found")
    item_index = {str(i): n for n, i in enumerate(test.item_ids)}
    lists: dict[tuple[str, str], list[int]] = {}
    width = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        head, *rest = line.split()
        if not (head.startswith("(") and head.endswith(")") and head.count(",") == 1):
            raise DataError(f"{path}, line {n}: expected '(user,item)' first, got {head!r}")
        user, item = head[1:-1].split(",")
        unknown = [r for r in rest if r not in item_index]
        if unknown:
            raise DataError(f"{path}, line {n}: items {unknown[:3]} are not in the data")
        if width is None:
            width = len(rest)
        if len(rest) != width or width == 0:
            raise DataError(f"{path}, line {n}: {len(rest)} negatives; expected {width} as "
                            "on the first line (and at least one)")
        lists[(user, item)] = [item_index[r] for r in rest]
    out = np.zeros((len(test), width or 0), dtype=np.int64)
    for row, (u, i) in enumerate(zip(test.user_ids[test.users], test.item_ids[test.items])):
        key = (str(u), str(i))
        if key not in lists:
            raise DataError(f"{path}: no negatives for held-out pair ({u},{i})")
        out[row] = lists[key]
    return out
