"""Side features as hashed value ids: item genres and release decade, user demographics.

A feature value is a string ``"field=value"`` (``"genre=Drama"``, ``"decade=1990"``,
``"occupation=writer"``). Each is hashed (CRC-32, stable across processes and machines)
into ``[1, buckets)``; 0 marks an empty slot. Hashing needs no shared vocabulary, so a
client can encode its own users' features without learning anyone else's, and the
embedding tables of values have a fixed, public size.

Privacy split: the value ids of an item come from the public catalogue; the value ids of
a user are that user's personal data and stay on the client (a model holds them in a
non-persistent buffer, never in a state dict). The embedding tables of values are shared
weights. Which rows of the user-value tables a client's update moves names its users'
values, so a federated client uses its users' features only where that is protected:
under distributed DP (``uses_user_features``; docs/PRIVACY.md).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.config import FEATURE_MODELS, RunConfig
from fedrec.data.interactions import Interactions

ITEM_SLOTS = 12  # value slots per item at most: genres and fields, then the decade
USER_SLOTS = 8  # value slots per user at most (ML-100K: age group, gender, occupation, zip)
log = logging.getLogger(__name__)
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_WARNED: set[object] = set()  # warnings already logged (once a run)


def item_values(title: str, genres: str) -> list[str]:
    """An item's feature values: its genres (entries already ``"field=value"``, from a
    feature file, kept as they are) and its release decade (from a title that ends in
    ``(YYYY)``, as MovieLens and MovieTweetings titles do)."""
    parts = [g.strip() for g in genres.split("|")]
    out = [g if "=" in g else f"genre={g}" for g in parts
           if g and g != "(no genres listed)"]
    year = _YEAR.search(title.strip())
    if year:
        out.append(f"decade={int(year.group(1)) // 10 * 10}")
    return out


def user_values(features: str) -> list[str]:
    """A user's feature values from ``"field=value|field=value"``."""
    return [f.strip() for f in features.split("|") if "=" in f]


def hash_value(value: str, buckets: int) -> int:
    """A value's id in ``[1, buckets)`` (stable CRC-32 hashing; 0 is the empty slot)."""
    return 1 + zlib.crc32(value.encode("utf-8")) % (buckets - 1)


def hash_rows(rows: Sequence[Sequence[str]], slots: int, buckets: int) -> np.ndarray:
    """``[len(rows), slots]`` value ids, rows truncated to ``slots`` (logged) and padded
    with 0."""
    over = sum(len(r) > slots for r in rows)
    if over and (over, len(rows), slots) not in _WARNED:  # once a run, not every round
        _WARNED.add((over, len(rows), slots))
        log.warning("%d of %d rows have more than %d feature values; their values past "
                    "the first %d are left out", over, len(rows), slots, slots)
    out = np.zeros((len(rows), slots), dtype=np.int64)
    for i, row in enumerate(rows):
        ids = [hash_value(v, buckets) for v in row[:slots]]
        out[i, :len(ids)] = ids
    return out


@dataclass
class Features:
    """Value ids the feature models look up: ``items [n_items, <= ITEM_SLOTS]`` (public,
    from the catalogue; as many slots as its richest item needs) and ``users [n_users,
    USER_SLOTS]`` (the client's own users)."""

    items: torch.Tensor
    users: torch.Tensor
    text: torch.Tensor | None = None  # [n_items, TEXT_DIM] title vectors (item-text=on)
    # context=on/auto: each item's release year ([n_items], 0 unknown) and whether the
    # model reads each rating's context (``uses_context``)
    years: torch.Tensor | None = None
    context: bool = False


# item value ids and release years per catalogue (titles and genres lists), kept with
# the lists themselves so that an id() is never reused while cached
_ITEM_CACHE: dict[tuple[int, int, int],
                  tuple[list[str], list[str], torch.Tensor, torch.Tensor]] = {}


def _catalogue(titles: list[str], genres: list[str], buckets: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The catalogue's item value ids and release years (computed once per catalogue:
    every client of every round asks for them)."""
    key = (id(titles), id(genres), buckets)
    hit = _ITEM_CACHE.get(key)
    if hit is not None and hit[0] is titles and hit[1] is genres:
        return hit[2], hit[3]
    rows = [item_values(t, g) for t, g in zip(titles, genres)]
    # as many slots as the catalogue's richest item needs (fewer lookups per score)
    slots = min(ITEM_SLOTS, max([len(r) for r in rows] + [1]))
    ids = torch.from_numpy(hash_rows(rows, slots, buckets))
    years = torch.from_numpy(release_years(titles))
    if len(_ITEM_CACHE) >= 4:
        _ITEM_CACHE.pop(next(iter(_ITEM_CACHE)))
    _ITEM_CACHE[key] = (titles, genres, ids, years)
    return ids, years


def features_of(data: Interactions, buckets: int, *, users: bool = True,
                text: bool = False) -> Features:
    """The value ids of ``data``'s items (its whole catalogue) and, with ``users``, of its
    users (else every user slot empty); with ``text``, its titles' vectors
    (``fedrec.text``)."""
    if users and data.user_features:
        rows = [user_values(f) for f in data.user_features]
        # as many slots as the richest user needs (the same width for every user)
        user_ids = hash_rows(rows, min(USER_SLOTS, max([len(r) for r in rows] + [1])),
                             buckets)
    else:
        user_ids = np.zeros((data.n_users, 1), np.int64)
    users_t = torch.from_numpy(user_ids)
    vectors = None
    if text:
        from fedrec.text import title_vectors  # the optional extra, loaded when asked for

        vectors = torch.from_numpy(np.array(title_vectors(data.titles)))
    ids, years = _catalogue(data.titles, data.genres, buckets)
    return Features(ids, users_t, vectors, years)


def release_years(titles: Sequence[str]) -> np.ndarray:
    """Each item's release year from a title ending in ``(YYYY)`` (0: unknown)."""
    years = [_YEAR.search(t.strip()) for t in titles]
    return np.array([int(y.group(1)) if y else 0 for y in years], dtype=np.int64)


