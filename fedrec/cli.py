"""The ``fedrec`` command line.

Every run option comes from the typed config (``fedrec.config``): each field is an
option ``--field-name`` whose help is the field's comment, so ``--help`` always matches
the code. Errors print one line (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from fedrec import __version__
from fedrec.config import SECTIONS, RunConfig
from fedrec.errors import ConfigError, FedrecError

log = logging.getLogger("fedrec")


def _field_help(cls: type) -> dict[str, str]:
    """Field name -> the comment written after it in the dataclass source."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", src, re.M)}


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
            if isinstance(default, bool):
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=f"{text} (default: {default})")
            else:
                group.add_argument(flag, dest=f.name, default=None, metavar="V",
                                   help=f"{text} (default: {default!r})")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from parsed options (only those given override ``base``/defaults)."""
    flat: dict[str, Any] = dict(base or {})
    if getattr(args, "noise_multiplier", None) is not None:
        if getattr(args, "target_epsilon", None) is not None:
            raise ConfigError("give either --noise-multiplier or --target-epsilon, not both")
        flat["target-epsilon"] = 0.0  # an explicit sigma replaces the default target
    for section in SECTIONS:
        for f in fields(SECTIONS[section]):
            value = getattr(args, f.name, None)
            if value is not None:
                flat[f.name.replace("_", "-")] = value
    return RunConfig.from_flat(flat)


def _cmd_centralized(args: argparse.Namespace) -> int:
    from fedrec.commands import centralized

    return centralized(config_from_args(args), Path(args.out), overwrite=args.overwrite,
                       quiet=args.quiet)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from server.simulation import simulate  # Flower is imported only here

    simulate(config_from_args(args), Path(args.out), overwrite=args.overwrite,
             quiet=args.quiet, verbose=args.verbose)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fedrec", description="Federated, privacy-preserving recommendation.")
    parser.add_argument("--version", action="version", version=f"fedrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("centralized", help="train and evaluate one model centrally",
                       description="Train a model centrally on a dataset, evaluate it "
                       "(Precision/Recall/NDCG/HR@K, RMSE for explicit ratings) and write a "
                       "results directory: config.json, metrics.json, epochs.csv/json.")
    p.add_argument("--out", default="runs/centralized", help="results directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    add_config_options(p, ("data", "model", "train", "privacy", "eval"))
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
    add_config_options(s, exclude=("out_dir", "state_dir", "verbose", "checkpoint_dir",
                                         "resume"))
    s.set_defaults(func=_cmd_simulate)

    data = sub.add_parser("data", help="download or inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedrec`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
