"""Command implementations behind ``fedrec.cli`` (progress, tables, results dirs)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedrec.central import run_centralized
from fedrec.config import RunConfig
from fedrec.data import load_split
from fedrec.privacy import UNIT_OF_PRIVACY
from fedrec.report import RunDir, plot_curves, run_facts
from fedrec.train import steps_per_epoch


def format_table(metrics: dict[str, Any], title: str) -> str:
    """A two-column text table of metrics."""
    def fmt(v: Any) -> str:
        if isinstance(v, float) and math.isfinite(v):
            return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.1e}"
        return str(v)

    rows = [(k, fmt(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)


def centralized(cfg: RunConfig, out: Path, *, overwrite: bool = False,
                quiet: bool = False) -> int:
    """``fedrec centralized``: train, evaluate, write ``out``, print a summary."""
    cfg = cfg.for_central()
    run = RunDir(out, overwrite=overwrite)
    try:
        split = load_split(cfg.data)
        if not quiet:
            print(split.train.summary())
            if split.train.synthetic:
                print("note: this is synthetic data; pass --dataset/--data-dir for real data")
        total = cfg.train.epochs * steps_per_epoch(len(split.train), cfg.train.batch_size,
                                                  poisson=cfg.privacy.dp)
        tty = sys.stderr.isatty()  # a bar on a terminal; one line per epoch in a log file
        bar = tqdm(total=total, desc=f"training {cfg.model.model}", unit="step",
                   disable=quiet or not tty, file=sys.stderr)

        def on_epoch(row: dict[str, Any]) -> None:
            run.add_row(row)
            shown = {"loss": f"{row['loss']:.4f}"}
            k = max(cfg.eval.ks)
            if f"recall@{k}" in row:
                shown[f"R@{k}"] = f"{row[f'recall@{k}']:.4f}"
            if "epsilon" in row:
                shown["eps"] = f"{row['epsilon']:.2f}"
            bar.set_postfix(shown)
            if not quiet and not tty:
                print(f"epoch {row['epoch']}/{cfg.train.epochs} "
                      + " ".join(f"{k} {v}" for k, v in shown.items())
                      + f" ({row['seconds']:.1f}s)", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        model, metrics, _ = run_centralized(cfg, split, on_epoch=on_epoch,
                                            on_step=lambda: bar.update(1))
        bar.close()
        metrics["wall_seconds"] = time.perf_counter() - t0
        if cfg.privacy.dp:
            metrics["unit_of_privacy"] = UNIT_OF_PRIVACY
        run.write_json("config.json", {**run_facts("centralized"), **cfg.to_flat()})
        run.write_json("metrics.json", metrics)
        run.write_rows("epochs")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   run.path / "model.pt")
        k = max(cfg.eval.ks)
        plot_curves(run.rows, "epoch", ["loss", f"recall@{k}", f"ndcg@{k}"],
                    run.path / "epochs.png", f"{cfg.model.model} on {cfg.data.dataset}")
        path = run.commit()
    except BaseException:
        run.abort()
        raise
    if not quiet:
        title = f"{cfg.model.model} on {cfg.data.dataset} ({len(split.test):,} test interactions)"
        print(format_table(metrics, title))
        print(f"results: {path}")
    return 0