def collisions(values: Sequence[str], buckets: int) -> list[tuple[str, str]]:
    """Pairs of distinct values that share a hashed id (for reports and checks)."""
    seen: dict[int, str] = {}
    out = []
    for v in sorted(set(values)):
        h = hash_value(v, buckets)
        if h in seen:
            out.append((seen[h], v))
        else:
            seen[h] = v
    return out


def uses_user_features(cfg: RunConfig) -> bool:
    """Whether a feature model reads the users' own features (``user-features``; "auto":
    under distributed DP, and in non-private centralized runs)."""
    if cfg.model.user_features != "auto":
        return cfg.model.user_features == "on"
    return cfg.privacy.ddp or (cfg.central and not cfg.privacy.dp)


def model_features(cfg: RunConfig, data: Interactions) -> Features | None:
    """``features_of(data)`` for a model that reads features (users' own features only
    where ``uses_user_features``, ratings' context only where ``uses_context``), else
    None."""
    if cfg.model.model not in FEATURE_MODELS:
        return None
    out = features_of(data, cfg.model.feature_buckets, users=uses_user_features(cfg),
                      text=cfg.model.item_text == "on")
    out.context = uses_context(cfg)
    if cfg.model.context == "auto" and not out.context and "context" not in _WARNED:
        _WARNED.add("context")  # once a run: the context tables stay untrained
        log.warning("context=auto: the ratings' context is not read in this run (a "
                    "non-private or user-level-DP reply would show the server when its "
                    "users rate); record-level or distributed DP reads it")
    return out


# Context of a rating (``context``): the hour of day and day of week of its timestamp
# (Unix seconds, UTC), and the item's age then (years since its release year). Each is a
# row of a small shared table (``CONTEXT_ROWS``; row 0: empty), no hashing needed.
HOUR_ROW, WEEKDAY_ROW = 1, 25  # rows 1-24: hour 0-23; rows 25-31: Monday-Sunday
AGE_EDGES = (1, 2, 4, 8, 16, 32)  # years since release: [0, 1), [1, 2), ..., [32, inf)
AGE_ROW = 32  # rows 32-38: the age buckets
CONTEXT_ROWS = AGE_ROW + len(AGE_EDGES) + 1
CONTEXT_COLUMNS = 3  # after the user id: hour row, weekday row, year
TIME_RANGE = (100_000_000, 4_102_444_800)  # Unix seconds read as moments: 1973 to 2100


def uses_context(cfg: RunConfig) -> bool:
    """Whether a feature model reads each rating's context (``context``; "auto": where
    the unit of privacy covers it or nothing is promised: centralized runs, record-level
    DP, whose unit is one rating with its time, and distributed DP; not in non-private
    federated rounds or under user-level DP with the server's noise, where the rows an
    update moves would show the server the hours and days its user rates at)."""
    if cfg.model.context != "auto":
        return cfg.model.context == "on"
    p = cfg.privacy
    return cfg.central or p.dp or p.ddp


def context_columns(timestamps: np.ndarray) -> np.ndarray:
    """``[n, CONTEXT_COLUMNS]`` per rating: its hour row, weekday row and calendar year
    (UTC), each a function of that rating's own timestamp only (so one rating's removal
    changes no other example: what record-level DP needs). A time outside ``TIME_RANGE``
    (not Unix seconds: row numbers of a file without a time column, milliseconds, NaN)
    gives that rating an empty context (all 0), logged once."""
    t = np.asarray(timestamps, dtype=np.float64)
    ok = np.isfinite(t) & (t >= TIME_RANGE[0]) & (t <= TIME_RANGE[1])
    if not ok.all() and ("times", int((~ok).sum()), len(t)) not in _WARNED:
        _WARNED.add(("times", int((~ok).sum()), len(t)))
        log.warning("context: %d of %d timestamps are not Unix seconds between %d and %d "
                    "(milliseconds? no time column?); those ratings get no context",
                    int((~ok).sum()), len(t), *TIME_RANGE)
    t = np.where(ok, t, 0.0).astype(np.int64)
    days = t // 86400
    hour = (t % 86400) // 3600
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    year = t.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    out = np.stack([HOUR_ROW + hour, WEEKDAY_ROW + weekday, year], axis=1)
    out[~ok] = 0
    return out


def with_context(users: np.ndarray, timestamps: np.ndarray) -> torch.Tensor:
    """A context model's input ``[n, 1 + CONTEXT_COLUMNS]``: each user id with the
    context of the moment given (a rating's time, or the time a list is served)."""
    return torch.from_numpy(np.concatenate(
        [np.asarray(users, dtype=np.int64)[:, None], context_columns(timestamps)], axis=1))


def serving_times(users: np.ndarray, test: Interactions) -> np.ndarray:
    """The moment each of ``users`` is served a full ranking in evaluation: its first
    held-out rating's time (when it came back)."""
    first = np.full(test.n_users, np.inf)
    np.minimum.at(first, test.users, test.timestamps.astype(np.float64))
    out = first[np.asarray(users, dtype=np.int64)]
    return np.where(np.isfinite(out), out, 0.0)


def example_context(cfg: RunConfig, train: Interactions) -> np.ndarray | None:
    """The context columns of ``train``'s ratings for a model that reads them, else None."""
    if cfg.model.model not in FEATURE_MODELS or not uses_context(cfg):
        return None
    return context_columns(train.timestamps)
