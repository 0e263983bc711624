"""``fedrec privacy-sweep``: federated runs over target epsilon x seeds x DP modes.

Modes: ``none``; ``record`` (Opacus DP-SGD on each client, unit: one rating);
``user`` (central user-level DP-FedAvg, unit: one client's whole data, i.e. one user in
cross-device mode); ``both``; ``distributed`` (user-level DP with Skellam noise shares
summed by secure aggregation, ``fedrec.ddp``); and always ``popularity``, the item-count
ranking released with user-level DP at each epsilon (exact at inf), the bar every
private model must clear. Every point runs through ``fedrec.inprocess`` (the apps'
arithmetic without Flower's messaging, tested equal to a Flower simulation and to the
SecAgg+ path). Each finished point is appended to ``points.csv`` (atomically), so an
interrupted sweep resumes where it stopped. Each point also runs the update-leakage
attack (``fedrec.attack``) on what the server receives from 20 clients: their uploads,
or, in distributed mode, their masked vectors. Metrics follow ``--top-k``: the sweep
reports Recall/NDCG/HR at the largest K and Precision at the smallest.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.config import RunConfig, changed_keys
from fedrec.errors import ConfigError
from fedrec.privacy import UNIT_OF_PRIVACY, USER_UNIT_OF_PRIVACY
from fedrec.report import write_bytes_atomic

MODES = ("none", "popularity", "record", "user", "both", "distributed")
TRAINED = ("none", "record", "user", "both", "distributed")


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metric columns of a sweep with cut-offs ``ks``."""
    big, small = max(ks), min(ks)
    return [f"recall@{big}", f"ndcg@{big}", f"hr@{big}", f"precision@{small}"]


def fields(ks: Sequence[int]) -> list[str]:
    """Columns of points.csv."""
    return (["mode", "target_epsilon", "seed", *metric_names(ks), "record_epsilon",
             "user_epsilon", "attack_auc", "attack_auc_bias", "noise_secret", "rounds",
             "engine", "seconds"])


def parse_epsilons(text: str) -> list[float]:
    """'0.5,1,inf' -> [0.5, 1.0, inf] (error naming the bad value)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--epsilons: {part!r} is not a number or 'inf'") from None
        if not value > 0:
            raise ConfigError(f"--epsilons: {part!r} must be > 0 (or inf)")
        out.append(value)
    if not out:
        raise ConfigError("--epsilons: give at least one value")
    return out


def plan(modes: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int]
         ) -> list[tuple[str, float, int]]:
    """The points to run: (mode, target epsilon, seed); 'none' only at epsilon = inf.

    The DP popularity baseline runs at every epsilon of the sweep (and inf), first: it
    takes seconds.
    """
    bad = [m for m in modes if m not in TRAINED]
    if bad:
        raise ConfigError(f"--modes: {bad} not in {list(TRAINED)}")
    points = [("popularity", eps, seed) for eps in sorted(set(epsilons) | {math.inf})
              for seed in seeds]
    for mode in modes:
        for eps in epsilons:
            if (mode == "none") != math.isinf(eps):
                continue
            points += [(mode, eps, seed) for seed in seeds]
    if "none" in modes and not any(math.isinf(e) for e in epsilons):
        points += [("none", math.inf, seed) for seed in seeds]
    return points


def point_config(base: RunConfig, mode: str, eps: float, seed: int) -> RunConfig:
    """The run config of one point."""
    flat = base.to_flat()
    flat.update({"seed": seed, "dp": mode in ("record", "both"),
                 "user-dp": mode in ("user", "both"), "ddp": mode == "distributed"})
    if mode in ("record", "both"):
        flat["target-epsilon"] = eps
    if mode in ("user", "both", "distributed"):
        flat["user-target-epsilon"] = eps
    return RunConfig.from_flat(flat)


def _run_point(cfg: RunConfig, progress: Any = None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Train one point in process; returns (final metrics, final shared model, engine)."""
    from fedrec.inprocess import run_inprocess

    shared, rows = run_inprocess(cfg, on_round=progress)
    last = dict(rows[-1])
    last["epsilon"] = max(r.get("epsilon-max", 0.0) for r in rows)
    last["user_epsilon"] = max((r.get("user-epsilon", 0.0) for r in rows), default=0.0)
    last["rounds"] = len(rows)
    return last, shared, "inprocess"


