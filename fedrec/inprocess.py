"""Federated rounds in one process, without Flower: for sweeps and quality benchmarks.

Each round calls the same functions the Flower apps call (``fit_client``,
``aggregate``, ``evaluate_client``) for every client in turn; client state (user
embeddings, privacy ledgers) is kept in memory instead of state files. With
``fraction = 1`` and no DP the results equal a Flower simulation with the same config
(``tests/test_apps.py`` checks this); Flower adds messaging and process isolation, not
arithmetic. Use ``fedrec simulate`` to exercise the real apps.

Metrics here are the experimenter's: exact counts from every client's held-out data,
computed in this process (nothing is released by a client), also under DP.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedrec import privacy
from fedrec.aggregate import ClippedSum, MeanAccumulator, ServerOptimizer, Update, UserLevelDP
from fedrec.batched import fit_clients, owed_noise, unsupported
from fedrec.config import RunConfig
from fedrec.ddp import PRIOR_KEY, DDPServer, skellam_shares
from fedrec.errors import ConfigError
from fedrec.evaluate import evaluate_counts, full_ranking_user_counts
from fedrec.features import model_features
from fedrec.federated import (
    FitResult,
    cached_split,
    ddp_allows,
    ddp_client_round,
    evaluate_client,
    fit_client,
    flatten,
    init_shared,
    initial_local,
    item_keys,
    shared_order,
    split_for_parts,
    unflatten,
)
from fedrec.metrics import finalize, merge_counts
from fedrec.model import build_model
from fedrec.partition import partition_users
from fedrec.privacy import BudgetError
from fedrec.state import ClientState, Ledger
from fedrec.train import resolve_device

Arrays = dict[str, np.ndarray]


def _federation(cfg: RunConfig) -> tuple[Any, list[np.ndarray], list[Any], Arrays]:
    """(the split, every partition's global user ids and client data, the initial shared
    arrays)."""
    split = cached_split(cfg.data)
    parts = partition_users(cfg.fed.partition, split.n_users, cfg.fed.num_clients,
                            cfg.data.seed)
    return split, parts, split_for_parts(split, parts), init_shared(cfg, split.n_items)


def _global_model(cfg: RunConfig, split: Any, parts: list[np.ndarray], clients: list[Any],
                  shared: Arrays, states: list[ClientState | None]) -> Any:
    """One model holding the shared arrays and every client's user tables (a client
    without state: its fresh tables, as ``_model`` gives it)."""
    model = build_model(cfg.model, split.n_users, split.n_items, offset=clients[0].offset,
                        features=model_features(cfg, split.train))
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in shared.items()}
    local = model.local_state_dict()
    for i, users in enumerate(parts):
        state = states[i]
        own = (state.local if state is not None and state.local else  # as _model does
               initial_local(cfg, len(users), cfg.data.seed + i))
        for key in local:
            local[key][torch.from_numpy(users)] = torch.as_tensor(own[key])
    model.load_state_dict({**tensors, **local})
    return model.to(resolve_device(cfg.train.device))


def _one_pass(cfg: RunConfig) -> bool:
    """Whether a user's counts depend only on their embedding, the shared model and their
    own data (full ranking or a fixed negatives file): then one global model evaluates
    every client at once. Sampled negatives are drawn per client (its seed)."""
    return cfg.data.eval_negatives == 0


def _experimenter_counts(cfg: RunConfig, split: Any, parts: list[np.ndarray],
                         clients: list[Any], shared: Arrays,
                         states: list[ClientState | None]) -> dict[str, float]:
    """Every client's exact evaluation counts, summed: ``evaluate_client`` per client,
    or one pass through ``_global_model`` where that gives the same sum (``_one_pass``).
    """
    if not _one_pass(cfg):
        return merge_counts([evaluate_client(cfg, c, shared, states[i],
                                             seed=cfg.data.seed + i)
                             for i, c in enumerate(clients)])
    model = _global_model(cfg, split, parts, clients, shared, states)
    return evaluate_counts(model, split.train, split.test, ks=cfg.eval.ks,
                           implicit=split.implicit, eval_negatives=0, seed=cfg.data.seed)


def _client_counts(cfg: RunConfig, split: Any, parts: list[np.ndarray], clients: list[Any],
                   shared: Arrays, states: list[ClientState | None], which: list[int]
                   ) -> dict[int, dict[str, float]]:
    """``evaluate_client``'s ranking counts of each client in ``which`` (the model it
    holds: ``shared`` and its own user tables), in one pass where ``_one_pass``; clients
    left out are evaluated by the caller."""
    if not which or not _one_pass(cfg) or split.test.negatives is not None:
        return {}
    model = _global_model(cfg, split, parts, clients, shared, states)
    users, per_user = full_ranking_user_counts(model, split.train, split.test, cfg.eval.ks)
    owner = np.full(split.n_users, -1)
    for i in which:
        owner[parts[i]] = i
    mine = owner[users]
    valid = mine >= 0
    tested = np.bincount(mine[valid], minlength=len(clients)) > 0
    out: dict[int, dict[str, float]] = {i: {} for i in which}  # no test user: {}
    for key, values in per_user.items():
        sums = np.bincount(mine[valid], weights=values[valid], minlength=len(clients))
        for i in which:
            if tested[i]:
                out[i][key] = float(sums[i])
    return out


def _sample(cfg: RunConfig, n: int, rng: np.random.Generator) -> list[int]:
    """Clients sampled for a round, by FedAvg's rule."""
    k = max(min(cfg.fed.min_clients, n), int(cfg.fed.fraction * n))
    return list(range(n)) if k >= n else sorted(rng.choice(n, k, replace=False).tolist())


