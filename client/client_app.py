"""ClientApp: unpack a Message, call fedrec, reply with shared parameters and scalars.

What a reply carries (README, "What leaves a device"): the shared parameters
(``arrays``) and scalar metrics. Under record-level DP the scalars are data-independent
(``num-examples`` 1, epsilon, delta, exhausted); no loss, no timing, no exact count, and
evaluation counts only with accounted noise (``eval-noise-multiplier``). Without DP,
also the example count, the train loss, exact evaluation counts and, with touched
weighting, a 0/1 mask of the item rows trained on (``touched``). Never user embeddings,
user ids or interactions. A failure replies with a fedrec error code only; the details
go to the node's own log.

Deployment: the node's config pins how its private file is parsed and its privacy floor
(``NODE_DATA_KEYS``, ``NODE_PRIVACY_KEYS``); the run config cannot change either.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedrec import ddp, keys
from fedrec.config import DataConfig, RunConfig
from fedrec.errors import ConfigError, PrivacyError, error_code
from fedrec.federated import (
    ClientData,
    ddp_client_round,
    evaluate_client,
    fit_client,
    node_data,
    partition_data,
    release_counts,
    shared_order,
)
from fedrec.privacy import noise_is_secret
from fedrec.state import (
    Ledger,
    global_path,
    ledger_lock,
    ledger_path,
    load_ledger,
    load_state,
    save_global,
    save_ledger,
    save_state,
    state_path,
)

ARRAYS, METRICS, TOUCHED = "arrays", "metrics", "touched"
LEGACY_FIT, SECAGG_CONFIGS = "fitins.parameters", "secaggplus_configs"  # Flower's layouts
log = logging.getLogger("fedrec.client")

# How a node's private file is parsed: node config only (defaults: DataConfig's).
NODE_DATA_KEYS = ("sep", "user-col", "item-col", "rating-col", "time-col", "encoding",
                  "feedback", "threshold")
# A node's privacy floor: dp (required on), target-epsilon / epsilon-cap / delta (maxima).
NODE_PRIVACY_KEYS = ("dp", "target-epsilon", "epsilon-cap", "delta")


def _node_value(node: Mapping[str, Any], key: str) -> Any:
    value = node[key]
    return value.strip('"') if isinstance(value, str) else value


def enforce_node_floor(cfg: RunConfig, node: Mapping[str, Any]) -> None:
    """Refuse a run config that would weaken this node's privacy floor.

    A deployed node never uses reproducible noise. Once a node sets any floor key, the
    floor is whole: DP on (unless the node says ``dp=false``), ``delta`` at most the
    node's (default 1e-5), and a finite epsilon cap (``epsilon-cap``, else the run's
    ``target-epsilon``) no larger than the node's ``epsilon-cap`` or ``target-epsilon``.

    Raises:
        PrivacyError: naming the key, the node's value and the run's.
    """
    p = cfg.privacy
    if not noise_is_secret(p):
        raise PrivacyError("insecure-noise-seed is set: a deployed node never uses "
                           "reproducible DP noise")
    named = {k: _node_value(node, k) for k in NODE_PRIVACY_KEYS if k in node}
    if not named:
        return
    if cfg.model.user_features == "on":
        raise PrivacyError("user-features=on: a node with a privacy floor never lets the run "
                           "config use its users' own features outside distributed DP")
    if cfg.model.context == "on" and not (p.dp or p.ddp):
        raise PrivacyError("context=on: a node with a privacy floor never lets the run "
                           "config use its ratings' times outside record-level or "
                           "distributed DP")
    floor = RunConfig.from_flat({**named, "dp": named.get("dp", True)})
    f = floor.privacy
    if f.dp and not p.dp:
        raise PrivacyError("this node requires dp=true; the run config has dp=false")
    if not p.dp:
        return
    if p.delta > f.delta:
        raise PrivacyError(f"run delta {p.delta:g} exceeds this node's delta {f.delta:g}")
    if "target-epsilon" in named and p.target_epsilon > f.target_epsilon:
        raise PrivacyError(f"run target-epsilon {p.target_epsilon:g} exceeds this node's "
                           f"{f.target_epsilon:g}")
    node_cap = floor.fed.epsilon_cap or (f.target_epsilon if "target-epsilon" in named
                                         else math.inf)
    if not 0 < cfg.epsilon_cap <= node_cap:
        raise PrivacyError(f"run epsilon cap {cfg.epsilon_cap:g} (epsilon-cap, else "
                           f"target-epsilon; 0 = none) is not within this node's cap "
                           f"{node_cap:g}")


def _setup(msg: Message, context: Context, overrides: Mapping[str, Any]) -> tuple[
        RunConfig, ClientData, dict[str, np.ndarray], int]:
    """Config, this node's data, the received shared arrays and the partition id."""
    cfg, data, pid = _node(context, overrides)
    shared = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    return cfg, data, shared, pid


