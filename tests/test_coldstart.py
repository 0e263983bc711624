"""Cold-start protocols: new items scored from content, users with few ratings."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.baselines import FixedScores
from fedrec.central import run_centralized
from fedrec.coldstart import (
    among_new_items,
    item_cold_start,
    oracle_popularity,
    sliced_metrics,
    user_cold_start,
)
from fedrec.config import RunConfig
from fedrec.data import Split, load_split
from fedrec.evaluate import full_ranking_counts
from fedrec.metrics import finalize

BASE = {"synthetic-users": 150, "synthetic-items": 300, "dim": 8, "mlp-layers": "16,8",
        "epochs": 5, "eval-every": 0, "seed": 1, "dp": False, "lr": 0.01,
        "batch-size": 256, "negatives": 4}


@pytest.fixture(scope="module")
def split() -> Split:
    return load_split(RunConfig.from_flat(BASE).data)


def test_new_items_leave_training_and_only_they_are_ranked(split: Split) -> None:
    cold = item_cold_start(split, 0.2, seed=0)
    assert 0.15 < cold.new_items.mean() <= 0.25
    assert not cold.new_items[cold.train.items].any()
    assert cold.new_items[cold.test.items].all()
    n_new = sum(cold.new_items[d.items].sum() for d in (split.train, split.test))
    assert len(cold.test) == n_new  # every rating of a new item is a test rating
    # warm items scored far above new ones change nothing: only new items are ranked
    oracle = oracle_popularity(cold)
    boosted = np.where(cold.new_items, oracle, 1e9)
    assert among_new_items(FixedScores(boosted), cold, (5,)) == among_new_items(
        FixedScores(oracle), cold, (5,))


def test_content_scores_new_items_an_id_model_cannot(split: Split) -> None:
    """DeepFM trained without the new items ranks them from their genres and decade well
    above chance; MF, which has only (untrained) ids for them, stays near chance."""
    cold = item_cold_start(split, 0.2, seed=0)
    warm = Split(cold.train, split.test.subset(~cold.new_items[split.test.items]), True)
    rng = np.random.default_rng(0)
    chance = np.mean([among_new_items(FixedScores(rng.random(split.n_items)), cold,
                                      (5,))["recall@5"] for _ in range(20)])
    got = {}
    for model, extra in (("mf", {}), ("deepfm", {"id-dropout": 0.5})):
        cfg = RunConfig.from_flat({**BASE, "model": model, **extra}).for_central()
        trained, _, _ = run_centralized(cfg, warm)
        got[model] = among_new_items(trained, cold, (5,))["recall@5"]
    assert got["deepfm"] > 1.5 * chance, (got, chance)
    assert got["mf"] < 1.3 * chance < got["deepfm"], (got, chance)


def test_user_cold_start_slices(split: Split) -> None:
    cut, cold = user_cold_start(split, 0.2, keep=3, seed=0)
    per_user = np.bincount(cut.train.users, minlength=split.n_users)
    before = np.bincount(split.train.users, minlength=split.n_users)
    assert cold.sum() == 30 and (per_user[cold] <= 3).all()
    assert (per_user[~cold] == before[~cold]).all() and len(cut.test) == len(split.test)
    # each cold user keeps their earliest ratings
    u = int(np.flatnonzero(cold)[0])
    kept = np.sort(cut.train.timestamps[cut.train.users == u])
    assert (kept == np.sort(split.train.timestamps[split.train.users == u])[:3]).all()
    pop = FixedScores(np.bincount(cut.train.items, minlength=split.n_items).astype(float))
    sliced = sliced_metrics(pop, cut, cold, (10,))
    whole = finalize(full_ranking_counts(pop, cut.train, cut.test, (10,)), (10,))
    n = {s: sliced[s]["users"] for s in sliced}
    users = len(np.unique(cut.test.users))
    assert n["cold"] == 30 and n["cold"] + n["warm"] == users
    mixed = (sliced["cold"]["recall@10"] * n["cold"] + sliced["warm"]["recall@10"] * n["warm"])
    assert mixed / users == pytest.approx(whole["recall@10"])
