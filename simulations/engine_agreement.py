"""Do the loop and batched engines reach the same quality? Side by side, on real data.

The engines are tested equal update for update on small data (tests/test_batched.py);
this runs whole federations on ML-100K (943 one-user clients, the sweep's settings) with
each engine and the same seeds, one after the other, and prints Recall@20 per seed, the
mean per engine and batched / loop. DP noise comes from OS entropy, so two runs differ
even with one engine: compare the difference with the spread over seeds.

    python simulations/engine_agreement.py --data-dir ../shared/datasets/ml-100k \\
        --modes distributed --seeds 0,1 --rounds 20 --out results/engine_agreement.json
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

from fedrec.config import RECIPES, RunConfig  # noqa: E402
from fedrec.errors import FedrecError  # noqa: E402
from fedrec.inprocess import run_inprocess  # noqa: E402
from fedrec.report import write_json_atomic  # noqa: E402

MODES = {"none": {}, "record": {"dp": True}, "user": {"user-dp": True},
         "distributed": {"ddp": True}}


def flat_of(data_dir: str, mode: str, epsilon: float, rounds: int, seed: int
            ) -> dict[str, Any]:
    """One point's flat config: the cross-device DP recipe for every mode (as a sweep)."""
    flat: dict[str, Any] = {"dataset": "ml-100k", "data-dir": data_dir,
                            "partition": "cross-device", "rounds": rounds, "seed": seed,
                            "dp": False, "eval-every": 0, **MODES[mode]}
    if mode == "none":  # the DP recipe's model, as a sweep's non-private row
        flat.update({k: RECIPES["cross-device-dp"][k]
                     for k in ("dim", "negatives", "local-epochs", "server-lr")})
    if mode == "record":
        flat["target-epsilon"] = epsilon
    if mode in ("user", "distributed"):
        flat["user-target-epsilon"] = epsilon
    return flat


def main() -> None:
    """Run every (mode, seed) with both engines in turn and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="MovieLens 100K folder")
    ap.add_argument("--modes", default="distributed",
                    help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--out", default="results/engine_agreement.json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected some of {list(MODES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: expected integers such as 0,1, got {args.seeds!r}"
                         ) from None
    result: dict[str, Any] = {"rounds": args.rounds, "epsilon": args.epsilon, "modes": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in modes:
            runs: dict[str, list[float]] = {"loop": [], "batched": []}
            seconds: dict[str, list[float]] = {"loop": [], "batched": []}
            for seed in seeds:
                cfg = RunConfig.from_flat(flat_of(args.data_dir, mode, args.epsilon,
                                                  args.rounds, seed))
                for engine in ("loop", "batched"):
                    t0 = time.perf_counter()
                    _, rows = run_inprocess(cfg, engine=engine)
                    seconds[engine].append(time.perf_counter() - t0)
                    runs[engine].append(float(rows[-1]["recall@20"]))
                    print(f"{mode:<12} seed {seed} {engine:<8} Recall@20 "
                          f"{runs[engine][-1]:.4f} ({seconds[engine][-1]:.0f}s)", flush=True)
            row: dict[str, Any] = {"recall@20": runs, "seconds": seconds}
            for engine, values in runs.items():
                row[f"{engine}_mean"] = statistics.fmean(values)
                row[f"{engine}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["batched_over_loop"] = row["batched_mean"] / row["loop_mean"]
            result["modes"][mode] = row
            print(f"{mode:<12} loop {row['loop_mean']:.4f} ± {row['loop_std']:.4f}, batched "
                  f"{row['batched_mean']:.4f} ± {row['batched_std']:.4f}: batched / loop "
                  f"{row['batched_over_loop']:.3f}", flush=True)
    write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    try:
        main()
    except FedrecError as err:  # bad data dir or config: one line, no traceback
        raise SystemExit(f"error: {err}") from None
