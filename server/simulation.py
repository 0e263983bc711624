"""``fedrec simulate``: the ServerApp and ClientApp on Flower's simulation engine.

One virtual SuperNode per client partition (Ray backend, one CPU each). The run config
is the same flat mapping ``flwr run`` would pass; results go to a hidden temporary
folder that becomes ``--out`` only when the run has finished.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fedrec.config import RunConfig
from fedrec.errors import FedrecError
from fedrec.federated import cached_split
from fedrec.partition import num_partitions
from fedrec.report import RunDir


def _quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")


def simulate(cfg: RunConfig, out: Path, *, overwrite: bool = False, quiet: bool = False,
             verbose: bool = False) -> dict[str, Any]:
    """Run a federated simulation; return the final metrics (also in ``out``)."""
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
    try:
        flat = cfg.to_flat()
        flat.update({"out-dir": str(run.path), "state-dir": str(run.path / "client-state"),
                     "checkpoint-dir": str(run.path / "checkpoint"), "resume": False,
                     "num-clients": n_nodes if cfg.fed.partition == "cross-silo" else 0,
                     "verbose": not quiet})
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls home
        if not verbose:
            _quiet_flower()
        run_simulation(
            server_app=make_server_app(flat), client_app=make_client_app(flat),
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
        path = run.commit()
    except BaseException:
        run.abort()
        raise
    if not quiet:
        from fedrec.commands import format_table

        shown = {k: v for k, v in metrics.items() if not isinstance(v, bool)}
        print(format_table(shown, f"federated {cfg.model.model}, {n_nodes} clients, "
                                  f"{metrics['rounds']} rounds"))
        print(f"results: {path}")
    return metrics
