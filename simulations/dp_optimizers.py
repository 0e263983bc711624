"""Post-processing that might lift centralized DP-SGD: averaged parameters and DP-AdamBC.

Both use only what DP-SGD already released (the noisy gradients and the public noise
scale), so they cost no privacy. Measured on the validation split carved from training
(the test split is never read), centralized DP at the ``central-dp`` recipe:

- ``adam``: the default (Adam on the noisy gradient), with exponential moving averages
  of the parameters (decays ``--ema``) evaluated at the end of the same run;
- ``adambc``: Adam whose second moment has the DP noise variance
  ``(sigma * C / expected batch)^2`` subtracted (floored at ``gamma`` times it), as in
  Tang et al., "DP-AdamBC" (AAAI 2024): without it Adam on noisy gradients behaves like
  sign descent with a noise-sized denominator.

    python simulations/dp_optimizers.py --data-dir ../shared/datasets/ml-100k \\
        --out results/dp_optimizers.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fedrec.central as central  # noqa: E402
from fedrec.config import RunConfig  # noqa: E402
from fedrec.data import load_split  # noqa: E402
from fedrec.errors import FedrecError  # noqa: E402
from fedrec.evaluate import evaluate_counts  # noqa: E402
from fedrec.metrics import finalize  # noqa: E402
from fedrec.report import write_json_atomic  # noqa: E402


class AdamBC(torch.optim.Optimizer):
    """Adam with the (public) DP noise variance ``phi`` removed from its second moment."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, gamma: float,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        super().__init__(params, {"lr": lr, "betas": betas})
        self.gamma = gamma
        self.phi = 0.0  # set once the DP optimizer's sigma, C and batch are known

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["t"])
                v_hat = st["v"] / (1 - b2 ** st["t"])
                denom = (v_hat - self.phi).clamp_min(self.gamma * self.phi).sqrt_()
                p.add_(m_hat / denom, alpha=-group["lr"])


def run(flat: dict[str, Any], *, adambc: tuple[float, float] | None,
        emas: tuple[float, ...]) -> dict[str, float]:
    """Validation Recall@20 of one centralized DP run (and of its parameter averages)."""
    cfg = RunConfig.from_flat({**flat, "validation": True, "eval-every": 0})
    split = load_split(cfg.data)
    held: dict[str, Any] = {}
    build_model, build_optimizer = central.build_model, central.build_optimizer
    set_batch = central.privacy.set_expected_batch_size

    def model_hook(*args: Any, **kwargs: Any) -> torch.nn.Module:
        held["model"] = build_model(*args, **kwargs)
        return held["model"]

    def optimizer_hook(params: Any, train: Any) -> torch.optim.Optimizer:
        if adambc is None:
            return build_optimizer(params, train)
        held["opt"] = AdamBC(params, lr=adambc[0], gamma=adambc[1])
        return held["opt"]

    def batch_hook(optimizer: Any, size: float) -> None:
        set_batch(optimizer, size)
        if adambc is not None:
            held["opt"].phi = (optimizer.noise_multiplier * optimizer.max_grad_norm
                               / optimizer.expected_batch_size) ** 2

    averages: dict[float, dict[str, torch.Tensor]] = {}

    def on_step() -> None:
        for decay in emas:
            params = dict(held["model"].named_parameters())
            avg = averages.setdefault(decay, {n: p.detach().clone() for n, p in params.items()})
            for name, p in params.items():
                avg[name].mul_(decay).add_(p.detach(), alpha=1 - decay)

    central.build_model, central.build_optimizer = model_hook, optimizer_hook
    central.privacy.set_expected_batch_size = batch_hook
    try:
        model, metrics, _ = central.run_centralized(cfg, split, on_step=on_step)
    finally:
        central.build_model, central.build_optimizer = build_model, build_optimizer
        central.privacy.set_expected_batch_size = set_batch
    out = {"recall@20": float(metrics["recall@20"]), "epsilon": float(metrics["epsilon"])}
    with torch.no_grad():
        for decay, avg in averages.items():
            for name, p in model.named_parameters():
                p.copy_(avg[name])
            counts = evaluate_counts(model, split.train, split.test, ks=cfg.eval.ks,
                                     implicit=split.implicit)
            out[f"ema{decay}_recall@20"] = float(finalize(counts, cfg.eval.ks)["recall@20"])
    return out


def main() -> None:
    """Run the variants one after another and print validation Recall@20."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="MovieLens 100K folder")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--ema", default="0.9,0.99,0.999", help="parameter-average decays")
    ap.add_argument("--adambc", default="0.01:0.1,0.02:1",
                    help="AdamBC variants lr:gamma (comma list)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per variant, in turn (DP noise differs run to run)")
    ap.add_argument("--out", default="results/dp_optimizers.json")
    args = ap.parse_args()
    flat = {"dataset": "ml-100k", "data-dir": args.data_dir, "dp": True,
            "target-epsilon": args.epsilon}
    try:
        emas = tuple(float(d) for d in args.ema.split(",") if d)
    except ValueError:
        ap.error(f"--ema {args.ema!r}: expected decays such as 0.9,0.99")
    variants: dict[str, tuple[float, float] | None] = {"adam (default)": None}
    for spec in filter(None, args.adambc.split(",")):
        try:
            lr, gamma = (float(v) for v in spec.split(":"))
        except ValueError:
            ap.error(f"--adambc {spec!r}: expected lr:gamma such as 0.02:1")
        variants[f"adambc lr {lr} gamma {gamma}"] = (lr, gamma)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.repeats):
            for name, bc in variants.items():
                t0 = time.perf_counter()
                runs[name].append(run(flat, adambc=bc, emas=emas if bc is None else ()))
                shown = ", ".join(f"{k} {v:.4f}" for k, v in runs[name][-1].items())
                print(f"{name:<28} {shown} ({time.perf_counter() - t0:.0f}s)", flush=True)
    results = {}
    for name, rs in runs.items():
        values = [r["recall@20"] for r in rs]
        results[name] = {"runs": rs, "recall@20_mean": statistics.fmean(values),
                         "recall@20_std": statistics.stdev(values) if len(values) > 1 else 0.0}
        print(f"{name:<28} mean Recall@20 {results[name]['recall@20_mean']:.4f} ± "
              f"{results[name]['recall@20_std']:.4f} over {len(values)} runs")
    write_json_atomic(Path(args.out), {"epsilon": args.epsilon, "split": "validation",
                                       "results": results})


if __name__ == "__main__":
    try:
        main()
    except FedrecError as err:  # bad data dir or config: one line, no traceback
        raise SystemExit(f"error: {err}") from None