def run_inprocess(cfg: RunConfig, on_round: Callable[[dict[str, Any]], None] | None = None,
                  *, dropouts: float = 0.0, engine: str = "auto", exact_noise: bool = False
                  ) -> tuple[Arrays, list[dict[str, Any]]]:
    """Run ``rounds`` federated rounds over all partitions; returns (shared, rows).

    Each row holds the round's aggregated metrics, ``epsilon-max``/``epsilon-mean``,
    ``clients``, ``exhausted`` and ``seconds``, like a ``fedrec simulate`` round row.
    ``dropouts`` (distributed DP only; experiments) makes that share of the sampled
    clients drop after masking, at random each round: their updates and noise shares
    are missing from the sum, as with SecAgg+'s recovery.

    ``engine``: ``"loop"`` calls ``fit_client`` for each client in turn; ``"batched"``
    trains the round's clients side by side (``fedrec.batched``: same updates to float
    tolerance; record-level DP for MF with SGD clients only; under distributed DP each
    client still encodes its own release); ``"auto"`` takes the batched engine where it
    applies. ``exact_noise``: the batched engine draws record-level DP noise step by
    step in Opacus's order on every row (the numbers ``fit_client`` draws from the same
    stream; for equality tests) instead of lazily, a draw per read (same distribution).

    Runs with one torch thread, as each Flower client does: summation order then
    matches the Flower path exactly (more threads change the last bits, and a near-tie
    in a ranking can flip). The caller's thread count is restored afterwards. numpy's
    BLAS runs one thread too: a sweep runs a point per core, and BLAS threads waiting
    for a busy core made a distributed-DP round 2.4x slower (``norm`` of each update).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            return _run(cfg, on_round, dropouts, engine, exact_noise)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: RunConfig, on_round: Callable[[dict[str, Any]], None] | None,
         dropouts: float, engine: str, exact_noise: bool
         ) -> tuple[Arrays, list[dict[str, Any]]]:
    """``run_inprocess`` at the caller's thread setting."""
    if engine not in ("auto", "loop", "batched"):
        raise ConfigError(f"engine {engine!r}: expected 'auto', 'loop' or 'batched'")
    why = unsupported(cfg)
    if engine == "batched" and why:
        raise ConfigError(f"engine 'batched': {why}; use engine 'loop'")
    batched = engine == "batched" or (engine == "auto" and why is None)
    if cfg.privacy.ddp:
        return _run_ddp(cfg, on_round, dropouts, batched, exact_noise)
    if cfg.fed.aggregation != "mean":
        raise ConfigError(f"aggregation {cfg.fed.aggregation!r}: robust rules run through "
                          "Flower's strategies; use fedrec simulate")
    if cfg.fed.fault_rate > 0:
        raise ConfigError("fault-rate: fault injection runs through Flower's messaging; use "
                          "fedrec simulate")
    split, parts, clients, shared = _federation(cfg)
    keys = item_keys(cfg, split.n_items)
    server = ServerOptimizer(cfg.fed, keys)
    states: list[ClientState | None] = [None] * len(clients)
    ledgers: list[Ledger | None] = [None] * len(clients)
    user_dp = UserLevelDP(cfg) if cfg.privacy.user_dp else None
    rng = np.random.default_rng(cfg.data.seed)
    # record-level DP, batched: the noise rows still owe after the clients' last steps is
    # one draw for the sum (fit_clients(fold_noise=True)); not where each update is
    # clipped whole (user-level DP on top), which must see all of its noise
    fold = batched and cfg.privacy.dp and user_dp is None and not exact_noise
    rows: list[dict[str, Any]] = []
    for rnd in range(1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        chosen = _sample(cfg, len(clients), rng)
        n_sample = len(chosen)
        acc = MeanAccumulator(shared, keys)
        clipped = ClippedSum(shared, cfg.privacy.user_clip, keys) if user_dp else None
        eps, losses, exhausted = [], [], 0
        owed = np.zeros(split.n_items)
        if batched:
            fits: Iterator[tuple[int, FitResult]] = (
                (chosen[j], res) for j, res in fit_clients(
                    cfg, [clients[i] for i in chosen], shared, [states[i] for i in chosen],
                    [ledgers[i] for i in chosen], seeds=[cfg.data.seed + i for i in chosen],
                    server_round=rnd, exact_noise=exact_noise, fold_noise=fold,
                    as_rows=True))
        else:
            fits = ((i, fit_client(cfg, clients[i], shared, states[i], ledgers[i],
                                   seed=cfg.data.seed + i, server_round=rnd)) for i in chosen)
        for i, res in fits:
            eps.append(res.epsilon)
            if res.shared is None:
                exhausted += int(res.exhausted)
                continue
            states[i], ledgers[i] = res.state, res.ledger
            # fit_client sends no mask under DP or with uniform weighting
            if clipped is not None:
                clipped.add(res.shared, res.rows)
            else:
                acc.add(Update(res.shared, res.weight, res.touched, res.rows))
            if res.owed is not None:
                owed += res.owed
            losses.append((res.loss, res.num_examples))
        if fold and acc.count:
            acc.add_noise(owed_noise(owed, shared, keys, privacy.dp_generator(
                cfg.privacy, rnd, privacy.CHUNK_NOISE)))
        facts: dict[str, Any] = {}
        if user_dp is not None and clipped is not None:
            shared, facts = user_dp.step(clipped, rnd, n_sample, server)
        else:
            shared = server.step_accumulated(acc)
        counts = _experimenter_counts(cfg, split, parts, clients, shared, states)
        n_ex = sum(w for _, w in losses)
        row: dict[str, Any] = {
            "round": rnd, "clients": len(losses), "exhausted": exhausted, **facts,
            "train-loss": sum(v * w for v, w in losses) / n_ex if n_ex else math.nan,
            "epsilon-max": max(eps, default=0.0),
            "epsilon-mean": float(np.mean(eps)) if eps else 0.0,
            **finalize(counts, cfg.eval.ks),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return shared, rows


def _run_ddp(cfg: RunConfig, on_round: Callable[[dict[str, Any]], None] | None,
             dropouts: float, batched: bool, exact_noise: bool
             ) -> tuple[Arrays, list[dict[str, Any]]]:
    """Distributed user-level DP (``fedrec.ddp``): the clients' integers are summed here
    exactly as SecAgg+ sums them; R training releases and a final evaluation release.

    ``batched``: the clients that take part in a release are evaluated in one pass
    (``_client_counts``) and trained side by side (``fit_clients``); each encodes its own
    clipped, rounded release (``ddp_client_round``), and, unless ``exact_noise``, the
    survivors' noise shares are added to the sum as the one Skellam draw they add up to
    (``fedrec.ddp.skellam_shares``, from an OS-seeded generator): the server sees only
    the sum, whose distribution this keeps."""
    split, parts, clients, shared = _federation(cfg)
    order = shared_order(cfg, split.n_items)
    prior = cfg.privacy.ddp_prior and PRIOR_KEY in shared
    server = DDPServer(cfg, int(sum(v.size for v in shared.values())), split.n_items,
                       prior=prior)
    opt = ServerOptimizer(cfg.fed, item_keys(cfg, split.n_items))
    states: list[ClientState | None] = [None] * len(clients)
    ledgers: list[Ledger | None] = [None] * len(clients)
    rng = np.random.default_rng(cfg.data.seed)
    drop_rng = np.random.default_rng(cfg.data.seed + 1)
    fold = batched and not exact_noise
    rows: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    for release in range(0 if prior else 1, cfg.fed.rounds + 2):
        t0 = time.perf_counter()
        train = 1 <= release <= cfg.fed.rounds
        task = "train" if train else ("prior" if release == 0 else "evaluate")
        chosen = _sample(cfg, len(clients), rng) if train else list(range(len(clients)))
        try:
            plan = server.plan(len(chosen), release)
        except BudgetError:
            break
        dropped = set(drop_rng.choice(chosen, int(round(dropouts * len(chosen))),
                                      replace=False).tolist()) if dropouts else set()
        total = np.zeros(plan.dim, np.int64)
        survivors = refused = 0
        active = [i for i in chosen if i not in dropped]
        counts: dict[int, dict[str, float]] = {}
        replies: Iterator[tuple[int, FitResult | None]] = ((i, None) for i in active)
        if batched and task != "prior":
            taking = [i for i in active if ddp_allows(cfg, ledgers[i], plan)]
            counts = _client_counts(cfg, split, parts, clients, shared, states, taking)
            if train:  # streamed: a release never holds every client's update at once
                refusing = set(active) - set(taking)
                replies = itertools.chain(
                    ((taking[j], res) for j, res in fit_clients(
                        cfg, [clients[i] for i in taking], shared,
                        [states[i] for i in taking], [ledgers[i] for i in taking],
                        seeds=[cfg.data.seed + i for i in taking], server_round=release)),
                    ((i, None) for i in active if i in refusing))
        for i, fit in replies:
            rep = ddp_client_round(cfg, clients[i], shared, states[i], ledgers[i], plan,
                                   seed=cfg.data.seed + i, server_round=release, task=task,
                                   fit=fit, counts=counts.get(i), share=not fold)
            if rep.ints is None:
                refused += 1
                continue
            states[i], ledgers[i] = rep.state, rep.ledger
            total += rep.ints
            survivors += 1
        if fold and survivors:
            total += skellam_shares(plan, survivors, np.random.default_rng(privacy.dp_seed(
                cfg.privacy, release, privacy.CHUNK_NOISE)))
        server.account(plan, survivors)
        if task == "prior":
            shared = server.apply_prior(total, plan, shared)
            continue
        mean, counts = server.mean_update(total, plan, len(chosen))
        if pending is not None:  # these counts measure the model the clients received
            released = finalize(counts, cfg.eval.ks)
            pending.update({f"released-{k}": v for k, v in released.items()})
            pending["user-epsilon"] = server.epsilon()
            rows.append(pending)
            if on_round is not None:
                on_round(pending)
            pending = None
        if train:
            avg = unflatten(flatten(shared, order) + mean, shared, order)
            shared = opt.step_from_average(avg, shared)
            exact = _experimenter_counts(cfg, split, parts, clients, shared, states)
            pending = {"round": release, "clients": survivors, "dropped": len(dropped),
                       "refused": refused, "user-noise-multiplier":
                       math.sqrt(2 * plan.mu_total) / plan.l2,
                       "user-epsilon": server.epsilon(),
                       **finalize(exact, cfg.eval.ks),
                       "evaluation": "experimenter; released-*: secure sum (noised)",
                       "seconds": time.perf_counter() - t0}
    if pending is not None:  # the budget ran out before the evaluation release
        rows.append(pending)
    return shared, rows
