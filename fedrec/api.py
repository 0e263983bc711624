"""The Python API: a few functions for notebooks and scripts (re-exported by ``fedrec``).

>>> import fedrec
>>> cfg = fedrec.make_config(synthetic_users=40, synthetic_items=60, epochs=2, dp=False)
>>> split = fedrec.load_data(cfg)
>>> model, metrics = fedrec.train_central(cfg, split)
>>> 0.0 <= metrics["recall@20"] <= 1.0
True

Federated runs here go through ``fedrec.inprocess`` (the Flower apps' arithmetic in one
process, tested equal to a Flower simulation); ``fedrec simulate`` and
``simulations.simulation.simulate`` run the real Flower apps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedrec.config import RunConfig
from fedrec.data import Split, load_split
from fedrec.model import RecModel


def make_config(base: RunConfig | None = None, **options: Any) -> RunConfig:
    """A run configuration: every option of the CLI, as keyword arguments
    (``noise_multiplier=1.2`` or ``**{"noise-multiplier": 1.2}``); unknown names raise
    ConfigError listing the valid ones."""
    flat = base.to_flat() if base is not None else {}
    flat.update({k.replace("_", "-"): v for k, v in options.items()})
    return RunConfig.from_flat(flat)


def load_data(cfg: RunConfig) -> Split:
    """Load, clean and split the configured dataset (train/test ``Interactions``)."""
    return load_split(cfg.data)


def train_central(cfg: RunConfig, split: Split | None = None
                  ) -> tuple[RecModel, dict[str, float]]:
    """Train centrally (DP-SGD when ``dp``); returns (model, final metrics)."""
    from fedrec.central import run_centralized

    model, metrics, _ = run_centralized(cfg, split if split is not None else load_data(cfg))
    return model, metrics


def run_federated(cfg: RunConfig) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Federated rounds over every partition of the configured data, in process; returns
    (the final shared parameters, one row of metrics per round)."""
    from fedrec.inprocess import run_inprocess

    return run_inprocess(cfg)


def evaluate_model(cfg: RunConfig, model: RecModel, split: Split) -> dict[str, float]:
    """Precision/Recall/NDCG/HR@K (and RMSE/MAE for explicit data) on ``split.test``."""
    from fedrec.evaluate import evaluate_counts
    from fedrec.metrics import finalize

    counts = evaluate_counts(model, split.train, split.test, ks=cfg.eval.ks,
                             implicit=split.implicit, eval_negatives=cfg.data.eval_negatives,
                             seed=cfg.data.seed)
    return finalize(counts, cfg.eval.ks)


def recommend_for(cfg: RunConfig, model: RecModel, split: Split, user: str, k: int = 10
                  ) -> list[Any]:
    """Top-``k`` unseen items for an original user id of a centrally trained model, with
    "because you liked" explanations from the user's highly rated items."""
    from fedrec.federated import split_for_users
    from fedrec.recommend import recommend
    from fedrec.state import ClientState

    ids = [str(u) for u in split.train.user_ids]
    if user not in ids:
        raise KeyError(f"user {user!r} is not in the data")
    uid = ids.index(user)
    data = split_for_users(split, np.array([uid]))
    local = {k: v[uid:uid + 1] for k, v in model.local_state_dict().items()}
    shared = {k: v for k, v in model.state_dict().items() if k not in local}
    return recommend(cfg.for_central(), data, ClientState(local=local, user_ids=[user]),
                     {k: torch.as_tensor(v) for k, v in shared.items()}, user, k=k)
