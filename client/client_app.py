"""ClientApp: unpack a Message, call fedrec, reply with shared parameters and scalars.

What a reply carries: the shared parameters (``arrays``), scalar metrics, and, without
DP and with touched weighting only, a 0/1 mask of the item rows trained on
(``touched``). Never user embeddings, user ids or interactions: those stay in the
node's state directory and data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec import keys
from fedrec.config import RunConfig
from fedrec.errors import ConfigError
from fedrec.federated import (
    ClientData,
    evaluate_client,
    fit_client,
    node_data,
    partition_data,
)
from fedrec.state import global_path, load_state, save_global, save_state, state_path

ARRAYS, METRICS, TOUCHED = "arrays", "metrics", "touched"


def _setup(msg: Message, context: Context, overrides: Mapping[str, Any]) -> tuple[
        RunConfig, ClientData, dict[str, np.ndarray], int]:
    """Config, this node's data, the received shared arrays and the partition id.

    Deployment: node config ``data-file`` (the node's own ratings), ``catalogue-file``
    (the shared item catalogue) and ``state-dir``. Simulation: ``partition-id`` and
    ``num-partitions`` select a partition of the configured dataset.
    """
    torch.set_num_threads(1)
    node = context.node_config
    flat = {**context.run_config, **overrides}
    if "state-dir" in node:
        flat["state-dir"] = str(node["state-dir"])
    cfg = RunConfig.from_flat(flat)
    pid = int(node.get("partition-id", 0))
    if "data-file" in node:
        if "catalogue-file" not in node:
            raise ConfigError("node config has 'data-file' but no 'catalogue-file'")
        data = node_data(cfg, str(node["data-file"]), str(node["catalogue-file"]))
    else:
        data = partition_data(cfg, pid, int(node["num-partitions"]))
    shared = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    return cfg, data, shared, pid


BAD_KINDS = ("raise", "nan", "inf", "shape", "keys", "dtype", "norm")


def injected_fault(cfg: RunConfig, pid: int, server_round: int) -> str | None:
    """Testing only (``fault-rate`` > 0): the fault this client injects this round.

    Every k-th client misbehaves each round, k = round(1 / fault-rate), rotating with the
    round; ``mixed`` cycles through every kind.
    """
    if cfg.fed.fault_rate <= 0:
        return None
    k = max(1, round(1 / cfg.fed.fault_rate))
    if (pid + server_round + cfg.data.seed) % k:
        return None
    if cfg.fed.fault_kind == "mixed":
        return BAD_KINDS[(3 * server_round + pid) % len(BAD_KINDS)]
    return cfg.fed.fault_kind


def act_on_fault(cfg: RunConfig, fault: str | None) -> None:
    """Raise for ``raise``; for ``timeout`` reply (with an error) only after the deadline."""
    if fault == "timeout":
        time.sleep(cfg.fed.round_timeout + 5.0)
        raise RuntimeError(f"injected timeout: replied after round-timeout "
                           f"{cfg.fed.round_timeout:g} s")
    if fault == "raise":
        raise RuntimeError(f"injected fault (fault-rate {cfg.fed.fault_rate})")


def corrupt(arrays: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """A bad update of the given kind (for fault-injection tests)."""
    out = {k: v.copy() for k, v in arrays.items()}
    key = next(iter(out))
    if kind == "nan":
        out[key].flat[0] = np.nan
    elif kind == "inf":
        out[key].flat[0] = np.inf
    elif kind == "shape":
        out[key] = out[key][:-1]
    elif kind == "keys":
        out[key + ".bogus"] = out.pop(key)
    elif kind == "dtype":
        out[key] = out[key].astype(np.float64)
    elif kind == "norm":
        out[key] = out[key] * 1e6
    return out


def train_handler(msg: Message, context: Context,
                  overrides: Mapping[str, Any] = {}) -> Message:  # noqa: B006 - read only
    """One round of local training."""
    cfg, data, shared, pid = _setup(msg, context, overrides)
    path = state_path(cfg.fed.state_dir, pid)
    server_round = int(msg.content["config"].get("server-round", 0))
    fault = injected_fault(cfg, pid, server_round)
    act_on_fault(cfg, fault)
    res = fit_client(cfg, data, shared, load_state(path), seed=cfg.data.seed + pid,
                     server_round=server_round, state_file=path)
    if res.shared is not None:
        save_state(path, res.state)
    content = RecordDict({METRICS: MetricRecord({
        keys.NUM_EXAMPLES: res.num_examples,
        keys.TRAIN_LOSS: float(res.loss) if np.isfinite(res.loss) else 0.0,
        keys.EPSILON: float(res.epsilon),
        keys.DELTA: cfg.privacy.delta if cfg.privacy.dp else 0.0,
        keys.EXHAUSTED: int(res.exhausted),
        keys.TRAIN_SECONDS: res.seconds,
    })})
    if res.shared is not None:
        shared_out = corrupt(res.shared, fault) if fault else res.shared
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in shared_out.items()})
    if res.touched is not None:
        content[TOUCHED] = ArrayRecord({"items": Array(res.touched)})
    return Message(content, reply_to=msg)


def evaluate_handler(msg: Message, context: Context,
                     overrides: Mapping[str, Any] = {}) -> Message:  # noqa: B006
    """Evaluate the global shared model with this client's user embeddings."""
    cfg, data, shared, pid = _setup(msg, context, overrides)
    fault = injected_fault(cfg, pid, int(msg.content["config"].get("server-round", 0)))
    act_on_fault(cfg, fault if fault in ("raise", "timeout") else None)
    path = state_path(cfg.fed.state_dir, pid)
    counts = evaluate_client(cfg, data, shared, load_state(path), seed=cfg.data.seed + pid,
                             state_file=path)
    # the last global model stays on the node, for on-device recommendations
    save_global(global_path(cfg.fed.state_dir, pid), shared, cfg.to_flat())
    counts[keys.NUM_EXAMPLES] = counts.get(keys.NUM_USERS, 0.0)
    return Message(RecordDict({METRICS: MetricRecord(counts)}), reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated by ``overrides``."""
    over = dict(overrides or {})
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_handler(msg, context, over)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(msg, context, over)

    return client_app


app = make_client_app()
