"""FedRecStrategy: Flower's FedAvg with fedrec's aggregation, metrics and round log.

Sampling and messaging are FedAvg's. Aggregation is ``fedrec.aggregate`` over the shared
parameters only (row-wise for item tables without DP), after checking every reply:
errors, exhausted budgets and malformed updates are counted and left out. Evaluation
sums the clients' per-user counts into global metrics (``fedrec.metrics``).

User-level DP (``user-dp``, central) is fedrec's own, not Flower's wrapper: replies are
validated by key and dropped if they failed *before* clipping (a failed reply does not
void the round, and a reply cannot reorder its arrays around the clip); each update is
clipped to ``user-clip``; Gaussian noise from an OS-seeded generator is added to the sum;
the per-round noise multipliers are kept in the server checkpoint, so epsilon is exact
after a resume.

Every round ends in ``end_round`` (Flower's ``evaluate_fn`` hook, called once per round
after evaluation): the one place where a round's row is appended, checkpointed and shown.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import compute_distances

from fedrec import keys, privacy
from fedrec.aggregate import (
    ClippedSum,
    MeanAccumulator,
    ServerOptimizer,
    Update,
    UserLevelDP,
    clip_update,
    update_norm,
)
from fedrec.config import RunConfig
from fedrec.metrics import finalize, merge_counts

log = logging.getLogger("fedrec.server")

ARRAYS, METRICS, TOUCHED = "arrays", "metrics", "touched"


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {key: ndarray}."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """{key: ndarray} -> ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def failed(msg: Message, server_round: int, what: str) -> bool:
    """Whether a reply is an error (or has no metrics); logged with the node id."""
    if msg.has_error() or METRICS not in msg.content:
        reason = msg.error.reason if msg.has_error() else "no metrics in the reply"
        log.warning("round %d: %s on node %d failed: %s", server_round, what,
                    msg.metadata.src_node_id, reason)
        return True
    return False


