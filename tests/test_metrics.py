import math

import pytest
import torch

from fedrec.metrics import finalize, merge_counts, ranking_counts, rating_counts

KS = (1, 3)


def _metrics(hits: list[list[bool]], n_rel: list[int]) -> dict[str, float]:
    return finalize(ranking_counts(torch.tensor(hits), torch.tensor(n_rel), KS), KS)


def test_hand_computed_values() -> None:
    # user 0: ranks 1 and 3 relevant, 2 relevant items; user 1: rank 2 relevant, 4 relevant
    m = _metrics([[True, False, True], [False, True, False]], [2, 4])
    assert m["precision@1"] == pytest.approx((1 + 0) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["recall@3"] == pytest.approx((2 / 2 + 1 / 4) / 2)
    assert m["hr@1"] == pytest.approx(0.5)
    assert m["hr@3"] == pytest.approx(1.0)
    d = [1 / math.log2(r + 2) for r in range(3)]
    ndcg0 = (d[0] + d[2]) / (d[0] + d[1])
    ndcg1 = d[1] / (d[0] + d[1] + d[2])
    assert m["ndcg@3"] == pytest.approx((ndcg0 + ndcg1) / 2)


def test_no_hit_is_zero() -> None:
    m = _metrics([[False, False, False]], [3])
    assert all(v == 0.0 for v in m.values())


def test_perfect_ranking_is_one() -> None:
    m = _metrics([[True, True, True]], [3])
    assert m["precision@3"] == m["recall@3"] == m["ndcg@3"] == m["hr@3"] == 1.0
    assert m["ndcg@1"] == 1.0


def test_counts_sum_across_clients() -> None:
    a = ranking_counts(torch.tensor([[True, False, True]]), torch.tensor([2]), KS)
    b = ranking_counts(torch.tensor([[False, True, False]]), torch.tensor([4]), KS)
    both = ranking_counts(torch.tensor([[True, False, True], [False, True, False]]),
                          torch.tensor([2, 4]), KS)
    assert finalize(merge_counts([a, b]), KS) == pytest.approx(finalize(both, KS))


def test_rmse_mae() -> None:
    m = finalize(rating_counts(torch.tensor([3.0, 5.0]), torch.tensor([4.0, 2.0])), KS)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 9) / 2))
    assert m["mae"] == pytest.approx(2.0)


def test_empty_is_nan() -> None:
    assert math.isnan(finalize({}, KS)["recall@3"])
