import numpy as np
import pytest
import torch

from fedrec.data.interactions import Interactions
from fedrec.evaluate import evaluate_counts, full_ranking_counts
from fedrec.metrics import finalize


class FixedScores:
    """A stand-in scorer with a fixed score matrix (not a mock of fedrec code)."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores
        self.n_items = scores.shape[1]

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores[users].clone()


def _inter(users: list[int], items: list[int], n_users: int, n_items: int) -> Interactions:
    n = len(users)
    return Interactions(np.array(users), np.array(items), np.ones(n, np.float32),
                        np.arange(n, dtype=float), np.arange(n_users).astype(object),
                        np.arange(n_items).astype(object), [""] * n_items, [""] * n_items,
                        (1, 5), "t")


def test_train_items_are_excluded_from_the_ranking() -> None:
    # user 0 trained on item 0 (top score); test item 1 must then rank first
    scores = torch.tensor([[9.0, 5.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    train = _inter([0, 1], [0, 3], 2, 4)
    test = _inter([0, 1], [1, 0], 2, 4)
    m = finalize(full_ranking_counts(FixedScores(scores), train, test, (1, 3)), (1, 3))
    # user 0: hit at rank 1; user 1: ranking (3 excluded) 2, 1, 0 -> item 0 at rank 3
    assert m["hr@1"] == 0.5 and m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx((1.0 + 1 / np.log2(4)) / 2)


def test_sampled_protocol_on_a_real_model(tiny_split) -> None:
    from fedrec.config import ModelConfig
    from fedrec.model import build_model

    model = build_model(ModelConfig(model="mf", dim=4), tiny_split.n_users, tiny_split.n_items)
    c = evaluate_counts(model, tiny_split.train, tiny_split.test, ks=(10,), implicit=True,
                        eval_negatives=20, seed=0)
    m = finalize(c, (10,))
    assert 0 <= m["hr@10"] <= 1 and m["recall@10"] == m["hr@10"]
    assert c["num-users"] == len(set(tiny_split.test.users.tolist()))