def _node(context: Context, overrides: Mapping[str, Any]) -> tuple[
        RunConfig, ClientData, int]:
    """Config, this node's data and its partition id.

    Deployment: node config ``data-file`` (the node's own ratings), ``catalogue-file``
    (the shared item catalogue), ``state-dir``, the parsing keys ``NODE_DATA_KEYS`` and
    the privacy floor ``NODE_PRIVACY_KEYS``. Simulation: ``partition-id`` and
    ``num-partitions`` select a partition of the configured dataset.
    """
    torch.set_num_threads(1)
    node = context.node_config
    flat = {**context.run_config, **overrides}
    if "state-dir" in node:
        flat["state-dir"] = str(node["state-dir"])
    deployed = "data-file" in node
    if deployed and "state-dir" not in node:
        raise ConfigError("node config has 'data-file' but no 'state-dir': the node, not "
                          "the run, decides where its privacy ledger lives")
    if deployed and not node.get("allow-fault-injection", False):
        flat["fault-rate"] = 0.0  # test switches never act on a real node
    if deployed:  # the node, not the run, decides how its private file is read
        defaults = DataConfig()
        for key in NODE_DATA_KEYS:
            flat[key] = (_node_value(node, key) if key in node
                         else getattr(defaults, key.replace("-", "_")))
    cfg = RunConfig.from_flat(flat)
    pid = int(node.get("partition-id", 0))
    if deployed:
        enforce_node_floor(cfg, node)
        if "catalogue-file" not in node:
            raise ConfigError("node config has 'data-file' but no 'catalogue-file'")
        data = node_data(cfg, str(node["data-file"]), str(node["catalogue-file"]))
    else:
        data = partition_data(cfg, pid, int(node["num-partitions"]))
    return cfg, data, pid


def _guarded(handler: Callable[[Message, Context, Mapping[str, Any]], Message]
             ) -> Callable[[Message, Context, Mapping[str, Any]], Message]:
    """Run a handler; on any exception reply with a fedrec error code, log the details
    (which may quote private data) only on this node."""
    @functools.wraps(handler)
    def run(msg: Message, context: Context,
            overrides: Mapping[str, Any] = {}) -> Message:  # noqa: B006 - read only
        try:
            return handler(msg, context, overrides)
        except Exception as err:  # noqa: BLE001 - every failure becomes a code
            code, name = error_code(err)
            log.error("%s failed (fedrec error %d, %s)", msg.metadata.message_type, code,
                      name, exc_info=True)
            return Message(Error(code=code, reason=f"fedrec client error {code} ({name}); "
                                 "details are in the node's log"), reply_to=msg)
    return run


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


def _no_plain_ddp(cfg: RunConfig) -> None:
    """Under distributed DP a node answers only SecAgg+ rounds: a plain reply would show
    the server its unnoised update or counts (and, with feature models, its users'
    features)."""
    if cfg.privacy.ddp:
        raise PrivacyError("the run says ddp=true: this node trains and evaluates only in "
                           "SecAgg+ rounds, not through plain messages")


