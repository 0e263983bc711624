"""The ``fedrec`` command line.

Every run option comes from the typed config (``fedrec.config``): each field is an
option ``--field-name`` whose help is the field's comment, so ``--help`` always matches
the code. Errors print one line (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, NoReturn

from fedrec import __version__
from fedrec.config import (
    ACCOUNTANTS,
    DATASETS,
    FAULT_KINDS,
    MODELS,
    OBJECTIVES,
    RUN_MANAGED_KEYS,
    SECTIONS,
    RunConfig,
)
from fedrec.errors import ConfigError, FedrecError

log = logging.getLogger("fedrec")

# Keys a simulation/sweep sets itself (per run directory), so they are not options there.
RUN_MANAGED = tuple(k.replace("-", "_") for k in RUN_MANAGED_KEYS)


def _field_help(cls: type) -> dict[str, str]:
    """Field name -> the comment written after it in the dataclass source."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", src, re.M)}


# Fixed choices of string options (the config checks them too; argparse shows them).
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS, "model": MODELS, "objective": OBJECTIVES, "accountant": ACCOUNTANTS,
    "fault_kind": FAULT_KINDS, "feedback": ("implicit", "explicit"),
    "split": ("fraction", "leave-last-out", "random"),
    "negative_sampling": ("auto", "unseen", "uniform"), "optimizer": ("adam", "sgd"),
    "device": ("auto", "cpu", "cuda"), "grad_sample_mode": ("ghost", "hooks"),
    "partition": ("cross-device", "cross-silo"),
    "item_weighting": ("auto", "touched", "uniform"), "server_opt": ("avg", "adam"),
    "aggregation": ("mean", "median", "trimmed-mean", "krum"),
    "user_features": ("auto", "on", "off"), "item_text": ("off", "on"),
    "context": ("off", "auto", "on"),
}
PATHS = ("data_dir", "data_file", "test_file")
# Testing switches: accepted, but left out of the user help.
HIDDEN = ("fault_rate", "fault_kind")
# Options a federated run does not use (it has local-epochs; it evaluates every round;
# num-items is for deployments without the dataset on the server).
NOT_FEDERATED = ("epochs", "eval_every", "num_items")
# Federated-only privacy options, meaningless for centralized training.
FEDERATED_PRIVACY = ("user_dp", "user_target_epsilon", "user_noise_multiplier", "user_clip",
                     "ddp", "ddp_dropout", "ddp_bits", "ddp_prior", "ddp_prior_weight",
                     "eval_clip", "eval_noise_multiplier")


def _metavar(name: str, default: Any) -> str:
    if name in PATHS:
        return "PATH"
    if isinstance(default, int):
        return "N"
    if isinstance(default, float):
        return "X"
    return "TEXT"