class FedRecStrategy(FedAvg):
    """FedAvg sampling + fedrec aggregation; keeps one row of results per round."""

    def __init__(self, cfg: RunConfig, *, item_keys: list[str], num_nodes: int,
                 display: Callable[[str], None] | None = None,
                 evaluator: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None
                 ) -> None:
        min_train = min(cfg.fed.min_clients, num_nodes)
        # Under record-level DP clients release evaluation counts only with accounted noise
        self.client_eval = cfg.fed.fraction_evaluate > 0 and (
            not cfg.privacy.dp or cfg.privacy.eval_noise_multiplier > 0)
        fraction_evaluate = cfg.fed.fraction_evaluate if self.client_eval else 0.0
        super().__init__(
            fraction_train=cfg.fed.fraction, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train,
            min_evaluate_nodes=min_train if fraction_evaluate > 0 else 0,
            min_available_nodes=num_nodes)
        # one message per round: train replies carry the counts of the model they got
        self.fused = cfg.fused_evaluation and self.client_eval
        # the experimenter's evaluation (simulation only), used when clients do not report
        self.evaluator = evaluator if not self.client_eval else None
        self.user_dp = UserLevelDP(cfg)
        self.cfg = cfg
        self.item_keys = item_keys
        self.server_opt = ServerOptimizer(cfg.fed, item_keys)
        self.display = display
        self.current: dict[str, np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self._row: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self.offset = 0  # rounds done before this run (resume)
        self.sent: dict[str, np.ndarray] = {}
        # clients sampled per round (FedAvg's rule); user-level DP divides by it
        self.expected_clients = max(int(num_nodes * cfg.fed.fraction), min_train)
        self.on_round_end: Callable[[int], None] | None = None  # checkpoint hook
        # user-level DP: persists the noise history as soon as a noised model exists
        self.on_release: Callable[[list[tuple[float, float, int]]], None] | None = None
        self._asked = {"train": 0, "evaluate": 0}  # messages sent this round (for timeouts)
        self._evaluate_received = False  # fused: this round's train messages evaluate

    def resume_from(self, done: int, rows: list[dict[str, Any]],
                    server_opt: dict[str, np.ndarray],
                    user_history: list[tuple[float, float, int]] | None = None) -> None:
        """Continue after ``done`` completed rounds (from a server checkpoint)."""
        self.offset, self.rows = done, list(rows)
        self.server_opt.load_state_dict(server_opt)
        self.user_dp = UserLevelDP(self.cfg, user_history or [])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global arrays sent this round (for untouched rows)."""
        self.current = to_numpy(arrays)
        self.sent = self.current
        self._row = {"round": server_round + self.offset}
        self._t0 = time.perf_counter()
        # fused evaluation: ask for the counts of the model sent only while its round has
        # none (not after a resume of a finished run, whose last model was evaluated)
        previous = self.rows[-1] if self.rows else {}
        self._evaluate_received = (
            self.fused and previous.get("round") == server_round + self.offset - 1
            and "evaluation" not in previous)
        config[keys.EVALUATE_RECEIVED] = int(self._evaluate_received)
        msgs = list(super().configure_train(server_round + self.offset, arrays, config, grid))
        self._asked["train"] = len(msgs)
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Count the evaluation messages sent (replies missing at the deadline = timeouts).

        With fused evaluation only the last round sends evaluate messages: the next
        round's train messages evaluate every other round's model.
        """
        if self.fused and server_round + self.offset < self.cfg.fed.rounds:
            self._asked["evaluate"] = 0
            return []
        msgs = list(super().configure_evaluate(server_round + self.offset, arrays, config,
                                               grid))
        self._asked["evaluate"] = len(msgs)
        return msgs

    def _timeouts(self, phase: str, received: int, server_round: int) -> int:
        """Messages of ``phase`` sent this round whose reply did not come in time."""
        missing = max(0, self._asked[phase] - received)
        if missing:
            log.warning("round %d: %d %s replies missing after round-timeout %g s",
                        server_round + self.offset, missing, phase, self.cfg.fed.round_timeout)
        return missing

    def _valid_update(self, msg: Message) -> Update | str:
        """An Update, or the reason the reply is left out."""
        content = msg.content
        if ARRAYS not in content:
            return "no arrays"
        arrays = to_numpy(content[ARRAYS])
        if set(arrays) != set(self.current):
            return f"keys {sorted(arrays)} differ from the shared keys"
        for k, v in arrays.items():
            if v.shape != self.current[k].shape:
                return f"{k} has shape {v.shape}, expected {self.current[k].shape}"
            if v.dtype != self.current[k].dtype:
                return f"{k} has dtype {v.dtype}, expected {self.current[k].dtype}"
            if not np.all(np.isfinite(v)):
                return f"{k} has non-finite values"
        limit = self.cfg.fed.max_update_norm
        if limit > 0:
            norm = update_norm(arrays, self.current)
            if norm > limit:
                return f"update norm {norm:.3g} exceeds max-update-norm {limit:g}"
        if self.cfg.fed.clip_update_norm > 0:
            arrays = clip_update(arrays, self.current, self.cfg.fed.clip_update_norm)
        metrics = content[METRICS]
        weight = float(metrics.get(keys.NUM_EXAMPLES, 0))
        if not math.isfinite(weight) or weight < 0:
            return f"example count {weight!r} is not a finite number >= 0"
        touched = None
        if TOUCHED in content:
            touched = content[TOUCHED]["items"].numpy()
            rows = (self.current[self.item_keys[0]].shape[0] if self.item_keys else None)
            if (touched.ndim != 1 or (rows is not None and touched.shape[0] != rows)
                    or not np.isin(touched, (0, 1)).all()):
                return (f"item mask of shape {touched.shape} is not a 0/1 vector of "
                        f"{rows} items")
        return Update(arrays, weight, touched)

    def _robust(self, updates: list[Update]) -> dict[str, np.ndarray]:
        """Flower's robust rules over the (validated, possibly clipped) updates.

        Coordinate-wise median (as FedMedian), trimmed mean (FedTrimmedAvg's
        ``trim_mean``) or Krum (MultiKrum's distance rule, one update selected). They
        ignore example weights and item-row masks.
        """
        fed = self.cfg.fed
        if fed.aggregation == "krum":
            dist = compute_distances([to_record(u.arrays) for u in updates])
            closest = max(1, len(updates) - fed.krum_malicious - 2)
            scores = [np.sort(row)[1:closest + 1].sum() for row in dist]
            return dict(updates[int(np.argmin(scores))].arrays)
        out = {}
        for key in self.current:
            stack = np.stack([u.arrays[key] for u in updates]).astype(np.float64)
            agg = (np.median(stack, axis=0) if fed.aggregation == "median"
                   else trim_mean(stack, fed.trim_fraction))
            out[key] = agg.astype(self.current[key].dtype)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check replies, aggregate the shared arrays, summarize training metrics.

        Replies are taken one at a time as the grid yields them; with the default mean
        (and with user-level DP) each valid update is folded into running sums and
        dropped, so the server holds one model's worth of sums, not every client's
        update (robust rules need them all).
        """
        eps: list[float] = []
        losses: list[tuple[float, float]] = []
        exhausted = rejected = failures = received = 0
        user_dp = self.cfg.privacy.user_dp
        no_masks = (self.cfg.fed.item_weighting == "uniform" or self.cfg.privacy.dp
                    or user_dp)
        stream = self.cfg.fed.aggregation == "mean"
        acc = MeanAccumulator(self.current, self.item_keys)
        clipped = ClippedSum(self.current, self.cfg.privacy.user_clip) if user_dp else None
        updates: list[Update] = []
        evaluated: list[dict[str, float]] = []
        for msg in replies:
            received += 1
            if failed(msg, server_round, "training"):
                failures += 1
                continue
            if self._evaluate_received and keys.EVALUATION in msg.content:
                evaluated.append(dict(msg.content[keys.EVALUATION]))
            metrics = msg.content[METRICS]
            eps.append(float(metrics.get(keys.EPSILON, 0.0)))
            if int(metrics.get(keys.EXHAUSTED, 0)):
                exhausted += 1
                continue
            upd = self._valid_update(msg)
            if isinstance(upd, str):
                rejected += 1
                log.warning("round %d: update of node %d dropped: %s", server_round,
                            msg.metadata.src_node_id, upd)
                continue
            if no_masks:
                upd.touched = None
            if keys.TRAIN_LOSS in metrics:
                losses.append((float(metrics[keys.TRAIN_LOSS]), upd.weight))
            else:
                losses.append((math.nan, upd.weight))
            if clipped is not None:
                clipped.add(upd.arrays)
            elif stream:
                acc.add(upd)
            else:
                updates.append(upd)
        timeouts = self._timeouts("train", received, server_round)
        done = server_round + self.offset
        if self._evaluate_received:
            self._fill_previous(evaluated, received - len(evaluated), timeouts)
        if clipped is not None:
            new = self._user_level_step(clipped, done)
        elif not stream and updates:
            new = self.server_opt.step_from_average(self._robust(updates), self.current)
        else:
            new = self.server_opt.step_accumulated(acc)
        known = [(v, w) for v, w in losses if math.isfinite(v)]
        n_ex = sum(w for _, w in known)
        summary = {
            "clients": len(losses), "failures": failures, "timeouts": timeouts,
            "exhausted": exhausted, "rejected": rejected,
            "epsilon-max": max(eps) if eps else 0.0,
            "epsilon-mean": float(np.mean(eps)) if eps else 0.0,
        }
        if n_ex:  # DP clients send no loss
            summary["train-loss"] = sum(v * w for v, w in known) / n_ex
        if not self.cfg.privacy.dp:
            summary[keys.NUM_EXAMPLES] = sum(w for _, w in losses)
        self._row.update(summary)
        self.current = new
        return to_record(new), MetricRecord({k: float(v) for k, v in summary.items()
                                             if not (isinstance(v, float) and math.isnan(v))})

    def _user_level_step(self, clipped: ClippedSum, done: int) -> dict[str, np.ndarray]:
        """User-level DP step (``fedrec.aggregate.UserLevelDP``); facts go in the row."""
        new, facts = self.user_dp.step(clipped, done, self.expected_clients, self.server_opt)
        if facts.get("user-exhausted"):
            log.warning("round %d: user-level budget spent: model left unchanged", done)
        elif self.on_release is not None:  # recorded before the noised model goes out
            self.on_release(self.user_dp.history)
        self._row.update(facts)
        return new

    @property
    def user_history(self) -> list[tuple[float, float, int]]:
        """The user-level accountant history (checkpointed)."""
        return self.user_dp.history

    def user_epsilon(self) -> float:
        """User-level epsilon of the rounds noised so far (exact across resumes)."""
        return self.user_dp.epsilon()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Sum per-user counts from the clients into global metrics (noised under DP)."""
        parts = []
        failures = received = 0
        for msg in replies:
            received += 1
            if failed(msg, server_round, "evaluation"):
                failures += 1
                continue
            parts.append(dict(msg.content[METRICS]))
        if not self.client_eval or (self.fused and not self._asked["evaluate"]):
            return None
        timeouts = self._timeouts("evaluate", received, server_round)
        metrics = self._eval_row(self._row, parts, failures, timeouts)
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        return MetricRecord(clean) if clean else None

    def _eval_row(self, row: dict[str, Any], parts: list[dict[str, float]], failures: int,
                  timeouts: int) -> dict[str, float]:
        """Merge clients' counts into ``row``'s metrics; return the metrics."""
        eps = [float(c.pop(keys.EPSILON)) for c in parts if keys.EPSILON in c]
        for counts in parts:
            counts.pop(keys.NUM_EXAMPLES, None)
        metrics = finalize(merge_counts(parts), self.cfg.eval.ks)
        row.update(metrics)
        row["evaluation"] = "clients (noised)" if self.cfg.privacy.dp else "clients"
        if eps:
            row["epsilon-max"] = max(row.get("epsilon-max", 0.0), max(eps))
        row["eval-clients"] = len(parts)
        row["eval-failures"] = failures
        row["eval-timeouts"] = timeouts
        return metrics

    def _fill_previous(self, parts: list[dict[str, float]], failures: int,
                       timeouts: int) -> None:
        """Fused evaluation: the counts in this round's train replies are those of the
        previous round's model; they complete its row (checkpointed with this round)."""
        row = self.rows[-1]
        self._eval_row(row, parts, failures, timeouts)
        if self.display is not None:
            self.display(format_round(row, self.cfg, evaluated_only=True))

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The end of a round (Flower's ``evaluate_fn`` hook; round 0 is the start).

        Adds the experimenter's metrics when clients do not report, then appends the
        round's row once, checkpoints it and shows it.
        """
        if server_round == 0:
            return None
        metrics: dict[str, float] = {}
        if self.evaluator is not None:
            metrics = self.evaluator(self.current)
            self._row.update(metrics)
            self._row["evaluation"] = "experimenter (simulation)"
        self._row["seconds"] = time.perf_counter() - self._t0
        self._row["messages"] = self._asked["train"] + self._asked["evaluate"]
        self.rows.append(dict(self._row))
        if self.on_round_end is not None:
            self.on_round_end(server_round + self.offset)
        if self.display is not None:
            self.display(format_round(self._row, self.cfg))
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        return MetricRecord(clean) if clean else None


def format_round(row: dict[str, Any], cfg: RunConfig, *, evaluated_only: bool = False
                 ) -> str:
    """One line of the live per-round display (``evaluated_only``: a round's metrics
    that arrived with the next round's messages)."""
    k_small, k_big = min(cfg.eval.ks), max(cfg.eval.ks)

    def f(key: str) -> str:
        v = row.get(key)
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "   -  "

    scores = (f"P@{k_small} {f(f'precision@{k_small}')}  R@{k_small} "
              f"{f(f'recall@{k_small}')}  R@{k_big} {f(f'recall@{k_big}')}  NDCG@{k_big} "
              f"{f(f'ndcg@{k_big}')}")
    if evaluated_only:
        return (f"round {row['round']:>3}/{cfg.fed.rounds}  evaluated by "
                f"{row.get('eval-clients', 0):>4}  {scores}")
    text = (f"round {row['round']:>3}/{cfg.fed.rounds}  clients {row.get('clients', 0):>4}"
            f"  loss {f('train-loss')}  {scores}")
    if cfg.privacy.dp:
        text += f"  eps max {row.get('epsilon-max', 0):.2f} mean {row.get('epsilon-mean', 0):.2f}"
    if "user-epsilon" in row:
        text += f"  user eps {row['user-epsilon']:.2f}"
    if not privacy.noise_is_secret(cfg.privacy) and (cfg.privacy.dp or cfg.privacy.user_dp):
        text += "  [noise NOT secret]"
    if row.get("exhausted"):
        text += f"  exhausted {row['exhausted']}"
    if row.get("failures") or row.get("rejected") or row.get("timeouts"):
        text += (f"  failed {row.get('failures', 0)} timed out {row.get('timeouts', 0)}"
                 f" rejected {row.get('rejected', 0)}")
    return text + f"  ({row.get('seconds', 0):.1f}s)"
