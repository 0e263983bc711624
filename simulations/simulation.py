"""``fedrec simulate``: the ServerApp and ClientApp on Flower's simulation engine.

One virtual SuperNode per client partition (Ray backend, one CPU each). The run config
is the same flat mapping ``flwr run`` would pass; results go to a hidden temporary
folder that becomes ``--out`` only when the run has finished. The server checkpoint and
the clients' state live in ``.<out>.work`` next to ``--out`` while the run is going, so
a run that was killed or interrupted continues with ``resume=True`` (``--resume``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from fedrec.config import RUN_MANAGED_KEYS, RunConfig, changed_keys
from fedrec.errors import ConfigError, FedrecError
from fedrec.federated import cached_split
from fedrec.partition import num_partitions
from fedrec.report import RunDir, write_json_atomic


class _DropKnown(logging.Filter):
    """Flower's notices that say nothing about this run."""

    KNOWN = ("DEPRECATED FEATURE", "This is a deprecated feature",
             "fraction_evaluate is set to 0.0")  # fedrec asks for no evaluation under DP

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a known notice."""
        text = record.getMessage()
        return not any(k in text for k in self.KNOWN)


def _quiet_flower() -> None:
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    flwr_log.propagate = False  # Flower has its own handler: no second copy via root
    for handler in flwr_log.handlers:
        handler.addFilter(_DropKnown())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")


# run-config keys a resumed run may change (the rest must match the interrupted run)
RESUMABLE_CHANGES = ("rounds",)


def work_dir(out: Path) -> Path:
    """Where a running simulation keeps its server checkpoint and client state."""
    return out.parent / f".{out.name}.work"


def resume_hint(out: Path) -> str:
    """One line: what an interrupted run of ``out`` kept and how to continue it."""
    ckpt = work_dir(out) / "checkpoint" / "server.pt"
    if not ckpt.is_file():
        return "no round had finished, nothing to resume: run again (with --overwrite)"
    from fedrec.state import load_checkpoint

    done = load_checkpoint(ckpt)["round"]
    return (f"{done} round(s) are checkpointed in {work_dir(out)}; continue with the same "
            "command and --resume")


def _prepare_work(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create, reuse (``resume``) or refuse the work directory of ``out``."""
    work = work_dir(out)
    skip = RESUMABLE_CHANGES + RUN_MANAGED_KEYS
    saved_cfg = work / "config.json"
    if resume:
        if not (work / "checkpoint" / "server.pt").is_file() or not saved_cfg.is_file():
            raise FedrecError(f"{out}: nothing to resume (no checkpoint in {work}); run "
                              "without --resume")
        changed = changed_keys(json.loads(saved_cfg.read_text()), cfg, ignore=skip)
        if changed:
            raise ConfigError(f"{out}: --resume with other settings than the interrupted run "
                              f"({', '.join(changed)}); only {', '.join(RESUMABLE_CHANGES)} "
                              "may change")
        return
    if work.exists():
        if not overwrite:
            raise FedrecError(f"{out}: an interrupted run left {work}; pass --resume to "
                              "continue it, or --overwrite to start over")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json_atomic(saved_cfg, {k: v for k, v in cfg.to_flat().items() if k not in skip})


def simulate(cfg: RunConfig, out: Path, *, overwrite: bool = False, quiet: bool = False,
             verbose: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run a federated simulation; return the final metrics (also in ``out``).

    ``resume`` continues an interrupted run of the same ``out`` from its last server
    checkpoint (clients keep their state and privacy spend).
    """
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app

    split = cached_split(cfg.data)
    n_nodes = num_partitions(cfg.fed.partition, split.n_users, cfg.fed.num_clients)
    if not quiet:
        print(split.train.summary())
        if split.train.synthetic:
            print("note: this is synthetic data; pass --dataset/--data-dir for real data")
    run = RunDir(out, overwrite=overwrite)
    work = work_dir(out)
    try:
        _prepare_work(cfg, out, resume=resume, overwrite=overwrite)
        flat = cfg.to_flat()
        flat.update({"out-dir": str(run.path), "state-dir": str(work / "client-state"),
                     "checkpoint-dir": str(work / "checkpoint"), "resume": resume,
                     "num-clients": n_nodes if cfg.fed.partition == "cross-silo" else 0,
                     "verbose": not quiet})
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls home
        if not verbose:
            _quiet_flower()
        from fedrec.federated import ExperimenterEvaluation

        run_simulation(
            server_app=make_server_app(flat, evaluator=ExperimenterEvaluation),
            client_app=make_client_app(flat),
            num_supernodes=n_nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"logging_level": "ERROR", "log_to_driver": verbose,
                                          "include_dashboard": False}},
            verbose_logging=verbose)
        metrics_file = run.path / "metrics.json"
        if not metrics_file.exists():
            raise FedrecError("the simulation ended without results; rerun with --verbose "
                              "to see Flower's log")
        metrics = json.loads(metrics_file.read_text())
        for name in ("client-state", "checkpoint"):
            if (work / name).exists():
                os.replace(work / name, run.path / name)
        path = run.commit()
        shutil.rmtree(work)
    except BaseException:
        run.abort()
        if (work / "checkpoint" / "server.pt").is_file() and not quiet:
            print(f"interrupted: {resume_hint(out)}")
        raise
    if not quiet:
        _summary(cfg, metrics, n_nodes, path, "")
    return metrics


def simulate_inprocess(cfg: RunConfig, out: Path, *, overwrite: bool = False,
                       quiet: bool = False) -> dict[str, Any]:
    """``fedrec simulate --engine batched``: the same rounds in this process.

    ``fedrec.inprocess`` runs the clients (the batched engine where it applies, else one
    ``fit_client`` after another) and the server's aggregation without Flower's messaging;
    metrics are the experimenter's exact counts. Writes what the Flower path writes
    (config.json, rounds.csv/json, metrics.json, shared_model.pt); no ``--resume``.
    """
    from fedrec.batched import unsupported
    from fedrec.inprocess import run_inprocess
    from server.server_app import write_results
    from server.strategy import format_round

    split = cached_split(cfg.data)
    n_nodes = num_partitions(cfg.fed.partition, split.n_users, cfg.fed.num_clients)
    why = unsupported(cfg)
    if not quiet:
        print(split.train.summary())
        if split.train.synthetic:
            print("note: this is synthetic data; pass --dataset/--data-dir for real data")
        print(f"engine: in process, {n_nodes} clients "
              + (f"one after another ({why})" if why else "trained side by side (batched)"))
    run = RunDir(out, overwrite=overwrite)
    try:
        def show(row: dict[str, Any]) -> None:
            row["evaluation"] = "experimenter (in process)"
            if not quiet:
                print(format_round(row, cfg), flush=True)

        shared, rows = run_inprocess(cfg, on_round=show)
        metrics = write_results(cfg.replace(**{"out-dir": str(run.path)}), rows, shared)
        path = run.commit()
    except BaseException:
        run.abort()
        raise
    if not quiet:
        _summary(cfg, metrics, n_nodes, path, " (in process)")
    return metrics


def _summary(cfg: RunConfig, metrics: dict[str, Any], n_nodes: int, path: Path,
             note: str) -> None:
    """The final table and where the results are."""
    from fedrec.commands import format_table

    shown = {k: v for k, v in metrics.items() if not isinstance(v, bool)}
    print(format_table(shown, f"federated {cfg.model.model}, {n_nodes} clients, "
                              f"{metrics['rounds']} rounds{note}"))
    print(f"results: {path}")
