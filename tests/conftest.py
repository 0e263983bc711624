"""Tiny fixtures: small synthetic data and a fast configuration."""

from __future__ import annotations

import os

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # tests never use the network

from fedrec.config import RunConfig
from fedrec.data import Split, load_split


@pytest.fixture(scope="session")
def tiny_cfg() -> RunConfig:
    """A fast config on a small generated dataset."""
    return RunConfig.from_flat({
        "synthetic-users": 60, "synthetic-items": 80, "dim": 8, "mlp-layers": "16,8",
        "epochs": 2, "batch-size": 64, "eval-every": 0, "seed": 1,
    })


@pytest.fixture(scope="session")
def tiny_split(tiny_cfg: RunConfig) -> Split:
    """Train/test split of the tiny dataset."""
    return load_split(tiny_cfg.data)
