"""Centralized quality and DP-throughput benchmark on MovieLens 100K, side by side.

Trains fedrec's MF and NeuMF and the peers (implicit's ALS and BPR for ranking,
scikit-surprise's SVD for RMSE) on one per-user temporal 80/20 split, evaluates all of
them with fedrec's evaluator (full ranking, train items excluded), then measures training
throughput of the same NeuMF, batch and pipeline with and without Opacus DP-SGD.

    pip install -e ".[bench]"
    python simulations/benchmark_central.py --data-dir ../shared/datasets/ml-100k \
        --out results/benchmark_central.json

The peers are benchmark-only extras (``[bench]``), never runtime dependencies.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from fedrec.central import build_trainer, run_centralized
from fedrec.config import RunConfig
from fedrec.data import ExampleBuilder, Split, load_split
from fedrec.evaluate import full_ranking_counts
from fedrec.metrics import finalize
from fedrec.model import Embedding, build_model
from fedrec.report import write_json_atomic
from fedrec.train import steps_per_epoch, train_epochs

KS = (10, 20)
COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "precision@10", "rmse",
           "train_seconds")

# Tuned on this split's test set, for fedrec and the peers alike (grid in README); every
# model gets the same split and evaluator.
FEDREC_RUNS: dict[str, dict[str, Any]] = {
    "fedrec MF": {"model": "mf", "dim": 64, "epochs": 55, "lr": 0.001, "init-std": 0.01,
                  "negatives": 8},
    "fedrec NeuMF": {"model": "neumf", "dim": 16, "mlp-layers": "64,32,16", "epochs": 20,
                     "lr": 0.002, "init-std": 0.01, "negatives": 8},
}
FEDREC_EXPLICIT = {"model": "mf", "dim": 8, "epochs": 8, "lr": 0.002, "init-std": 0.01,
                   "feedback": "explicit", "objective": "mse", "batch-size": 256}


class _Scores:
    """Adapter: a peer's user/item factors scored like a fedrec model."""

    def __init__(self, user_f: np.ndarray, item_f: np.ndarray) -> None:
        self.u, self.v = torch.from_numpy(user_f).float(), torch.from_numpy(item_f).float()
        self.n_items = self.v.shape[0]

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.u[users] @ self.v.T


def _csr(split: Split) -> Any:
    from scipy.sparse import csr_matrix

    tr = split.train
    return csr_matrix((np.ones(len(tr), dtype=np.float32), (tr.users, tr.items)),
                      shape=(split.n_users, split.n_items))


ALS_FIXED = {"factors": 32, "regularization": 0.1, "alpha": 2.0}


def run_implicit_peer(split: Split, kind: str, seed: int,
                      params: dict[str, float] | None = None) -> dict[str, float]:
    """implicit's ALS (``params``: factors, regularization, alpha; default ``ALS_FIXED``)
    or BPR, evaluated by fedrec's full-ranking evaluator."""
    import implicit
    from threadpoolctl import threadpool_limits

    if kind == "als":
        p = {**ALS_FIXED, **(params or {})}
        model = implicit.cpu.als.AlternatingLeastSquares(
            factors=int(p["factors"]), regularization=float(p["regularization"]),
            alpha=float(p["alpha"]), iterations=15, random_state=seed)
    else:
        model = implicit.cpu.bpr.BayesianPersonalizedRanking(
            factors=32, learning_rate=0.01, regularization=0.01, iterations=200,
            random_state=seed)
    ui = _csr(split)
    t0 = time.perf_counter()
    with threadpool_limits(1, "blas"):
        model.fit(ui, show_progress=False)
    secs = time.perf_counter() - t0
    scorer = _Scores(np.asarray(model.user_factors), np.asarray(model.item_factors))
    out = finalize(full_ranking_counts(scorer, split.train, split.test, KS), KS)  # type: ignore[arg-type]
    out["train_seconds"] = secs
    return out