def _write_points(path: Path, rows: list[dict[str, Any]], ks: Sequence[int]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields(ks))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def read_points(path: Path, ks: Sequence[int]) -> list[dict[str, Any]]:
    """Finished points of an earlier (possibly interrupted) sweep."""
    if not path.exists():
        return []
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(rows[0]) != set(fields(ks)):
        raise ConfigError(f"{path}: not a privacy-sweep points file of this --top-k "
                          "(columns differ); use another --out")
    for n, r in enumerate(rows, 2):
        try:
            for k in fields(ks):
                if k in ("seed", "rounds"):
                    r[k] = int(float(r[k]))
                elif k == "noise_secret":
                    r[k] = r[k] in ("True", "true", "1")
                elif k not in ("mode", "engine"):
                    r[k] = float(r[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{path}, line {n}: bad value in column {k!r}: {r[k]!r}; fix "
                              "or delete the line to rerun that point") from None
    return rows


def summarize(rows: list[dict[str, Any]], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (mode, epsilon)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], float(r["target_epsilon"])), []).append(r)
    out = []
    for (mode, eps), rs in sorted(groups.items(), key=lambda kv: (MODES.index(kv[0][0]),
                                                                   kv[0][1])):
        row: dict[str, Any] = {"mode": mode, "target_epsilon": eps, "seeds": len(rs),
                               "noise_secret": all(bool(r["noise_secret"]) for r in rs)}
        for k in (*metric_names(ks), "record_epsilon", "user_epsilon", "attack_auc",
                  "attack_auc_bias"):
            vals = np.array([float(r[k]) for r in rs])
            row[k] = float(np.mean(vals))
            row[k + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def markdown(summary: list[dict[str, Any]], ks: Sequence[int]) -> str:
    """The summary as a Markdown table (a "NOT secret" mark where noise was seeded)."""
    rec, ndcg, hr, prec = metric_names(ks)
    lines = [f"| mode | target ε | {rec} | {ndcg} | {hr} | {prec} | ε record (per rating) | "
             "ε user (per user) | attack AUC (norm) | attack AUC (bias) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        eps = "∞" if math.isinf(r["target_epsilon"]) else f"{r['target_epsilon']:g}"
        mode = r["mode"] + ("" if r["noise_secret"] else " (noise NOT secret)")
        cells = [f"{r[m]:.4f} ± {r[m + '_std']:.4f}" for m in (rec, ndcg, hr, prec)]
        lines.append(
            f"| {mode} | {eps} | {' | '.join(cells)} | {r['record_epsilon']:.2f} | "
            f"{r['user_epsilon']:.2f} | {r['attack_auc']:.3f} | {r['attack_auc_bias']:.3f} | "
            f"{r['seeds']} |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, ks: Sequence[int]) -> None:
    """Recall and NDCG at the largest K against epsilon, one line per mode (error bars
    over seeds); the DP popularity ranking dashed, the non-private run as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["target_epsilon"] for r in summary if math.isfinite(r["target_epsilon"])]
    inf_x = (max(finite) * 2.5) if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, metric_names(ks)[:2]):
        for mode in MODES:
            rs = [r for r in summary if r["mode"] == mode]
            if not rs:
                continue
            xs = [inf_x if math.isinf(r["target_epsilon"]) else r["target_epsilon"] for r in rs]
            fmt = {"none": "s", "popularity": "k--"}.get(mode, "o-")
            ax.errorbar(xs, [r[metric] for r in rs], yerr=[r[metric + "_std"] for r in rs],
                        fmt=fmt, capsize=3, label="popularity (user-level DP)"
                        if mode == "popularity" else mode)
        ax.set_xscale("log")
        ax.minorticks_off()
        base = [r[metric] for r in summary if r["mode"] == "none"]
        if base:
            ax.axhline(base[0], color="grey", ls="--", lw=0.8)
        ticks = sorted(set(finite)) + [inf_x]
        ax.set_xticks(ticks, [f"{t:g}" for t in sorted(set(finite))] + ["∞"])
        ax.set_xlabel("target ε (record: per rating; user, distributed: per user)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(title="DP mode", fontsize=8)
    save_figure(fig, "fedrec privacy-utility", path)


def save_figure(fig: Any, title: str, path: Path) -> None:
    """Title a matplotlib figure, write it to ``path`` as PNG (atomically), close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())


def _check_same_config(path: Path, base: RunConfig) -> None:
    """A sweep dir holds points of one base config: refuse to mix configs."""
    if path.exists():
        diff = changed_keys(json.loads(path.read_text()), base)
        if diff:
            raise ConfigError(f"{path}: this sweep dir was made with another config "
                              f"(differs in {diff}); use another --out or the same options")
    else:
        flat = json.loads(json.dumps(base.to_flat(), default=str))
        write_bytes_atomic(path, (json.dumps(flat, indent=2) + "\n").encode())


def _point(cfg: RunConfig, mode: str, eps: float, attack_clients: int, quiet: bool,
           label: str = "") -> tuple[dict[str, Any], dict[str, float], str]:
    """(metrics, attack AUCs, engine) of one point; progress lines per round (prefixed
    with ``label`` when points run side by side)."""
    from fedrec.attack import attack_clients as run_attack

    if mode == "popularity":
        from fedrec.baselines import dp_popularity_metrics
        from fedrec.federated import cached_split

        metrics = dp_popularity_metrics(cfg, cached_split(cfg.data), eps)
        return ({**metrics, "rounds": 0, "user_epsilon": 0.0 if math.isinf(eps) else eps},
                {"attack_auc": math.nan, "attack_auc_bias": math.nan}, "baseline")
    t0 = time.perf_counter()
    big = max(cfg.eval.ks)

    def progress(row: dict[str, Any]) -> None:
        done = int(row["round"])
        eta = (time.perf_counter() - t0) / done * (cfg.fed.rounds - done)
        print(f"    {label}round {done}/{cfg.fed.rounds}: R@{big} "
              f"{row.get(f'recall@{big}', math.nan):.4f} (eta {eta / 60:.1f} min)",
              flush=True)

    metrics, shared, engine = _run_point(cfg, None if quiet else progress)
    return metrics, run_attack(cfg, shared, attack_clients), engine


def _point_name(mode: str, eps: float, seed: int) -> str:
    """``record eps 8 seed 0`` (``inf`` for no DP)."""
    return f"{mode} eps {'inf' if math.isinf(eps) else f'{eps:g}'} seed {seed}"


def _job(cfg: RunConfig, mode: str, eps: float, attack_clients: int, quiet: bool,
         label: str) -> tuple[dict[str, Any], dict[str, float], str, float]:
    """One point: ``_point`` and its seconds."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, attack, engine = _point(cfg, mode, eps, attack_clients, quiet, label)
    return metrics, attack, engine, time.perf_counter() - t0


def _results(jobs: int, work: list[tuple[RunConfig, str, float, int]], attack_clients: int,
             quiet: bool) -> Iterator[tuple[int, tuple[dict[str, Any], dict[str, float], str,
                                                      float]]]:
    """``(index in work, _job result)`` for each point, as the points finish: in this
    process one after another (``jobs`` 1), or ``jobs`` worker processes side by side."""
    def label(mode: str, eps: float, seed: int) -> str:
        return f"[{_point_name(mode, eps, seed)}] "

    if jobs <= 1:
        for n, (cfg, mode, eps, seed) in enumerate(work):
            if not quiet:
                print(f"{label(mode, eps, seed)}...", flush=True)
            yield n, _job(cfg, mode, eps, attack_clients, quiet, "")
        return
    import multiprocessing

    args = [(cfg, mode, eps, attack_clients, quiet, label(mode, eps, seed))
            for cfg, mode, eps, seed in work]
    # on leaving (done, an interrupt, a failed point) the workers are terminated
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init) as pool:
        yield from pool.imap_unordered(_job_at, list(enumerate(args)))


def _job_at(item: tuple[int, tuple[Any, ...]]) -> tuple[int, Any]:
    """``(index, _job(*args))`` for a pool worker."""
    index, args = item
    return index, _job(*args)


def _worker_init() -> None:
    """A worker runs one torch thread (its points side by side fill the cores) and
    leaves Ctrl-C to the sweep, which stops it."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def default_jobs() -> int:
    """Points run side by side by default: one per CPU core (each point runs one torch
    thread), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def privacy_sweep(base: RunConfig, out: Path, *, modes: Sequence[str],
                  epsilons: Sequence[float], seeds: Sequence[int], attack_clients: int = 20,
                  quiet: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; write points.csv, summary.md/json, privacy_utility.png.

    ``jobs`` > 1 runs that many points side by side in worker processes (one torch
    thread each); points.csv gains each point as it finishes.
    """
    from fedrec.privacy import noise_is_secret

    ks = base.eval.ks
    names = metric_names(ks)
    points = plan(modes, epsilons, seeds)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out / "config.json", base)
    csv_path = out / "points.csv"
    done = read_points(csv_path, ks)
    have = {(r["mode"], float(r["target_epsilon"]), int(r["seed"])) for r in done}
    todo = [p for p in points if p not in have]
    if not quiet:
        print(f"privacy sweep: {len(points)} points ({len(points) - len(todo)} already done "
              f"in {csv_path}); record-level unit: {UNIT_OF_PRIVACY}; user-level unit: "
              f"{USER_UNIT_OF_PRIVACY}", flush=True)
    t_start = time.perf_counter()
    work = [(point_config(base, mode, eps, seed) if mode != "popularity" else
             base.replace(seed=seed), mode, eps, seed) for mode, eps, seed in todo]
    if not quiet and jobs > 1:
        print(f"running {min(jobs, len(work))} points side by side", flush=True)
    for n, (index, (metrics, attack, engine, seconds)) in enumerate(
            _results(jobs, work, attack_clients, quiet), 1):
        cfg, mode, eps, seed = work[index]
        row = {"mode": mode, "target_epsilon": eps, "seed": seed,
               **{m: metrics.get(m, math.nan) for m in names},
               "record_epsilon": metrics.get("epsilon", 0.0) if cfg.privacy.dp else 0.0,
               "user_epsilon": metrics.get("user_epsilon", 0.0), **attack,
               "noise_secret": noise_is_secret(cfg.privacy),
               "rounds": metrics.get("rounds", cfg.fed.rounds), "engine": engine,
               "seconds": seconds}
        done.append(row)
        _write_points(csv_path, done, ks)
        if not quiet:
            elapsed = time.perf_counter() - t_start
            eta = elapsed / n * (len(todo) - n)
            print(f"[{len(points) - len(todo) + n}/{len(points)}] "
                  f"{_point_name(mode, eps, seed)}: {names[0]} {row[names[0]]:.4f} {names[1]} "
                  f"{row[names[1]]:.4f} attack AUC {row['attack_auc']:.3f} "
                  f"({seconds:.0f}s; sweep eta {eta / 60:.1f} min)", flush=True)
    summary = summarize(done, ks)  # every point of this sweep dir, this run's and earlier
    write_bytes_atomic(out / "summary.md", (markdown(summary, ks) + "\n").encode())
    write_bytes_atomic(out / "summary.json",
                       (json.dumps(summary, indent=2, default=str) + "\n").encode())
    plot(summary, out / "privacy_utility.png", ks)
    if not quiet:
        print(markdown(summary, ks))
        print(f"results: {out}")
    return summary
