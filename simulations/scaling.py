"""Population scaling: utility of each DP mode at fixed epsilon as one-user clients grow.

At what population does DP on the device become useful? For each population (synthetic,
ML-1M-shaped catalogue of 3,706 items, one user per client, every client in every
round), a privacy sweep (``fedrec privacy-sweep``'s points: in process, batched engine)
runs each DP mode at each epsilon, with the non-private run and the DP popularity
ranking as references:

    python simulations/scaling.py --populations 1000,10000,100000 --epsilons 1,8 \\
        --out results/scaling

Each population's sweep lives in ``OUT/<population>/`` (resumable: finished points are
not rerun); ``OUT/scaling.json`` and ``OUT/scaling.md`` gather them, ``OUT/scaling.png``
plots Recall@K against the population, one panel per epsilon. The units of privacy:
record-level epsilon per rating, user-level and distributed per user (one client).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from fedrec.config import RunConfig
from fedrec.errors import ConfigError
from fedrec.report import write_bytes_atomic
from simulations.sweep import (
    default_jobs,
    metric_names,
    parse_epsilons,
    plan,
    privacy_sweep,
    save_figure,
)

MODES = ("none", "popularity", "record", "user", "distributed")


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """Markdown: one row per (mode, epsilon), one column per population."""
    pops = sorted({r["population"] for r in rows})
    keys = sorted({(r["mode"], r["target_epsilon"]) for r in rows},
                  key=lambda k: (MODES.index(k[0]), k[1]))
    lines = ["| mode | target ε | " + " | ".join(f"{p:,} clients" for p in pops) + " |",
             "|---|---|" + "---|" * len(pops)]
    for mode, eps in keys:
        cells = []
        for p in pops:
            hit = [r for r in rows if r["population"] == p and r["mode"] == mode
                   and r["target_epsilon"] == eps]
            cells.append(f"{hit[0][metric]:.4f}" if hit else "–")
        eps_text = "∞" if math.isinf(eps) else f"{eps:g}"
        lines.append(f"| {mode} | {eps_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """``metric`` against the population, one panel per finite epsilon; the non-private
    run in grey, DP popularity dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({r["target_epsilon"] for r in rows
                       if math.isfinite(r["target_epsilon"])})
    fig, axes = plt.subplots(1, max(1, len(epsilons)), figsize=(5 * max(1, len(epsilons)), 4),
                             squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for mode in MODES:
            want = math.inf if mode == "none" else eps
            rs = sorted((r for r in rows if r["mode"] == mode and r["target_epsilon"] == want),
                        key=lambda r: r["population"])
            if not rs:
                continue
            style = {"none": dict(color="grey", marker="s"),
                     "popularity": dict(color="black", ls="--", marker=".")}.get(mode, {
                         "marker": "o"})
            ax.plot([r["population"] for r in rs], [r[metric] for r in rs],
                    label="non-private" if mode == "none" else
                    ("popularity (user-level DP)" if mode == "popularity" else mode),
                    **style)
        ax.set_xscale("log")
        ax.set_xlabel("one-user clients (all in every round)")
        ax.set_ylabel(metric)
        ax.set_title(f"ε = {eps:g} (record: per rating; user, distributed: per user)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, "fedrec: utility of each DP mode as the population grows", path)


def main() -> int:
    """Run (or resume) one sweep per population; write the combined table and plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--populations", default="1000,10000,100000")
    ap.add_argument("--epsilons", default="1,8")
    ap.add_argument("--modes", default="none,record,user,distributed")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--items", type=int, default=3706, help="catalogue (ML-1M: 3,706)")
    ap.add_argument("--activity", type=float, default=20.0,
                    help="mean ratings per user (ML-1M: 166; 20 keeps 100k clients cheap)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=0, help="points side by side (0: per core)")
    ap.add_argument("--out", default="results/scaling")
    args = ap.parse_args()
    out = Path(args.out)
    try:
        pops = [int(p) for p in args.populations.split(",") if p.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--populations {args.populations!r} / --seeds {args.seeds!r}: expected "
                 "comma lists of integers")
    if not pops or min(pops) < 2:
        ap.error(f"--populations {args.populations!r}: expected integers >= 2")
    if args.jobs < 0:
        ap.error(f"--jobs {args.jobs}: expected an integer >= 0 (0: one per CPU core)")
    modes = [m for m in args.modes.split(",") if m]
    try:
        epsilons = parse_epsilons(args.epsilons)
        plan(modes, epsilons, seeds)  # names a mode it does not know
    except ConfigError as err:
        ap.error(str(err))
    rows: list[dict[str, Any]] = []
    ks = (10, 20)
    for pop in pops:
        t0 = time.perf_counter()
        base = RunConfig.from_flat({
            "dataset": "synthetic", "synthetic-users": pop, "synthetic-items": args.items,
            "synthetic-activity": args.activity, "partition": "cross-device",
            "rounds": args.rounds})
        ks = base.eval.ks
        print(f"== {pop:,} clients", flush=True)
        summary = privacy_sweep(base, out / str(pop),
                                modes=modes,
                                epsilons=epsilons,
                                seeds=seeds,
                                attack_clients=20, quiet=False,
                                jobs=args.jobs or default_jobs())
        print(f"   {pop:,} clients: {time.perf_counter() - t0:.0f}s", flush=True)
        rows += [{"population": pop, **r} for r in summary]
    metric = metric_names(ks)[0]
    md = table(rows, metric)
    print(md)
    write_bytes_atomic(out / "scaling.md", (md + "\n").encode())
    write_bytes_atomic(out / "scaling.json",
                       (json.dumps(rows, indent=2, default=str) + "\n").encode())
    plot(rows, metric, out / "scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
