"""The update-leakage attack, with and without DP, on clients of one user each."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.aggregate import aggregate
from fedrec.attack import auc, bias_direction_auc, membership_auc, row_change
from fedrec.config import RunConfig
from fedrec.federated import cached_split, fit_client, init_shared, item_keys, split_for_users


def test_auc_matches_hand_computed_cases() -> None:
    labels = np.array([True, True, False, False])
    assert auc(np.array([4.0, 3, 2, 1]), labels) == 1.0
    assert auc(np.array([1.0, 2, 3, 4]), labels) == 0.0
    assert auc(np.zeros(4), labels) == 0.5
    assert auc(np.array([3.0, 1, 2, 0]), labels) == 0.75  # pairs: (3>2,3>0,1<2,1>0)
    assert np.isnan(auc(np.zeros(3), np.zeros(3, dtype=bool)))


def _attack(flat: dict) -> tuple[list[float], list[float], list]:
    cfg = RunConfig.from_flat({"synthetic-users": 20, "synthetic-items": 300, "dim": 8,
                               "partition": "cross-device", "rounds": 1, "local-epochs": 1,
                               "optimizer": "sgd", "lr": 0.5, "batch-size": 16, **flat})
    split = cached_split(cfg.data)
    shared = init_shared(cfg, split.n_items)
    keys = item_keys(cfg, split.n_items)
    norm, bias, results = [], [], []
    for u in range(10):
        client = split_for_users(split, np.array([u]))
        res = fit_client(cfg, client, shared, None, seed=u, server_round=1)
        items = np.unique(client.train.items)
        norm.append(membership_auc(shared, res.shared, keys, items, split.n_items))
        bias.append(bias_direction_auc(shared, res.shared, "item_bias.weight", items))
        results.append((client, res, shared, keys))
    return norm, bias, results


def test_without_dp_the_update_reveals_the_clients_items() -> None:
    norm, bias, _ = _attack({"dp": False})
    assert np.mean(bias) > 0.99  # a positive's bias goes up, a negative's goes down
    assert np.mean(norm) > 0.6  # sampled negatives also move, which blurs the norm attack


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_under_record_level_dp_the_norm_attack_is_near_chance(eps: float) -> None:
    norm, bias, _ = _attack({"dp": True, "target-epsilon": eps})
    assert abs(np.mean(norm) - 0.5) <= 0.1, norm
    if eps <= 1.0:
        assert np.mean(bias) <= 0.6, bias


def test_touched_mask_tells_the_server_nothing_the_update_does_not() -> None:
    """Without DP the mask equals 'this row changed', and covers rated + sampled items."""
    _, _, results = _attack({"dp": False})
    for client, res, shared, keys in results:
        changed = sum(row_change(shared[k], res.shared[k]) for k in keys) > 0
        assert res.touched is not None
        np.testing.assert_array_equal(res.touched.astype(bool), changed)
        rated = np.unique(client.train.items)
        assert res.touched[rated].all() and res.touched.sum() > len(rated)


def test_with_dp_no_mask_is_sent_and_every_row_is_averaged() -> None:
    _, _, results = _attack({"dp": True, "target-epsilon": 8.0})
    client, res, shared, keys = results[0]
    assert res.touched is None
    changed = sum(row_change(shared[k], res.shared[k]) for k in keys) > 0
    assert changed.all()  # noise on every row: untouched rows are not distinguishable
    agg = aggregate([], shared, keys)
    assert all(np.array_equal(agg[k], shared[k]) for k in shared)
