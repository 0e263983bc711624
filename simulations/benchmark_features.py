"""Beyond ids: feature models (DeepFM, Wide & Deep) against MF and tuned ALS, cold start.

One per-user temporal 80/20 split, full ranking with train items excluded, the same
evaluator for every model. Every fedrec setting and the epoch count are chosen on a
validation split carved from training (each user's latest 20% of train), never on test;
ALS is tuned on the same validation split (``benchmark_defaults.tuned_als``).

Parts (``--parts``, default all; results merge into ``--out``, so parts can run apart):

- ``central``: MF, DeepFM, Wide & Deep, each over ``GRID`` on validation, then measured
  once on test with the chosen setting -> ``best_central_over_als``.
- ``federated``: the best feature model, one client per user, non-private, in process
  (equal to a Flower simulation) -> ``federated_over_als``.
- ``item_cold``: 10% of the items held out of training; their raters rank them
  (Recall@20 among new items): DeepFM vs popularity among new items (counted in the test
  period: an oracle), content popularity (deployable) and MF (ids only) ->
  ``cold_start_over_popularity``.
- ``user_cold``: 20% of the users keep only their first 3 training ratings; metrics for
  them and for the rest.
- ``rmse``: explicit ratings, MSE loss: MF and DeepFM vs scikit-surprise SVD.
- ``cold_baselines``: only ``item_cold``'s untrained rankings (random, the oracle,
  content popularity, newest release first), merged into its results (not in the
  default run: ``item_cold`` computes them).

    pip install -e ".[bench]"
    python simulations/benchmark_features.py --data-dir ../shared/datasets/ml-100k \
        --out results/benchmark_features_ml100k.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedrec.baselines import FixedScores  # noqa: E402
from fedrec.central import run_centralized  # noqa: E402
from fedrec.coldstart import (  # noqa: E402
    among_new_items,
    content_popularity,
    item_cold_start,
    oracle_popularity,
    sliced_metrics,
    user_cold_start,
)
from fedrec.config import RunConfig  # noqa: E402
from fedrec.data import Split, load_split  # noqa: E402
from fedrec.errors import FedrecError  # noqa: E402
from fedrec.features import (  # noqa: E402
    collisions,
    item_values,
    release_years,
    user_values,
)
from fedrec.inprocess import run_inprocess  # noqa: E402
from fedrec.report import write_json_atomic  # noqa: E402

KS = (10, 20)
MODELS = {"mf": "MF", "deepfm": "DeepFM", "widedeep": "Wide & Deep",
          "deepfm-context": "DeepFM + context"}
# a model's config keys (a variant's model plus its switches; context=auto: read in the
# centralized parts, not in the non-private federated one, where a reply would show it)
MODEL_FLAT = {"deepfm-context": {"model": "deepfm", "context": "auto"}}
CENTRAL_MODELS = list(MODELS)  # --models: those the central part tunes and measures
# the central recipe (dim 64, Adam 0.002, batch 1024, 20 negatives) is MF's tuned point;
# each model also tries these, and the epoch count, on validation
GRID = {"dim": (32, 64), "lr": (0.001, 0.002)}
MAX_EPOCHS, EVAL_EVERY = 40, 5
GRID_EPOCHS = [MAX_EPOCHS]  # --max-epochs: the longest run of the grid
# item cold start: id-dropout and title embeddings, chosen on a validation cold-start split
COLD_GRID = {"id-dropout": (0.0, 0.5), "item-text": ("off", "on")}
DATASETS = ("ml-100k", "ml-latest-small")


def _flat(model: str) -> dict[str, Any]:
    """The config keys of a ``MODELS`` entry."""
    return MODEL_FLAT.get(model, {"model": model})


def _cfg(base: dict[str, Any], **over: Any) -> RunConfig:
    return RunConfig.from_flat({**base, "dp": False, **over}).for_central()


def _central(base: dict[str, Any], split: Split, **over: Any) -> tuple[Any, dict[str, float],
                                                                      list[dict[str, Any]]]:
    cfg = _cfg(base, **over)
    return run_centralized(cfg, split)


def choose(base: dict[str, Any], model: str, val: Split) -> dict[str, Any]:
    """The grid point and epoch count with the best validation Recall@20."""
    best: dict[str, Any] = {"recall@20": -1.0}
    for combo in itertools.product(*GRID.values()):
        over = {**_flat(model), **dict(zip(GRID, combo)), "epochs": GRID_EPOCHS[0],
                "eval-every": EVAL_EVERY}
        t0 = time.perf_counter()
        _, _, rows = _central(base, val, **over)
        for row in rows:
            if "recall@20" in row and row["recall@20"] > best["recall@20"]:
                best = {"recall@20": row["recall@20"], **over, "epochs": row["epoch"]}
        print(f"  {model} {dict(zip(GRID, combo))}: best so far {best} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    best.pop("eval-every")
    return {"validation_recall@20": best.pop("recall@20"), "settings": best}


def part_central(base: dict[str, Any], out: dict[str, Any]) -> None:
    from benchmark_defaults import tuned_als

    val = load_split(RunConfig.from_flat({**base, "validation": True}).data)
    test = load_split(RunConfig.from_flat(base).data)
    rows = out.setdefault("central", {})
    for model, name in MODELS.items():
        if name in rows or model not in CENTRAL_MODELS:
            continue
        chosen = choose(base, model, val)
        _, metrics, _ = _central(base, test, **chosen["settings"], **{"eval-every": 0})
        rows[name] = {**chosen, **{k: metrics[k] for k in metrics if "@" in k},
                      "train_seconds": metrics["train_seconds"], "lr_grid": list(GRID["lr"])}
        print(f"{name}: test Recall@20 {rows[name]['recall@20']:.4f}", flush=True)
        write_json_atomic(OUT, out)
    if "implicit ALS" not in rows:
        data = {k: base[k] for k in ("dataset", "data-dir")}
        als = tuned_als(data)
        rows["implicit ALS"] = {"recall@20": als["recall@20"], "settings": als["params"],
                                "validation_recall@20": als["validation_recall@20"]}
    best = max((n for n in rows if n != "implicit ALS"), key=lambda n: rows[n]["recall@20"])
    out["best_central"] = best
    out["best_central_over_als"] = rows[best]["recall@20"] / rows["implicit ALS"]["recall@20"]


def _best_feature_model(out: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rows = out.get("central", {})
    feats = [(n, m) for m, n in MODELS.items() if m != "mf" and n in rows]
    if not feats:
        raise SystemExit("run --parts central first (it chooses the feature model)")
    name, model = max(feats, key=lambda nm: rows[nm[0]]["validation_recall@20"])
    return model, rows[name]["settings"]


def part_federated(base: dict[str, Any], out: dict[str, Any]) -> None:
    model, settings = _best_feature_model(out)
    flat = {**base, "dp": False, "partition": "cross-device", **_flat(model),
            "dim": settings["dim"]}
    t0 = time.perf_counter()
    _, rows = run_inprocess(RunConfig.from_flat(flat))
    r20 = float(rows[-1]["recall@20"])
    out["federated"] = {"model": MODELS[model], "recall@20": r20, "rounds": len(rows),
                        "settings": {k: v for k, v in flat.items() if k != "data-dir"},
                        "seconds": time.perf_counter() - t0}
    out["federated_over_als"] = r20 / out["central"]["implicit ALS"]["recall@20"]
    print(f"federated {MODELS[model]}: Recall@20 {r20:.4f}", flush=True)


def _cold_baselines(split: Split, cold: Any) -> dict[str, Any]:
    """The untrained rankings of new items (Recall@20 among them)."""
    res: dict[str, Any] = {"new_items": int(cold.new_items.sum()),
                           "test_ratings": len(cold.test)}
    rng = np.random.default_rng(0)
    res["random"] = float(np.mean([among_new_items(FixedScores(rng.random(split.n_items)),
                                                   cold, KS)["recall@20"] for _ in range(20)]))
    res["popularity among new items (oracle)"] = among_new_items(
        FixedScores(oracle_popularity(cold)), cold, KS)["recall@20"]
    content = content_popularity(cold.train)
    res["content popularity"] = among_new_items(FixedScores(content), cold, KS)["recall@20"]
    # deployable: newest release first (ties by content popularity)
    years = release_years(split.train.titles).astype(np.float64)
    res["newest first"] = among_new_items(
        FixedScores(years * 1000 + content / (content.max(initial=0) + 1)), cold,
        KS)["recall@20"]
    return res


def part_cold_baselines(base: dict[str, Any], out: dict[str, Any]) -> None:
    """Only the untrained rankings of ``item_cold`` (seconds), merged into its results."""
    split = load_split(RunConfig.from_flat(base).data)
    out.setdefault("item_cold_start", {}).update(
        _cold_baselines(split, item_cold_start(split, 0.1, seed=0)))


def part_item_cold(base: dict[str, Any], out: dict[str, Any]) -> None:
    split = load_split(RunConfig.from_flat(base).data)
    cold = item_cold_start(split, 0.1, seed=0)
    warm = Split(cold.train, split.test.subset(~cold.new_items[split.test.items]),
                 split.implicit)
    res = _cold_baselines(split, cold)
    model, settings = _best_feature_model(out)
    # id-dropout chosen on validation: 10% more items held out of the warm training data
    inner = item_cold_start(Split(cold.train, cold.train.subset(np.zeros(len(cold.train),
                                                                         bool)), True),
                            0.1, seed=1)
    inner_split = Split(inner.train, inner.train.subset(np.zeros(len(inner.train), bool)), True)
    val: dict[tuple[Any, ...], float] = {}
    for combo in itertools.product(*COLD_GRID.values()):
        over = dict(zip(COLD_GRID, combo))
        trained, _, _ = _central(base, inner_split, **settings, **over, **{"eval-every": 0})
        val[combo] = among_new_items(trained, inner, KS)["recall@20"]
        print(f"item cold start, validation, {over}: {val[combo]:.4f}", flush=True)
    chosen = dict(zip(COLD_GRID, max(val, key=lambda c: val[c])))
    res["validation"] = [{**dict(zip(COLD_GRID, c)), "recall@20": v} for c, v in val.items()]
    name = (f"{MODELS[model]} (id-dropout {chosen['id-dropout']}, titles "
            f"{chosen['item-text']})")
    runs = [(name, {**settings, **chosen})]
    if len(COLD_GRID["item-text"]) > 1:  # the chosen point with the other title setting
        other = "off" if chosen["item-text"] == "on" else "on"
        runs.append((f"{MODELS[model]} (id-dropout {chosen['id-dropout']}, titles {other})",
                     {**settings, **chosen, "item-text": other}))
    runs.append(("MF", out["central"]["MF"]["settings"]))
    for label, over in runs:
        trained, _, _ = _central(base, warm, **over, **{"eval-every": 0})
        res[label] = among_new_items(trained, cold, KS)["recall@20"]
        print(f"item cold start {label}: {res[label]:.4f}", flush=True)
    out["item_cold_start"] = res
    out["cold_start_over_popularity"] = res[name] / res["popularity among new items (oracle)"]
    out["cold_start_over_content_popularity"] = res[name] / res["content popularity"]


def part_user_cold(base: dict[str, Any], out: dict[str, Any]) -> None:
    split = load_split(RunConfig.from_flat(base).data)
    cut, cold = user_cold_start(split, 0.2, keep=3, seed=0)
    res: dict[str, Any] = {"cold_users": int(cold.sum()), "keep": 3}
    pop = np.bincount(cut.train.items, minlength=split.n_items).astype(float)
    res["popularity"] = sliced_metrics(FixedScores(pop), cut, cold, KS)
    for name in MODELS.values():
        settings = out.get("central", {}).get(name, {}).get("settings")
        if settings is not None:
            trained, _, _ = _central(base, cut, **settings, **{"eval-every": 0})
            res[name] = sliced_metrics(trained, cut, cold, KS)
            print(f"user cold start {name}: cold {res[name]['cold']['recall@20']:.4f} "
                  f"warm {res[name]['warm']['recall@20']:.4f}", flush=True)
    out["user_cold_start"] = {k: ({s: {m: v[s][m] for m in ("recall@20", "ndcg@20", "users")}
                                   for s in v} if isinstance(v, dict) else v)
                              for k, v in res.items()}


def part_rmse(base: dict[str, Any], out: dict[str, Any]) -> None:
    from benchmark_central import run_surprise_svd

    ex = {**base, "feedback": "explicit", "objective": "mse", "batch-size": 256,
          "init-std": 0.01}
    split = load_split(RunConfig.from_flat(ex).data)
    val = load_split(RunConfig.from_flat({**ex, "validation": True}).data)
    res: dict[str, Any] = {"surprise SVD": run_surprise_svd(split, 0)["rmse"]}
    for model in ("mf", "deepfm"):
        best: tuple[float, dict[str, Any]] = (float("inf"), {})
        for dim, lr in itertools.product((8, 32), (0.001, 0.002)):
            over = {"model": model, "dim": dim, "lr": lr, "epochs": 20, "eval-every": 2}
            _, _, rows = _central(ex, val, **over)
            for row in rows:
                if "rmse" in row and row["rmse"] < best[0]:
                    best = (row["rmse"], {**over, "epochs": row["epoch"], "eval-every": 0})
        _, metrics, _ = _central(ex, split, **best[1])
        res[MODELS[model]] = {"rmse": metrics["rmse"], "validation_rmse": best[0],
                              "settings": best[1]}
        print(f"RMSE {MODELS[model]}: {metrics['rmse']:.4f}", flush=True)
    out["rmse"] = res
    out["best_rmse_over_svd"] = min(v["rmse"] for k, v in res.items()
                                    if k != "surprise SVD") / res["surprise SVD"]


PARTS = {"central": part_central, "federated": part_federated, "item_cold": part_item_cold,
         "user_cold": part_user_cold, "rmse": part_rmse,
         "cold_baselines": part_cold_baselines}
OUT = Path("results/benchmark_features.json")


def main() -> None:
    """Run the chosen parts, merging into ``--out``."""
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="ml-100k", choices=DATASETS)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--parts", default=",".join(p for p in PARTS if p != "cold_baselines"),
                    help=f"comma list of {list(PARTS)} (default: all but cold_baselines)")
    ap.add_argument("--max-epochs", type=int, default=MAX_EPOCHS,
                    help="central: epochs of each grid run (the best epoch is chosen on "
                         "validation, every 5)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"central: the models to tune and measure (some of {list(MODELS)})")
    ap.add_argument("--cold-grid", default="",
                    help="item_cold: restrict its validation grid, e.g. 'id-dropout=0.5' or "
                         "'id-dropout=0.5;item-text=off,on' (default: the whole COLD_GRID)")
    ap.add_argument("--lr-grid", default=",".join(map(str, GRID["lr"])),
                    help="central: learning rates tried on validation (comma list)")
    args = ap.parse_args()
    try:
        GRID["lr"] = tuple(float(x) for x in args.lr_grid.split(","))
    except ValueError:
        raise SystemExit(f"--lr-grid: expected numbers separated by commas, got "
                         f"{args.lr_grid!r}") from None
    if args.max_epochs < EVAL_EVERY:
        raise SystemExit(f"--max-epochs: expected an integer >= {EVAL_EVERY}")
    GRID_EPOCHS[0] = args.max_epochs
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        raise SystemExit(f"--models: expected some of {list(MODELS)}, got {args.models!r}")
    CENTRAL_MODELS[:] = models
    for term in filter(None, args.cold_grid.split(";")):
        key, _, values = term.partition("=")
        if key not in COLD_GRID or not values:
            raise SystemExit(f"--cold-grid: expected KEY=V1,V2;... with KEY in "
                             f"{list(COLD_GRID)}, got {term!r}")
        cast = float if key == "id-dropout" else str
        try:
            COLD_GRID[key] = tuple(cast(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--cold-grid: {key} takes numbers, got {values!r}") from None
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; expected some of {list(PARTS)}")
    OUT = Path(args.out)
    import json

    out: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    base = {"dataset": args.dataset, "data-dir": args.data_dir, "split": "fraction",
            "test-fraction": 0.2, "seed": 0}
    try:
        split = load_split(RunConfig.from_flat(base).data)
    except FedrecError as err:
        raise SystemExit(f"--data-dir: {err}") from None
    iv = [v for t, g in zip(split.train.titles, split.train.genres) for v in item_values(t, g)]
    uv = [v for f in split.train.user_features for v in user_values(f)]
    out["features"] = {"item_values": len(set(iv)), "user_values": len(set(uv)),
                       "collisions": collisions(iv, 2048) + collisions(uv, 2048),
                       "split": f"{args.dataset}, per-user temporal 80/20, full ranking"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in parts:
            t0 = time.perf_counter()
            PARTS[part](base, out)
            out.setdefault("seconds", {})[part] = time.perf_counter() - t0
            write_json_atomic(OUT, out)
    print({k: v for k, v in out.items() if k.endswith(("over_als", "over_popularity",
                                                         "over_svd"))})
    print(f"written: {OUT}")


if __name__ == "__main__":
    main()
