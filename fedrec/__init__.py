"""fedrec: federated, privacy-preserving recommendation on Flower and Opacus.

The core library (this package) never imports flwr: data, models, the one training
loop, DP-SGD through Opacus, distributed DP, metrics and reports. ``server/`` and
``client/`` adapt it to Flower.

The Python API (``fedrec.api``) is re-exported here and imported on first use, so that
``import fedrec`` and the CLI stay fast: ``make_config``, ``load_data``,
``train_central``, ``run_federated``, ``evaluate_model``, ``recommend_for``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["evaluate_model", "load_data", "make_config", "recommend_for", "run_federated",
           "train_central"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedrec import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedrec' has no attribute {name!r}")
