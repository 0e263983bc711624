"""Grid search on a validation split carved from training (the test split is never read).

Every candidate is run with ``validation=true``: each user's latest ``test-fraction`` of
*training* interactions is held out and ranked (``fedrec.data.load_split``). The command
prints one line per candidate and a table sorted by the metric, and writes them to JSON.
Federated candidates run through ``fedrec.inprocess`` (tested equal to Flower), central
ones through ``fedrec.central``.

    python simulations/tune.py --base "dataset=ml-100k data-dir=../shared/datasets/ml-100k \\
        partition=cross-device dp=false ddp=true user-target-epsilon=8" \\
        --grid "rounds=5,15 user-clip=0.5,2 server-lr=0.05,0.1" --out results/tune.json

``--central`` tunes ``fedrec centralized`` instead. The best candidate's settings are
what the README quotes as defaults or recipes (with the command that measured them on
the test split afterwards).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

from fedrec.config import RunConfig
from fedrec.report import write_json_atomic


def parse_pairs(text: str) -> dict[str, str]:
    """``"a=1 b=x"`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for part in shlex.split(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {part!r}")
        out[key] = value
    return out


def candidates(base: dict[str, str], grid: dict[str, str]) -> list[dict[str, str]]:
    """Every combination of the grid's comma-separated values over ``base``."""
    keys = list(grid)
    values = [grid[k].split(",") for k in keys]
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*values)]


def evaluate(flat: dict[str, str], central: bool) -> dict[str, float]:
    """Validation metrics of one candidate (the best round/epoch and the last)."""
    cfg = RunConfig.from_flat({**flat, "validation": True, "eval-every": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if central:
            from fedrec.central import run_centralized
            from fedrec.data import load_split

            _, last, rows = run_centralized(cfg, load_split(cfg.data))
        else:
            from fedrec.inprocess import run_inprocess

            _, rows = run_inprocess(cfg)
            last = rows[-1]
    k = f"recall@{max(cfg.eval.ks)}"
    scored = [r for r in rows if k in r]
    best = max(scored, key=lambda r: r[k])
    step = "epoch" if central else "round"
    return {"last": float(last[k]), "best": float(best[k]), f"best_{step}": best[step]}


def main() -> None:
    """Run the grid and print the ranking."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="", help='fixed settings, "key=value ..."')
    ap.add_argument("--grid", required=True, help='"key=v1,v2 key2=w1,w2 ..."')
    ap.add_argument("--central", action="store_true", help="tune centralized training")
    ap.add_argument("--out", default="results/tune.json")
    args = ap.parse_args()
    base, grid = parse_pairs(args.base), parse_pairs(args.grid)
    results: list[dict[str, Any]] = []
    for n, cand in enumerate(candidates(base, grid), 1):
        t0 = time.perf_counter()
        scores = evaluate(cand, args.central)
        shown = {k: cand[k] for k in grid}
        results.append({"settings": shown, **scores, "seconds": time.perf_counter() - t0})
        print(f"[{n}] {shown}: validation R@K last {scores['last']:.4f} best "
              f"{scores['best']:.4f} ({results[-1]['seconds']:.0f}s)", flush=True)
        write_json_atomic(Path(args.out), {"base": base, "grid": grid, "results": results})
    print("\nby validation Recall@K (last round/epoch):")
    for r in sorted(results, key=lambda r: -r["last"]):
        print(f"  {r['last']:.4f} (best {r['best']:.4f})  {r['settings']}")


if __name__ == "__main__":
    main()
