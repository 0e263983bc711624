"""ServerApp: parse the config once, run FedRecStrategy, write the results.

The server holds no user embeddings and no interactions: it initialises and aggregates
the shared parameters only, and turns the clients' summed counts into metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedrec import privacy, report
from fedrec.config import RunConfig
from fedrec.errors import ConfigError
from fedrec.federated import cached_split, catalogue_size, init_shared, item_keys
from fedrec.partition import num_partitions
from fedrec.privacy import UNIT_OF_PRIVACY
from fedrec.state import load_checkpoint, save_checkpoint
from server.grid import StreamingGrid
from server.strategy import FedRecStrategy, to_numpy, to_record

Evaluator = Callable[[dict[str, Any]], dict[str, float]]

log = logging.getLogger("fedrec.server")


def expected_nodes(cfg: RunConfig, grid: Grid | None = None) -> int:
    """How many client nodes the run waits for before round 1."""
    if cfg.fed.partition == "cross-device" or cfg.fed.num_clients:
        split = cached_split(cfg.data)
        return num_partitions(cfg.fed.partition, split.n_users, cfg.fed.num_clients)
    return max(cfg.fed.min_clients, len(list(grid.get_node_ids())) if grid else 0)


def final_metrics(rows: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """metrics.json: the last round's metrics plus privacy and run facts."""
    last = rows[-1] if rows else {}
    out: dict[str, Any] = {k: v for k, v in last.items()
                           if "@" in k or k in ("train-loss",)}
    out["rounds"] = len(rows)
    if cfg.privacy.dp:
        out["epsilon"] = max((r.get("epsilon-max", 0.0) for r in rows), default=0.0)
        out["epsilon_mean"] = last.get("epsilon-mean", 0.0)
    out["delta"] = cfg.privacy.delta if cfg.privacy.dp or cfg.privacy.user_dp else 0.0
    out["dp"] = cfg.privacy.dp
    if cfg.privacy.dp:
        out["unit_of_privacy"] = UNIT_OF_PRIVACY
    if cfg.privacy.user_dp or cfg.privacy.ddp:
        out["user_epsilon"] = max((r.get("user-epsilon", 0.0) for r in rows), default=0.0)
        out["user_unit_of_privacy"] = privacy.USER_UNIT_OF_PRIVACY
        out["delta"] = cfg.privacy.delta
    if cfg.privacy.ddp:
        out["user_dp_noise"] = (f"distributed: Skellam shares under SecAgg+; epsilon holds "
                                f"while at most {cfg.privacy.ddp_dropout:.0%} of the sampled "
                                "clients drop out or collude with the server")
    if cfg.privacy.dp or cfg.privacy.user_dp or cfg.privacy.ddp:
        out["noise_secret"] = privacy.noise_is_secret(cfg.privacy)
        if not out["noise_secret"]:
            out["noise_warning"] = privacy.NOT_SECRET
    out["evaluation"] = last.get("evaluation", "none")
    out["exhausted_clients_last_round"] = last.get("exhausted", 0)
    out["seconds_per_round"] = (sum(r.get("seconds", 0.0) for r in rows) / len(rows)
                                if rows else math.nan)
    return out