@_guarded
def train_handler(msg: Message, context: Context,
                  overrides: Mapping[str, Any] = {}) -> Message:  # noqa: B006 - read only
    """One round of local training."""
    cfg, data, shared, pid = _setup(msg, context, overrides)
    _no_plain_ddp(cfg)
    path = state_path(cfg.fed.state_dir, pid)
    lpath = ledger_path(cfg.fed.state_dir, pid)
    server_round = int(msg.content["config"].get("server-round", 0))
    fault = injected_fault(cfg, pid, server_round)
    act_on_fault(cfg, fault)
    evaluated: dict[str, float] | None = None
    with ledger_lock(lpath):  # read, train, record: one message at a time per node
        ledger = load_ledger(lpath, trained_evidence=path)
        if (cfg.fused_evaluation and server_round > 1
                and int(msg.content["config"].get(keys.EVALUATE_RECEIVED, 0))):
            # the model received is the previous round's global model: evaluate it first,
            # exactly as that round's evaluate message would have (one message per round)
            try:
                evaluated, ledger = _evaluation_counts(cfg, data, shared, pid, path, ledger,
                                                       server_round - 1)
            except PrivacyError as err:  # no release allowed (cap): train all the same
                log.warning("partition %d: no evaluation with this round: %s", pid, err)
            else:
                if ledger is not None:
                    save_ledger(lpath, ledger)
        res = fit_client(cfg, data, shared, load_state(path), ledger,
                         seed=cfg.data.seed + pid, server_round=server_round, state_file=path)
        if res.shared is not None:
            save_ledger(lpath, res.ledger)  # the spend first: a crash never loses it
            save_state(path, res.state)
    # the model as received, kept on the node for on-device recommendations
    save_global(global_path(cfg.fed.state_dir, pid), shared, cfg.to_flat())
    dp = cfg.privacy.dp
    metrics: dict[str, Any] = {
        keys.NUM_EXAMPLES: res.weight,  # 1 under DP: uniform weights
        keys.EPSILON: float(res.epsilon),
        keys.DELTA: cfg.privacy.delta if dp else 0.0,
        keys.EXHAUSTED: int(res.exhausted),
    }
    if not dp:  # data-dependent scalars: only without a DP claim to break
        metrics[keys.TRAIN_LOSS] = float(res.loss) if np.isfinite(res.loss) else 0.0
        metrics[keys.TRAIN_SECONDS] = res.seconds
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if res.shared is not None:
        shared_out = corrupt(res.shared, fault) if fault else res.shared
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in shared_out.items()})
    if res.touched is not None:
        content[TOUCHED] = ArrayRecord({"items": Array(res.touched)})
    if evaluated is not None:
        content[keys.EVALUATION] = MetricRecord(evaluated)
    return Message(content, reply_to=msg)


def _evaluation_counts(cfg: RunConfig, data: ClientData, shared: dict[str, np.ndarray],
                       pid: int, path: Path, ledger: Ledger | None, server_round: int
                       ) -> tuple[dict[str, float], Ledger | None]:
    """The counts this node may send for the global model ``shared`` (noised under DP,
    charged to ``ledger``, which the caller holds locked and saves); and the ledger."""
    if cfg.privacy.dp and cfg.privacy.eval_noise_multiplier <= 0:
        raise PrivacyError("evaluation counts are not released under DP unless "
                           "eval-noise-multiplier > 0")
    counts = evaluate_client(cfg, data, shared, load_state(path), seed=cfg.data.seed + pid,
                             state_file=path)
    if cfg.privacy.dp:
        if ledger is None:
            raise PrivacyError("no privacy ledger yet: a node evaluates after it trained")
        counts, ledger = release_counts(cfg, data, counts, ledger, seed=cfg.data.seed + pid,
                                        server_round=server_round)
        counts[keys.NUM_EXAMPLES] = 1.0
        counts[keys.EPSILON] = ledger.epsilon
    else:
        counts[keys.NUM_EXAMPLES] = counts.get(keys.NUM_USERS, 0.0)
    return counts, ledger


@_guarded
def evaluate_handler(msg: Message, context: Context,
                     overrides: Mapping[str, Any] = {}) -> Message:  # noqa: B006
    """Evaluate the global shared model with this client's user embeddings.

    Under DP the counts leave only with accounted noise (``release_counts``); with
    ``eval-noise-multiplier`` 0 the node refuses to evaluate for the server.
    """
    cfg, data, shared, pid = _setup(msg, context, overrides)
    _no_plain_ddp(cfg)
    server_round = int(msg.content["config"].get("server-round", 0))
    fault = injected_fault(cfg, pid, server_round)
    act_on_fault(cfg, fault if fault in ("raise", "timeout") else None)
    path = state_path(cfg.fed.state_dir, pid)
    lpath = ledger_path(cfg.fed.state_dir, pid)
    with ledger_lock(lpath):
        ledger = load_ledger(lpath, trained_evidence=path) if cfg.privacy.dp else None
        counts, ledger = _evaluation_counts(cfg, data, shared, pid, path, ledger,
                                            server_round)
        if ledger is not None:
            save_ledger(lpath, ledger)
    # the last global model stays on the node, for on-device recommendations
    save_global(global_path(cfg.fed.state_dir, pid), shared, cfg.to_flat())
    return Message(RecordDict({METRICS: MetricRecord(counts)}), reply_to=msg)


