"""What a user gets without tuning: fedrec's defaults on ML-100K, with the ratios the
defaults promise, measured side by side in one run.

Every fedrec run here passes no hyperparameter: only the dataset, the setting
(centralized, cross-silo 10 clients, cross-device one client per user) and the DP mode.
The defaults (``fedrec.config.RECIPES``) were chosen with ``simulations/tune.py`` on a
validation split carved from training; this script measures them on the test split.

    pip install -e ".[bench]"   # implicit, for the ALS reference
    python simulations/benchmark_defaults.py --data-dir ../shared/datasets/ml-100k \\
        --out results/benchmark_defaults.json

The implicit ALS reference is tuned like fedrec's defaults: its factors, regularization
and alpha are chosen on the same validation split (``ALS_GRID``), then measured once on
the test split; the JSON also keeps ALS at the fixed setting earlier runs used.

Writes ``central_over_als``, ``federated_over_central`` (cross-silo and cross-device),
``dp8_over_nonprivate`` (centralized and cross-silo) and the epsilon = 1 results. DP runs
draw their noise from OS entropy and differ from run to run: each is repeated
``--dp-repeats`` times (default 3); ratios use the mean, ``recall@20_runs`` keeps every run
and ``recall@20_std`` their standard deviation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedrec.central import run_centralized  # noqa: E402
from fedrec.config import RunConfig  # noqa: E402
from fedrec.data import load_split  # noqa: E402
from fedrec.inprocess import run_inprocess  # noqa: E402
from fedrec.report import write_json_atomic  # noqa: E402


def central(flat: dict[str, Any]) -> float:
    """Recall@20 of ``fedrec centralized`` with these keys only."""
    cfg = RunConfig.from_flat(flat).for_central()
    _, metrics, _ = run_centralized(cfg, load_split(cfg.data))
    return float(metrics["recall@20"])


def federated(flat: dict[str, Any]) -> float:
    """Recall@20 after the default rounds (in process, equal to a Flower simulation)."""
    _, rows = run_inprocess(RunConfig.from_flat(flat))
    return float(rows[-1]["recall@20"])


ALS_GRID = {"factors": (32, 64, 128), "regularization": (0.01, 0.1, 1.0),
            "alpha": (1.0, 2.0, 5.0, 10.0, 20.0)}


def tuned_als(data: dict[str, Any]) -> dict[str, Any]:
    """implicit ALS with its settings chosen on the validation split (``ALS_GRID``), as
    fedrec's defaults are, then measured on the test split; and at the fixed setting
    earlier benchmarks used (``ALS_FIXED``, chosen on the test split)."""
    import itertools

    from benchmark_central import ALS_FIXED, run_implicit_peer

    val = load_split(RunConfig.from_flat({**data, "validation": True}).data)
    test = load_split(RunConfig.from_flat(data).data)
    scored = []
    for combo in itertools.product(*ALS_GRID.values()):
        params = dict(zip(ALS_GRID, combo))
        scored.append((run_implicit_peer(val, "als", 0, params)["recall@20"], params))
    best_val, best = max(scored, key=lambda s: s[0])
    return {"params": best, "validation_recall@20": best_val,
            "recall@20": run_implicit_peer(test, "als", 0, best)["recall@20"],
            "fixed_params": ALS_FIXED,
            "fixed_recall@20": run_implicit_peer(test, "als", 0)["recall@20"]}


def main() -> None:
    """Run every default and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="MovieLens 100K folder")
    ap.add_argument("--out", default="results/benchmark_defaults.json")
    ap.add_argument("--skip-cross-device", action="store_true",
                    help="leave out the 943-client runs (the slowest)")
    ap.add_argument("--dp-repeats", type=int, default=3,
                    help="runs per DP setting (their noise differs; the mean is reported)")
    ap.add_argument("--runs", default="",
                    help="only these runs (comma list, e.g. 'central'; default: all)")
    args = ap.parse_args()
    data = {"dataset": "ml-100k", "data-dir": args.data_dir}
    silo = {**data, "partition": "cross-silo", "num-clients": 10}
    device = {**data, "partition": "cross-device"}
    runs: dict[str, tuple[Any, dict[str, Any]]] = {
        "central": (central, {**data, "dp": False}),
        "central_dp8": (central, {**data, "dp": True, "target-epsilon": 8.0}),
        "central_dp1": (central, {**data, "dp": True, "target-epsilon": 1.0}),
        "cross_silo": (federated, {**silo, "dp": False}),
        "cross_silo_dp8": (federated, {**silo, "dp": True, "target-epsilon": 8.0}),
        "cross_silo_dp1": (federated, {**silo, "dp": True, "target-epsilon": 1.0}),
    }
    if not args.skip_cross_device:
        runs["cross_device"] = (federated, {**device, "dp": False})
    if args.runs:
        wanted = args.runs.split(",")
        unknown = sorted(set(wanted) - set(runs))
        if unknown:
            raise SystemExit(f"--runs: unknown {unknown}; expected some of {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in wanted}
    result: dict[str, Any] = {"recall@20": {}, "recall@20_runs": {}, "recall@20_std": {},
                              "seconds": {}, "dp_repeats": args.dp_repeats}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (fn, flat) in runs.items():
            t0 = time.perf_counter()
            repeats = args.dp_repeats if flat["dp"] else 1
            values = [fn(flat) for _ in range(repeats)]
            result["recall@20"][name] = statistics.fmean(values)
            result["recall@20_runs"][name] = values
            result["recall@20_std"][name] = statistics.stdev(values) if repeats > 1 else 0.0
            result["seconds"][name] = (time.perf_counter() - t0) / repeats
            spread = (f" ± {result['recall@20_std'][name]:.4f} over {repeats} runs"
                      if repeats > 1 else "")
            print(f"{name:<16} Recall@20 {result['recall@20'][name]:.4f}{spread} "
                  f"({result['seconds'][name]:.0f}s a run)", flush=True)
        als = tuned_als(data)
    r = result["recall@20"]
    r["implicit_als"] = als["recall@20"]
    result["implicit_als"] = als
    if "central" in r:
        result["central_over_als"] = r["central"] / r["implicit_als"]
        result["central_over_fixed_als"] = r["central"] / als["fixed_recall@20"]
        result["federated_over_central"] = {k: r[k] / r["central"] for k in
                                            ("cross_silo", "cross_device") if k in r}
    for eps in ("8", "1"):
        result[f"dp{eps}_over_nonprivate"] = {
            k: r[f"{k}_dp{eps}"] / r[k] for k in ("central", "cross_silo")
            if k in r and f"{k}_dp{eps}" in r}
    print(f"implicit ALS     Recall@20 {r['implicit_als']:.4f} (settings chosen on the "
          f"validation split: {als['params']}; at the fixed {als['fixed_params']}: "
          f"{als['fixed_recall@20']:.4f})")
    for key in ("central_over_als", "central_over_fixed_als", "federated_over_central",
                "dp8_over_nonprivate", "dp1_over_nonprivate"):
        if key in result:
            print(f"{key}: {result[key]}")
    write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