def resume_point(cfg: RunConfig, shared: dict[str, Any]
                 ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(rounds done, shared arrays, checkpoint) to resume from ``checkpoint-dir``.

    Raises ConfigError when there is no checkpoint dir or the checkpoint holds another
    model or catalogue than ``shared`` (the initial arrays of this config).
    """
    if not cfg.fed.checkpoint_dir:
        raise ConfigError("resume needs checkpoint-dir")
    ckpt = Path(cfg.fed.checkpoint_dir) / "server.pt"
    saved = load_checkpoint(ckpt)
    if set(saved["shared"]) != set(shared) or any(
            saved["shared"][k].shape != v.shape for k, v in shared.items()):
        raise ConfigError(f"{ckpt}: checkpoint is of another model/catalogue than this "
                          "run's config")
    return saved["round"], saved["shared"], saved


def check_fresh(cfg: RunConfig) -> None:
    """A run never silently replaces an earlier run's results or checkpoint.

    Raises:
        ConfigError: ``out-dir`` holds results, or ``checkpoint-dir`` a checkpoint, and
            neither ``resume`` nor ``overwrite`` is set.
    """
    if cfg.fed.resume or cfg.fed.overwrite:
        return
    out = Path(cfg.fed.out_dir) if cfg.fed.out_dir else None
    if out is not None and (out / "metrics.json").exists():
        raise ConfigError(f"out-dir {out} holds an earlier run's results; set resume=true to "
                          "continue it or overwrite=true to replace them")
    ckpt = Path(cfg.fed.checkpoint_dir) / "server.pt" if cfg.fed.checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        raise ConfigError(f"{ckpt}: an earlier run's checkpoint; set resume=true to continue "
                          "it or overwrite=true to start over")


def wait_for_nodes(grid: Grid, minimum: int = 1, timeout: float = 600.0) -> None:
    """Block until ``minimum`` nodes are connected.

    In simulation the ServerApp starts while Ray is still forking its processes; doing
    heavy (threaded numpy/torch) work in this thread at that moment can deadlock a
    forked child, so the server waits for the first node before it computes anything.
    """
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no client node connected within {timeout:.0f} s")
        time.sleep(0.2)


def run_server(grid: Grid, cfg: RunConfig,
               display: Callable[[str], None] | None = print,
               evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Run all rounds; write ``out-dir`` if set; return the final metrics.

    ``evaluator`` (simulation only) computes the experimenter's metrics of a global model
    when clients do not report evaluation counts (record-level DP without
    ``eval-noise-multiplier``).
    """
    check_fresh(cfg)
    wait_for_nodes(grid)
    n_items = catalogue_size(cfg)
    shared = init_shared(cfg, n_items)
    nodes = expected_nodes(cfg, grid)
    strategy = FedRecStrategy(cfg, item_keys=item_keys(cfg, n_items), num_nodes=nodes,
                              display=display if cfg.fed.verbose else None,
                              evaluator=evaluator)
    ckpt = Path(cfg.fed.checkpoint_dir) / "server.pt" if cfg.fed.checkpoint_dir else None
    user_ledger = ckpt.parent / "user-ledger.json" if ckpt else None
    done = 0
    if cfg.fed.resume:
        done, shared, saved = resume_point(cfg, shared)
        history = saved["user_history"]
        if user_ledger is not None and user_ledger.is_file():  # written at each release
            history = [tuple(h) for h in json.loads(user_ledger.read_text())["history"]]
        strategy.resume_from(done, saved["rows"], saved["server_opt"], history)
        if display:
            display(f"resuming from {ckpt}: {done} of {cfg.fed.rounds} rounds done; DP noise "
                    "is recalibrated for the budget that remains")
    if user_ledger is not None and cfg.privacy.user_dp:
        strategy.on_release = lambda hist: report.write_json_atomic(
            user_ledger, {"unit": privacy.USER_UNIT_OF_PRIVACY, "delta": cfg.privacy.delta,
                          "history": hist})
    if ckpt is not None:
        def checkpoint(round_: int) -> None:
            save_checkpoint(ckpt, round_, strategy.current, strategy.server_opt.state_dict(),
                            strategy.rows, strategy.user_history)
        strategy.on_round_end = checkpoint
    if display and cfg.fed.verbose and cfg.privacy.user_dp:
        display(f"user-level DP-FedAvg (central: the server clips and adds noise): clip "
                f"{cfg.privacy.user_clip:g}, {strategy.expected_clients} clients per round; "
                f"unit: {privacy.USER_UNIT_OF_PRIVACY}")
    if display and (cfg.privacy.dp or cfg.privacy.user_dp) and not privacy.noise_is_secret(
            cfg.privacy):
        display(f"WARNING: {privacy.NOT_SECRET}")
    if display and cfg.fed.verbose and strategy.evaluator is not None:
        display("clients release no evaluation counts under DP (eval-noise-multiplier 0): "
                "metrics are the experimenter's, computed by the simulation")
    if display and cfg.fed.verbose:
        mode = (f"DP-SGD per client, unit of privacy: {UNIT_OF_PRIVACY}, delta "
                f"{cfg.privacy.delta:g}" if cfg.privacy.dp else "no DP")
        display(f"federated {cfg.model.model}: {nodes} clients ({cfg.fed.partition}), "
                f"{n_items} items, {cfg.fed.rounds} rounds, fraction {cfg.fed.fraction}, "
                f"{mode}")
    if done < cfg.fed.rounds:
        strategy.current = shared
        result = strategy.start(grid=grid, initial_arrays=to_record(shared),
                                num_rounds=cfg.fed.rounds - done, train_config=ConfigRecord(),
                                evaluate_config=ConfigRecord(),
                                timeout=cfg.fed.round_timeout, evaluate_fn=strategy.end_round)
        final_arrays = to_numpy(result.arrays)
    else:
        final_arrays = shared
    return write_results(cfg, strategy.rows, final_arrays)


def write_results(cfg: RunConfig, rows: list[dict[str, Any]], final_arrays: dict[str, Any]
                  ) -> dict[str, Any]:
    """Final metrics; with ``out-dir``: config.json, rounds.csv/json, metrics.json and
    shared_model.pt."""
    metrics = final_metrics(rows, cfg)
    if cfg.fed.out_dir:
        out = Path(cfg.fed.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.write_json_atomic(out / "config.json", {**report.run_facts("federated"),
                                                       **cfg.to_flat()})
        writer = report.RowWriter(out)
        for row in rows:
            writer.add_row(row)
        writer.write_rows("rounds")
        k = max(cfg.eval.ks)
        report.plot_curves(rows, "round", [f"recall@{k}", f"ndcg@{k}", "user-epsilon",
                                           "epsilon-max"], out / "rounds.png",
                           f"federated {cfg.model.model}")
        report.write_json_atomic(out / "metrics.json", metrics)
        final = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in final_arrays.items()}
        torch.save(final, out / "shared_model.pt")
    log.info("final metrics: %s", json.dumps(metrics, default=str))
    return metrics


def run_ddp_server(grid: Grid, context: Context, cfg: RunConfig,
                   display: Callable[[str], None] | None = print,
                   evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Distributed user-level DP through SecAgg+ (``server/secagg.py``); same results."""
    from fedrec.federated import shared_order
    from server.secagg import DDPStrategy, run_secagg

    check_fresh(cfg)
    wait_for_nodes(grid)
    n_items = catalogue_size(cfg)
    shared = init_shared(cfg, n_items)
    nodes = expected_nodes(cfg, grid)
    done, saved = 0, None
    if cfg.fed.resume:
        done, shared, saved = resume_point(cfg, shared)
    extra = saved["extra"] if saved else {}
    show = display if cfg.fed.verbose else None
    strategy = DDPStrategy(cfg, shared, shared_order(cfg, n_items), item_keys(cfg, n_items),
                           offset=done, history=[tuple(h) for h in extra.get("ddp", [])],
                           rows=saved["rows"] if saved else None,
                           pending=extra.get("pending"),
                           server_opt=saved["server_opt"] if saved else None,
                           display=show, evaluator=evaluator)
    if cfg.fed.checkpoint_dir:
        ckpt = Path(cfg.fed.checkpoint_dir) / "server.pt"

        def checkpoint(round_: int) -> None:
            save_checkpoint(ckpt, round_, strategy.current, strategy.server_opt.state_dict(),
                            strategy.rows, extra={"ddp": strategy.ddp.history,
                                                  "pending": strategy.pending})
        strategy.on_round_end = checkpoint
    if show:
        show(f"federated {cfg.model.model}: {nodes} clients ({cfg.fed.partition}), "
             f"{n_items} items, {cfg.fed.rounds} rounds; distributed user-level DP: clip "
             f"{cfg.privacy.user_clip:g}, Skellam noise shares summed by SecAgg+, target "
             f"epsilon {cfg.privacy.user_target_epsilon:g} at delta {cfg.privacy.delta:g} "
             f"per {privacy.USER_UNIT_OF_PRIVACY}, holding while at most "
             f"{cfg.privacy.ddp_dropout:.0%} of the clients drop out or collude")
        if not privacy.noise_is_secret(cfg.privacy):
            show(f"WARNING: {privacy.NOT_SECRET}")
    releases = cfg.fed.rounds + 2 - strategy.first_release  # through the final evaluation
    run_secagg(grid, context, strategy, releases, nodes)
    rows = strategy.rows + ([strategy.pending] if strategy.pending else [])
    return write_results(cfg, rows, strategy.current)


def make_server_app(overrides: Mapping[str, Any] | None = None,
                    display: Callable[[str], None] | None = print,
                    evaluator: Callable[[RunConfig], Evaluator] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated by ``overrides``.

    ``evaluator`` (simulation runners only) builds the experimenter's evaluation.
    """
    over = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flat({**context.run_config, **over})
        evaluate = evaluator(cfg) if evaluator else None
        if cfg.privacy.ddp:  # the SecAgg+ protocol variant (legacy workflow)
            run_ddp_server(grid, context, cfg, display, evaluate)
            return
        grid = StreamingGrid(grid)  # replies one at a time; deployment: no 3 s polls
        run_server(grid, cfg, display, evaluate)

    return server_app


app = make_server_app()