class _DDPClient(NumPyClient):
    """Distributed DP: a legacy client whose fit returns its integers (``fedrec.ddp``)
    for ``secaggplus_mod`` to mask."""

    def __init__(self, cfg: RunConfig, data: ClientData, pid: int) -> None:
        self.cfg, self.data, self.pid = cfg, data, pid

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Evaluate the received model, train, encode with a noise share; keep state."""
        cfg, data, pid = self.cfg, self.data, self.pid
        order = shared_order(cfg, data.n_items)
        if len(parameters) != len(order):
            raise ValueError(f"expected {len(order)} shared arrays, got {len(parameters)}")
        shared = dict(zip(order, parameters))
        task = str(config[keys.DDP_TASK])
        if task not in ("prior", "train", "evaluate"):
            raise ValueError(f"unknown distributed-DP task {task!r}")
        sent = data.n_items if task == "prior" else int(sum(a.size for a in parameters))
        plan = ddp.client_plan(cfg, dim=sent + len(ddp.count_keys(cfg)),
                               n_min=int(config[keys.DDP_N_MIN]),
                               mu_client=float(config[keys.DDP_MU_CLIENT]),
                               prior=task == "prior")
        path = state_path(cfg.fed.state_dir, pid)
        lpath = ledger_path(cfg.fed.state_dir, pid)
        server_round = int(config.get("server-round", 0))
        act_on_fault(cfg, injected_fault(cfg, pid, server_round))  # tests: dropouts
        with ledger_lock(lpath):
            rep = ddp_client_round(cfg, data, shared, load_state(path),
                                   load_ledger(lpath, trained_evidence=path), plan,
                                   seed=cfg.data.seed + pid, server_round=server_round,
                                   task=task, state_file=path)
            if rep.ints is None:
                raise PrivacyError("this release would take the node past its epsilon cap")
            save_ledger(lpath, rep.ledger)
            save_state(path, rep.state)
        save_global(global_path(cfg.fed.state_dir, pid), shared, cfg.to_flat())
        return [rep.ints.astype(np.float64)], 1, {}


@_guarded
def ddp_train_handler(msg: Message, context: Context,
                      overrides: Mapping[str, Any] = {}) -> Message:  # noqa: B006
    """A SecAgg+ fit round (legacy FitIns layout) of distributed DP."""
    if SECAGG_CONFIGS not in msg.content.config_records:  # it did not pass secaggplus_mod
        raise PrivacyError("a distributed-DP fit must come as a SecAgg+ round; this one "
                           "has no SecAgg+ stage, so the reply would not be masked")
    cfg, data, pid = _node(context, overrides)
    client = _DDPClient(cfg, data, pid)
    return handle_legacy_message_from_msgtype(lambda _: client.to_client(), msg, context)


def _secagg(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
            ) -> Message:
    """``secaggplus_mod`` on SecAgg+ protocol messages only; a failure is a code."""
    if SECAGG_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    try:
        return secaggplus_mod(msg, context, call_next)
    except Exception as err:  # noqa: BLE001 - every failure becomes a code
        code, name = error_code(err)
        log.error("SecAgg+ stage failed (fedrec error %d, %s)", code, name, exc_info=True)
        return Message(Error(code=code, reason=f"fedrec client error {code} ({name}); "
                             "details are in the node's log"), reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated by ``overrides``.

    Its train handler serves both protocols: Message-API rounds, and SecAgg+ rounds of
    distributed DP (legacy FitIns layout, through ``secaggplus_mod``).
    """
    over = dict(overrides or {})
    client_app = ClientApp()

    @client_app.train(mods=[_secagg])
    def train(msg: Message, context: Context) -> Message:
        if LEGACY_FIT in msg.content.array_records:
            return ddp_train_handler(msg, context, over)
        return train_handler(msg, context, over)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(msg, context, over)

    return client_app


app = make_client_app()