def add_config_options(parser: argparse.ArgumentParser,
                       sections: Sequence[str] = tuple(SECTIONS),
                       exclude: Sequence[str] = ()) -> None:
    """One option per config field, grouped by section, defaults shown."""
    for section in sections:
        cls = SECTIONS[section]
        helps = _field_help(cls)
        group = parser.add_argument_group(f"{section} options")
        for f in fields(cls):
            if f.name in exclude:
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            text = helps.get(f.name, "")
            shown = argparse.SUPPRESS if f.name in HIDDEN else None
            if isinstance(default, bool):
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None,
                                   help=shown or f"{text} (default: {default})")
            elif f.name in CHOICES:
                group.add_argument(flag, dest=f.name, default=None, choices=CHOICES[f.name],
                                   help=shown or f"{text} (default: {default})")
            else:
                group.add_argument(flag, dest=f.name, default=None,
                                   metavar=_metavar(f.name, default),
                                   help=shown or f"{text} (default: {default!r})")


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--epsilon`` is not ``--epsilon-cap``); unknown options get a
    "did you mean" from the options this command has."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser=self)  # the innermost command's parser reports errors

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        """Add close matches to "unrecognized arguments"."""
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=")[0], known, n=3,
                                                      cutoff=0.6)
                    if close:
                        hints.append(f"{word}: did you mean {' or '.join(close)}?")
            if hints:
                message += "\n" + "\n".join(hints)
        super().error(message)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from parsed options (only those given override ``--config``, ``base`` and
    the defaults)."""
    flat: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        from fedrec.config import read_config_file

        flat.update(read_config_file(args.config))
    if getattr(args, "noise_multiplier", None) is not None:
        if getattr(args, "target_epsilon", None) is not None:
            raise ConfigError("give either --noise-multiplier or --target-epsilon, not both")
        flat["target-epsilon"] = 0.0  # an explicit sigma replaces the default target
    if getattr(args, "ddp", None) and getattr(args, "dp", None) is None:
        flat["dp"] = False  # distributed DP replaces record-level DP unless asked for both
    for section in SECTIONS:
        for f in fields(SECTIONS[section]):
            value = getattr(args, f.name, None)
            if value is not None:
                flat[f.name.replace("_", "-")] = value
    return RunConfig.from_flat(flat)


def _cmd_centralized(args: argparse.Namespace) -> int:
    from fedrec.commands import centralized

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    return centralized(config_from_args(args), Path(args.out), overwrite=args.overwrite,
                       quiet=args.quiet)


SUPERVISED = "FEDREC_SUPERVISED"  # the supervisor's pid, set in the child it starts


def _die_with_supervisor(supervisor: int, poll: float = 0.2) -> None:
    """In the supervised child: if the supervisor dies (even by SIGKILL, which it cannot
    forward), kill this child's whole process group (the server and Ray's workers), so a
    killed ``fedrec simulate`` never leaves a run going on in the background."""
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(poll)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    if os.getppid() != supervisor:  # already orphaned before the watch began
        watch()
    threading.Thread(target=watch, name="fedrec-supervisor-watch", daemon=True).start()


def _cmd_simulate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad options fail here, before anything starts
    if args.engine == "batched":
        if args.resume:
            raise ConfigError("--resume: runs of --engine batched do not checkpoint; rerun "
                              "them, or use --engine flower")
        from simulations.simulation import simulate_inprocess

        simulate_inprocess(cfg, Path(args.out), overwrite=args.overwrite, quiet=args.quiet)
        return 0
    supervisor = os.environ.get(SUPERVISED, "")
    if not supervisor.isdigit():
        return _supervise(args._argv, Path(args.out))
    _die_with_supervisor(int(supervisor))
    from simulations.simulation import simulate  # Flower is imported only here

    simulate(cfg, Path(args.out), overwrite=args.overwrite, quiet=args.quiet,
             verbose=args.verbose, resume=args.resume)
    return 0


def _supervise(argv: Sequence[str], out: Path) -> int:
    """Run the simulation in a child process group; Ctrl-C or SIGTERM stops all of it.

    Flower's simulation engine (Ray) ignores Ctrl-C in its driver and prints pages of
    tracebacks on SIGTERM. The child runs in its own session, so a terminal's SIGINT
    reaches only this process, which then kills the child's whole group (the server and
    Ray's workers), removes the unfinished results folder, keeps the checkpoint and client
    state that ``--resume`` needs, and prints one line. If this process is killed
    outright, the child notices and kills its own group (``_die_with_supervisor``).
    """
    import signal
    import subprocess
    import time

    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen([sys.executable, "-m", "fedrec", *argv],
                                 env={**os.environ, SUPERVISED: str(os.getpid())},
                                 start_new_session=True)
        while child.poll() is None and not stop:
            time.sleep(0.1)
        if not stop:
            return int(child.returncode)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    from simulations.simulation import resume_hint

    print(f"\nfedrec: stopped by {signal.Signals(stop[0]).name}; {resume_hint(out)}",
          file=sys.stderr)
    return 130


def _cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import default_jobs, parse_epsilons, privacy_sweep

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: {args.seeds!r} is not a comma list of integers") from None
    if args.jobs < 0:
        raise ConfigError(f"--jobs: expected an integer >= 0 (0: one per CPU core), got "
                          f"{args.jobs}")
    # SIGTERM stops a sweep as Ctrl-C does (its worker processes with it)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        privacy_sweep(config_from_args(args), Path(args.out),
                      modes=[m.strip() for m in args.modes.split(",") if m.strip()],
                      epsilons=parse_epsilons(args.epsilons), seeds=seeds,
                      attack_clients=args.attack_clients, quiet=args.quiet,
                      jobs=args.jobs or default_jobs())
    except KeyboardInterrupt:
        print(f"fedrec: interrupted; finished points are in {Path(args.out) / 'points.csv'}:"
              " run the same command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cmd_download(args: argparse.Namespace) -> int:
    from fedrec.data.download import GROUPLENS_URL, download_dataset

    base = args.base_url or GROUPLENS_URL
    path = download_dataset(args.name, Path(args.root), base_url=base, progress=not args.quiet)
    print(f"downloaded {args.name} to {path}\nuse it with: --dataset {args.name} "
          f"--data-dir {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from fedrec.data import load_split

    cfg = config_from_args(args)
    split = load_split(cfg.data)
    print(split.train.summary())
    print(f"split ({cfg.data.split}): {len(split.train):,} train, {len(split.test):,} test "
          f"interactions; {len(set(split.test.users.tolist())):,} test users")
    dropped = {k: v for k, v in split.train.cleaning.items() if v}
    print(f"cleaning dropped: {dropped or 'nothing'}")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from fedrec.federated import node_data, partition_data
    from fedrec.partition import num_partitions
    from fedrec.recommend import recommend
    from fedrec.state import find_partition, global_path, load_global, load_state, state_path

    if args.partition is None:  # which node/partition holds this user
        args.partition = find_partition(args.state_dir, str(args.user))
    shared, flat = load_global(global_path(args.state_dir, args.partition))
    cfg = RunConfig.from_flat(flat)
    if args.data_file:
        if not args.catalogue_file:
            raise ConfigError("--data-file needs --catalogue-file (the shared item catalogue)")
        data = node_data(cfg, args.data_file, args.catalogue_file)
    else:
        from fedrec.federated import cached_split

        n = num_partitions(cfg.fed.partition, cached_split(cfg.data).n_users,
                           cfg.fed.num_clients)
        data = partition_data(cfg, int(args.partition), n)
    path = state_path(args.state_dir, args.partition)
    state = load_state(path)
    if state is None:
        raise ConfigError(f"{path}: no client state; train this node first")
    recs = recommend(cfg, data, state, shared, str(args.user), k=args.k, at=args.at)
    print(f"top {len(recs)} for user {args.user} (on this device; the server has no user "
          "embeddings):")
    for rank, r in enumerate(recs, 1):
        why = r.explanation()
        print(f"{rank:>3}. {r.title}  [item {r.item}, score {r.score:.3f}]"
              + (f"\n     {why}" if why else ""))
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from fedrec.state import ledger_path, load_ledger, reset_ledger, state_path

    if args.ledger_command == "reset":
        path = reset_ledger(args.state_dir, args.partition, args.reason)
        print(f"{path}: new, empty privacy ledger; the reset is recorded in it and in "
              f"{path.with_suffix('.log')}")
        return 0
    path = ledger_path(args.state_dir, args.partition)
    ledger = load_ledger(path, trained_evidence=state_path(args.state_dir, args.partition))
    if ledger is None:
        print(f"{path}: no ledger (this node has not trained)")
        return 0
    print(f"{path}:\n  epsilon {ledger.epsilon:.4f} at delta {ledger.delta:g}, unit: "
          f"{ledger.unit or '-'}\n  rounds trained {ledger.rounds}, noised evaluations "
          f"{ledger.evaluations}, accountant entries {len(ledger.history)}, resets "
          f"{len(ledger.resets)}")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    import os
    import shlex

    from fedrec import deploy

    act = args.deploy_command
    if act == "certs":
        files = deploy.make_certificates(Path(args.dir), hosts=args.host or
                                         ["localhost", "127.0.0.1"])
        for i in range(args.nodes):
            files += deploy.make_node_key(Path(args.dir), f"supernode-{i}")
        print("written:\n  " + "\n  ".join(str(f) for f in files))
        print("keep ca.key and the node private keys secret; copy supernode-<i> and ca.crt "
              "to client machine i, and register supernode-<i>.pub with the SuperLink")
        print(f"next, on the server: fedrec deploy superlink --dir {args.dir}")
        return 0
    if act == "federation":
        path = deploy.write_federation(Path(args.flwr_home or os.environ.get(
            "FLWR_HOME", Path.home() / ".flwr")), args.name, args.address,
            Path(args.dir) / "ca.crt")
        print(f"federation {args.name!r} -> {args.address} written to {path}")
        print(f"next, for each node key: flwr supernode register {args.dir}/supernode-0.pub "
              f"{args.name}")
        return 0
    if act == "split-data":
        paths = deploy.split_data(config_from_args(args).data, args.nodes, Path(args.out))
        print("written:\n  " + "\n  ".join(str(p) for p in paths))
        n_items = deploy.catalogue_size(paths[0])
        print(f"the catalogue has {n_items} items: flwr run needs num-items={n_items}")
        return 0
    if act == "gateway":
        if not re.fullmatch(r"[^\s:/]+:\d{1,5}", args.upstream):
            raise ConfigError(f"--upstream: expected HOST:PORT (e.g. 127.0.0.1:8000), got "
                              f"{args.upstream!r}")
        cmd = deploy.gateway_command(Path(args.dir), args.upstream, args.host, args.port)
    elif act == "superlink":
        cmd = deploy.superlink_command(Path(args.dir), host=args.control_host,
                                       port=args.control_port, database=args.database)
    else:
        node: dict[str, object] = {}
        if args.require_dp:
            node["dp"] = True
        for name in ("target_epsilon", "epsilon_cap", "delta", "sep", "user_col", "item_col",
                     "rating_col", "time_col", "feedback"):
            value = getattr(args, name)
            if value is not None:
                node[name.replace("_", "-")] = value
        cmd = deploy.supernode_command(
            Path(args.dir), Path(args.key), args.superlink, data_file=Path(args.data_file),
            catalogue=Path(args.catalogue_file), state_dir=Path(args.state_dir),
            partition_id=args.partition, port=args.port, node=node,
            trusted_entities=Path(args.trusted_entities) if args.trusted_entities else None)
    gateway = act == "superlink" and not args.no_gateway
    upstream = ""
    if act == "superlink":  # where the gateway reaches the SuperLink (a wildcard: loopback)
        near = args.control_host if args.control_host not in ("0.0.0.0", "::") else "127.0.0.1"
        upstream = f"{near}:{args.control_port}"
    print(shlex.join(cmd), flush=True)
    if gateway:
        print(shlex.join(deploy.gateway_command(Path(args.dir), upstream, args.host,
                                                args.port)), flush=True)
    if args.print_only:
        return 0
    need = [Path(args.dir) / "ca.crt"]
    if act in ("superlink", "gateway"):
        need += [Path(args.dir) / "server.pem", Path(args.dir) / "server.key"]
    else:
        need += [Path(args.key), Path(args.data_file), Path(args.catalogue_file)]
        if args.trusted_entities:
            need.append(Path(args.trusted_entities))
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not found (run 'fedrec deploy certs' / "
                          "'fedrec deploy split-data', or check the paths)")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if act == "supernode":
        n_items = deploy.catalogue_size(Path(args.catalogue_file))
        print(f"next, on the server: flwr run . <federation> --run-config \"num-items={n_items} "
              "min-clients=<nodes> out-dir='<results dir>'\"", flush=True)
    if act == "gateway":
        from fedrec.gateway import serve

        serve(args.upstream, Path(args.dir), args.host, args.port)
        return 0
    if act == "superlink":
        if args.control_host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: the Control API listens on {args.control_host}: whoever reaches "
                  "it can register node keys and submit runs (Flower 1.42 does not "
                  "authenticate it)", file=sys.stderr, flush=True)
        if gateway:
            return deploy.run_superlink_with_gateway(cmd, Path(args.dir), upstream,
                                                     args.host, args.port)
    os.execvp(cmd[0], cmd)  # replaces this process: stop it with Ctrl-C or its PID


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(
        prog="fedrec", description="Federated, privacy-preserving recommendation.")
    parser.add_argument("--version", action="version", version=f"fedrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("centralized", help="train and evaluate one model centrally",
                       description="Train a model centrally on a dataset, evaluate it "
                       "(Precision/Recall/NDCG/HR@K, RMSE for explicit ratings) and write a "
                       "results directory: config.json, metrics.json, epochs.csv/json.")
    p.add_argument("--out", default="runs/centralized", help="results directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch threads (0: torch's default; 1 keeps a shared machine fast)")
    p.add_argument("--config", metavar="PATH", default=None,
                   help="a TOML file of config keys, or a results dir (its config.json) to "
                        "rerun; options given here override it")
    add_config_options(p, ("data", "model", "train", "privacy", "eval"),
                       exclude=FEDERATED_PRIVACY)
    p.set_defaults(func=_cmd_centralized)

    s = sub.add_parser("simulate", help="federated training on Flower's simulation engine",
                       description="Run the ServerApp and ClientApps on Flower's simulation "
                       "engine: clients keep user embeddings locally, train with Opacus "
                       "DP-SGD (unless --no-dp) and send shared parameters only. Prints one "
                       "line per round and writes config.json, rounds.csv/json, "
                       "metrics.json and shared_model.pt to --out.")
    s.add_argument("--out", default="runs/simulate", help="results directory")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--quiet", action="store_true", help="no per-round display")
    s.add_argument("--config", metavar="PATH", default=None,
                   help="a TOML file of config keys, or a results dir (its config.json) to "
                        "rerun; options given here override it")
    s.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted run of this --out from its last "
                        "server checkpoint (same options; --rounds may grow)")
    s.add_argument("--engine", choices=["flower", "batched"], default="flower",
                   help="flower: the ServerApp and ClientApps on Flower's simulation engine "
                        "(what flwr run deploys); batched: the same rounds in this process, "
                        "clients trained side by side (no DP, user-level DP, record-level "
                        "DP for MF with SGD clients), for experiments (default: flower)")
    add_config_options(s, exclude=RUN_MANAGED + NOT_FEDERATED)
    s.set_defaults(func=_cmd_simulate)

    ps = sub.add_parser("privacy-sweep", help="federated runs over epsilon x seeds x DP modes",
                        description="Run the federated rounds in process for every DP "
                        "mode (none; record: DP-SGD on each client, unit one rating; user: "
                        "server-side DP-FedAvg, unit one client's data; both; distributed: "
                        "noise shares under secure aggregation, unit one client's data) x "
                        "target epsilon x seed, several points side by side (--jobs). "
                        "Writes points.csv (resumable: finished points are not rerun), "
                        "summary.md/json with the leakage-attack AUC, and "
                        "privacy_utility.png.")
    ps.add_argument("--out", default="runs/privacy-sweep", help="sweep directory (resumable)")
    ps.add_argument("--epsilons", default="0.5,1,2,4,8,inf", help="target epsilons")
    ps.add_argument("--seeds", default="0,1,2", help="seeds (error bars)")
    ps.add_argument("--modes", default="none,record,user,both", help="DP modes")
    ps.add_argument("--attack-clients", type=int, default=20,
                    help="clients whose uploads the leakage attack inspects per point")
    ps.add_argument("--jobs", type=int, default=0, metavar="N",
                    help="points run side by side, each in its own process with one torch "
                         "thread (default 0: one per CPU core, at most 8)")
    ps.add_argument("--quiet", action="store_true", help="no progress lines")
    ps.add_argument("--config", metavar="PATH", default=None,
                   help="a TOML file of config keys, or a results dir (its config.json) to "
                        "rerun; options given here override it")
    add_config_options(ps, exclude=(*RUN_MANAGED, *NOT_FEDERATED, "dp", "user_dp", "ddp",
                                    "seed"))
    ps.set_defaults(func=_cmd_sweep)

    data = sub.add_parser("data", help="download or inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION",
                               parser_class=_Parser)
    d = dsub.add_parser("download", help="fetch a GroupLens MovieLens zip and verify it",
                        formatter_class=fmt)
    d.add_argument("name", choices=["ml-100k", "ml-1m", "ml-latest-small"],
                   help="dataset to download")
    d.add_argument("--root", default="data", help="folder that receives NAME/")
    d.add_argument("--base-url", default=None,
                   help="where the zips are served (default: files.grouplens.org)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_download)
    i = dsub.add_parser("info", help="load, clean and split a dataset; print statistics")
    add_config_options(i, ("data",))
    i.set_defaults(func=_cmd_info)

    r = sub.add_parser("recommend", help="top-K items for one of this node's users",
                       description="On a client node: recommend unseen items to one of its "
                       "users with the node's user embedding and the last global shared "
                       "model, each with a 'because you liked' explanation. The server "
                       "cannot do this: user embeddings never leave the node.",
                       formatter_class=fmt)
    r.add_argument("--user", required=True, help="original user id (as in the data file)")
    r.add_argument("--state-dir", required=True,
                   help="the node's state dir (simulation: RUN/client-state)")
    r.add_argument("--partition", default=None,
                   help="partition / node id (default: the one whose state holds --user)")
    r.add_argument("-k", type=int, default=10, help="how many items")
    r.add_argument("--at", type=float, default=None, metavar="UNIX_SECONDS",
                   help="the moment to recommend for, for a model that reads context "
                        "(unset: now)")
    r.add_argument("--data-file", default="", help="deployment: the node's ratings file")
    r.add_argument("--catalogue-file", default="", help="deployment: the item catalogue")
    r.set_defaults(func=_cmd_recommend)

    led = sub.add_parser("ledger", help="show or deliberately reset a node's privacy ledger",
                         description="A node's privacy ledger (STATE_DIR/ledger-P.json) "
                         "holds everything its epsilon is computed from. It is never reset "
                         "silently: 'reset' is the explicit, logged operator action.")
    lsub = led.add_subparsers(dest="ledger_command", required=True, metavar="ACTION",
                              parser_class=_Parser)
    for name, text in (("show", "print a node's epsilon and history size"),
                       ("reset", "start a new ledger (the old one is kept aside; logged)")):
        lp = lsub.add_parser(name, help=text)
        lp.add_argument("--state-dir", required=True, help="the node's state dir")
        lp.add_argument("--partition", default="0", help="partition / node id")
        if name == "reset":
            lp.add_argument("--reason", required=True, help="why (recorded in the ledger)")
        lp.set_defaults(func=_cmd_ledger)

    dep = sub.add_parser("deploy", help="certificates, keys and commands for a deployment",
                         description="Helpers for a SuperLink + SuperNodes deployment with "
                         "TLS and node authentication; see docs/DEPLOY.md.")
    dsub2 = dep.add_subparsers(dest="deploy_command", required=True, metavar="ACTION",
                               parser_class=_Parser)
    c = dsub2.add_parser("certs", help="dev CA, server certificate, SuperNode key pairs",
                         formatter_class=fmt)
    c.add_argument("--dir", default="deploy/certs", help="output folder")
    c.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    c.add_argument("--host", action="append", help="server name/IP for the certificate "
                   "(repeatable; default localhost and 127.0.0.1)")
    c.set_defaults(func=_cmd_deploy)
    f = dsub2.add_parser("federation", help="add the SuperLink to $FLWR_HOME/config.toml",
                         formatter_class=fmt)
    f.add_argument("--name", default="fedrec", help="federation name for flwr run")
    f.add_argument("--address", default="localhost:8000", help="SuperLink address")
    f.add_argument("--dir", default="deploy/certs", help="folder with ca.crt")
    f.add_argument("--flwr-home", default="", help="default: $FLWR_HOME or ~/.flwr")
    f.set_defaults(func=_cmd_deploy)
    sl = dsub2.add_parser(
        "superlink", formatter_class=fmt,
        help="start flower-superlink (TLS + node auth) on loopback and the Fleet gateway",
        description="Starts flower-superlink with TLS and node authentication, listening on "
        "loopback only (its Control API, which Flower 1.42 does not authenticate, stays on "
        "this machine), and the fedrec Fleet gateway on --host:--port, which forwards only "
        "what SuperNodes call. Run 'flwr' here or through an SSH tunnel.")
    sl.add_argument("--dir", default="deploy/certs", help="folder with the certificates")
    sl.add_argument("--host", default="0.0.0.0",
                    help="interface the Fleet gateway listens on (SuperNodes connect here)")
    sl.add_argument("--port", type=int, default=9092, help="the Fleet gateway's HTTPS port")
    sl.add_argument("--control-host", default="127.0.0.1",
                    help="interface of the SuperLink itself (Control, Fleet and Runtime "
                         "APIs): keep it on loopback")
    sl.add_argument("--control-port", type=int, default=8000,
                    help="the SuperLink's HTTPS port (flwr run / flwr supernode register)")
    sl.add_argument("--no-gateway", action="store_true",
                    help="start the SuperLink only (no SuperNode on another machine can "
                         "connect unless you expose it some other way)")
    sl.add_argument("--database", default="deploy/superlink.db",
                    help="the SuperLink's state file (registered nodes, runs): a restart "
                         "keeps them; ':flwr-in-memory:' forgets them")
    sl.add_argument("--print-only", action="store_true", help="print the command only")
    sl.set_defaults(func=_cmd_deploy)
    gw = dsub2.add_parser("gateway", formatter_class=fmt,
                          help="the Fleet gateway alone (deploy superlink starts it)")
    gw.add_argument("--dir", default="deploy/certs", help="folder with the certificates")
    gw.add_argument("--upstream", default="127.0.0.1:8000", help="the SuperLink's address")
    gw.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    gw.add_argument("--port", type=int, default=9092, help="HTTPS port")
    gw.add_argument("--print-only", action="store_true", help="print the command only")
    gw.set_defaults(func=_cmd_deploy)
    sn = dsub2.add_parser("supernode", help="start flower-supernode for this machine",
                          formatter_class=fmt)
    sn.add_argument("--dir", default="deploy/certs", help="folder with ca.crt")
    sn.add_argument("--key", required=True, help="this node's private key")
    sn.add_argument("--superlink", default="localhost:9092",
                    help="the SuperLink's Fleet gateway address")
    sn.add_argument("--trusted-entities", default="",
                    help="YAML of Ed25519 keys: run only apps signed by one of them "
                         "(Flower Hub signatures; an unsigned local 'flwr run' is refused)")
    sn.add_argument("--data-file", required=True, help="this node's ratings file")
    sn.add_argument("--catalogue-file", required=True, help="the shared item catalogue")
    sn.add_argument("--state-dir", required=True, help="user embeddings + accountant")
    sn.add_argument("--partition", type=int, default=0, help="node id used in file names")
    sn.add_argument("--port", type=int, default=9094, help="local ClientApp API port")
    floor = sn.add_argument_group(
        "privacy floor (node-owned: a run config that would weaken it is refused)")
    floor.add_argument("--require-dp", action="store_true",
                       help="refuse runs without record-level DP")
    floor.add_argument("--target-epsilon", type=float, default=None,
                       help="the largest target epsilon (per rating) this node accepts")
    floor.add_argument("--epsilon-cap", type=float, default=None,
                       help="this node never trains past this epsilon (default: its target)")
    floor.add_argument("--delta", type=float, default=None, help="the largest delta accepted")
    parse = sn.add_argument_group(
        "how this node's file is parsed (node-owned; defaults: comma-separated with columns "
        "user,item,rating,timestamp, implicit feedback)")
    parse.add_argument("--sep", default=None, help="field separator")
    for col in ("user", "item", "rating", "time"):
        parse.add_argument(f"--{col}-col", default=None, help=f"{col} column name")
    parse.add_argument("--feedback", choices=["implicit", "explicit"], default=None,
                       help="implicit (ranking) or explicit (rating regression)")
    sn.add_argument("--print-only", action="store_true", help="print the command only")
    sn.set_defaults(func=_cmd_deploy)
    sd = dsub2.add_parser("split-data", help="cut a dataset into per-node files (trials)")
    sd.add_argument("--nodes", type=int, default=2)
    sd.add_argument("--out", default="deploy/data", help="output folder")
    add_config_options(sd, ("data",))
    sd.set_defaults(func=_cmd_deploy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedrec`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FedrecError as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fedrec: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