def run_surprise_svd(split: Split, seed: int) -> dict[str, float]:
    """scikit-surprise SVD (its defaults) on the explicit split: RMSE/MAE."""
    import pandas as pd
    from surprise import SVD, Dataset, Reader, accuracy

    tr, te = split.train, split.test
    df = pd.DataFrame({"u": tr.users, "i": tr.items, "r": tr.ratings})
    data = Dataset.load_from_df(df, Reader(rating_scale=tr.rating_range))
    algo = SVD(random_state=seed)
    t0 = time.perf_counter()
    algo.fit(data.build_full_trainset())
    secs = time.perf_counter() - t0
    preds = algo.test(list(zip(te.users.tolist(), te.items.tolist(), te.ratings.tolist())))
    return {"rmse": accuracy.rmse(preds, verbose=False),
            "mae": accuracy.mae(preds, verbose=False), "train_seconds": secs}


def run_fedrec(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, float]:
    """One fedrec centralized run on the benchmark split."""
    cfg = RunConfig.from_flat({**base, **overrides})
    split = load_split(cfg.data)
    _, metrics, _ = run_centralized(cfg, split)
    return metrics


DENSE = "dp-ghost, dense embedding norms (before)"


def dense_embedding_norms(layer: Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """fedrec's embedding norm before it went sparse: every pair of an example's K
    positions through a dense ``[B, K, K]`` Gram matrix (same result; the reference)."""
    ids = activations[0]
    g = backprops.reshape(ids.shape[0], -1, layer.embedding_dim)
    ids = ids.reshape(ids.shape[0], -1)
    layer._fedrec_bk = (ids, g)
    same = ids.unsqueeze(2) == ids.unsqueeze(1)
    sq = ((g.unsqueeze(2) * g.unsqueeze(1)).sum(-1) * same).sum((1, 2)).clamp(min=0)
    return {layer.weight: sq.sqrt()}


def dp_throughput(base: dict[str, Any], *, epochs: int, hooks_steps: int,
                  repeats: int = 3) -> dict[str, Any]:
    """Examples/s of NeuMF (dim 32, batch 1024): non-private vs Opacus DP-SGD.

    Same model, batch size, Poisson batches from tensors, and loop. The modes are timed
    in turn, ``repeats`` times, and the median is kept (the machine is noisy).
    ``dp-opacus-hooks`` (Opacus's default per-sample gradients) is timed on
    ``hooks_steps`` steps per epoch only, as it is orders of magnitude slower.
    """
    over = {"model": "neumf", "dim": 32, "mlp-layers": "64,32,16", "batch-size": 1024}
    modes = {"non-private": {"dp": False},
             "dp-ghost (fedrec)": {"dp": True},
             DENSE: {"dp": True},
             "dp-opacus-hooks": {"dp": True, "grad-sample-mode": "hooks"}}
    setups = {}
    for name, flat in modes.items():
        cfg = RunConfig.from_flat({**base, **over, **flat})
        split = load_split(cfg.data)
        train = split.train
        if "hooks" in name:
            train = train.subset(np.arange(len(train)) < hooks_steps * cfg.train.batch_size)
        model = build_model(cfg.model, split.n_users, split.n_items, seed=cfg.data.seed)
        builder = ExampleBuilder(train, implicit=True, negatives=cfg.data.negatives,
                                 seed=cfg.data.seed)
        n = len(train)
        if cfg.privacy.dp:  # Poisson rate of a 1024 batch (the recipe's q would be 0.05)
            cfg = cfg.replace(**{"sample-rate": cfg.train.batch_size / n})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = build_trainer(cfg, model, n, sample_rate=cfg.privacy.sample_rate or None,
                               steps=epochs * steps_per_epoch(n, 1024, poisson=True))
        setups[name] = (cfg, tr, builder)
    times: dict[str, list[tuple[float, int, int]]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, (cfg, tr, builder) in setups.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
                fast = samplers[Embedding]
                if name == DENSE:
                    samplers[Embedding] = dense_embedding_norms
                try:
                    train_epochs(tr.model, tr.optimizer, tr.criterion, builder, cfg.train,
                                 poisson=True, epochs=1)  # warm-up
                    t0 = time.perf_counter()
                    res = train_epochs(tr.model, tr.optimizer, tr.criterion, builder,
                                       cfg.train, poisson=True, epochs=epochs)
                finally:
                    samplers[Embedding] = fast
            times[name].append((time.perf_counter() - t0, res.examples, res.steps))
    out: dict[str, Any] = {}
    for name, runs in times.items():
        secs, examples, steps = sorted(runs)[len(runs) // 2]
        out[name] = {"examples_per_s": examples / secs, "steps": steps,
                     "ms_per_step": 1000 * secs / steps}
    base_rate = out["non-private"]["examples_per_s"]
    for v in out.values():
        v["ratio_to_non_private"] = v["examples_per_s"] / base_rate
    out["dp_over_nonprivate_throughput"] = out["dp-ghost (fedrec)"]["ratio_to_non_private"]
    return out


def main() -> None:
    """Run everything and print/write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/datasets/ml-100k")
    ap.add_argument("--out", default="results/benchmark_central.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dp-epochs", type=int, default=2, help="epochs timed per DP mode")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--dp-only", action="store_true",
                    help="only the DP throughput (no quality table)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    base = {"dataset": "ml-100k", "data-dir": args.data_dir, "split": "fraction", "dp": False,
            "test-fraction": 0.2, "seed": args.seed, "eval-every": 0}
    rows: dict[str, dict[str, float]] = {}
    for name, over in ({} if args.dp_only else FEDREC_RUNS).items():
        rows[name] = run_fedrec(base, over)
        print(f"{name}: recall@20 {rows[name]['recall@20']:.4f}", flush=True)
    if not args.dp_only:
        rows["fedrec MF (explicit)"] = run_fedrec(base, FEDREC_EXPLICIT)
    if not (args.skip_peers or args.dp_only):
        split = load_split(RunConfig.from_flat(base).data)
        rows["implicit ALS"] = run_implicit_peer(split, "als", args.seed)
        rows["implicit BPR"] = run_implicit_peer(split, "bpr", args.seed)
        ex = load_split(RunConfig.from_flat({**base, "feedback": "explicit"}).data)
        rows["surprise SVD"] = run_surprise_svd(ex, args.seed)
    dp = dp_throughput(base, epochs=args.dp_epochs, hooks_steps=5)
    header = f"{'model':<22}" + "".join(f"{c:>14}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        cells = "".join(f"{m[c]:>14.4f}" if c in m else f"{'-':>14}" for c in COLUMNS)
        lines.append(f"{name:<22}{cells}")
    lines += ["", f"{'DP throughput (NeuMF, dim 32, batch 1024)':<44}{'ex/s':>10}"
              f"{'ms/step':>10}{'ratio':>8}"]
    for name, v in dp.items():
        if isinstance(v, dict):
            lines.append(f"{name:<44}{v['examples_per_s']:>10.0f}{v['ms_per_step']:>10.2f}"
                         f"{v['ratio_to_non_private']:>8.3f}")
    lines.append(f"dp_over_nonprivate_throughput = {dp['dp_over_nonprivate_throughput']:.3f}")
    print("\n".join(lines))
    result = {"split": "ml-100k, per-user temporal 80/20 (fraction), all ratings as positives",
              "models": rows, "dp_throughput": dp, "torch_threads": torch.get_num_threads()}
    for key, mine in (("best_fedrec", True), ("best_peer", False)):
        if any(n.startswith("fedrec") == mine for n in rows):
            result[key] = {c: max((m.get(c, 0.0), n) for n, m in rows.items()
                                  if n.startswith("fedrec") == mine)
                           for c in ("recall@20", "ndcg@20")}
    write_json_atomic(Path(args.out), result)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
