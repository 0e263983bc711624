"""Many clients' local training at once, as batched tensors: the batched client engine.

It runs ``fedrec.federated.fit_client``'s semantics: each client gets its own copy of the
shared rows it reads, its own user embeddings and its own optimizer state; its examples,
negatives and batch order come from the seeds ``fit_client`` uses (under record-level DP
its OS-seeded generators with ``exact_noise``, else one OS-seeded generator per chunk of
clients for its noise, Poisson batches and negatives), so both give the same update to
float tolerance (``tests/test_batched.py``). The clients' steps run side by side, on the rows each
step reads (gathered from and added back to the clients' stacked tables by flat
``index_select``/``index_add_``), scored by ``torch.func.vmap`` over one model (MF in
closed form): a one-user client's ~85 ratings in steps of 16 no longer pay a model
build, an optimizer and a Python loop each.

Without DP on the device (no DP; user-level DP, clipped and noised at the server) only
the rows a client reads are copied (padded to the largest client of a chunk); rows it
never reads keep their value, as under ``fit_client`` when no weight decay moves them.
Record-level DP-SGD (MF, SGD clients) is Opacus's step done for every client at once
(``_train_chunk_dp``). Under distributed DP the clients train without DP (batched); each
then encodes its own clipped, rounded update (``fedrec.federated.ddp_client_round``; its
noise share too, unless the in-process sum draws the survivors' shares at once).
Other models or Adam under record-level DP, and weight decay, stay on ``fit_client``:
``unsupported`` says why.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap

from fedrec import privacy
from fedrec.config import FEATURE_MODELS, RunConfig
from fedrec.data import ExampleBuilder
from fedrec.errors import PrivacyError, StateError
from fedrec.federated import (
    ClientData,
    DPPlan,
    FitResult,
    _model,
    client_dp_plan,
    initial_local,
)
from fedrec.model import MF, build_model
from fedrec.privacy import RowLoss, lookup_sq_norms
from fedrec.state import ClientState, Ledger
from fedrec.train import batch_indices, resolve_device, steps_per_epoch

Arrays = dict[str, np.ndarray]

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults (build_optimizer)


def unsupported(cfg: RunConfig) -> str | None:
    """Why this config's clients cannot train batched (None: they can)."""
    if cfg.privacy.dp and (cfg.model.model != "mf" or cfg.train.optimizer != "sgd"):
        return ("record-level DP runs batched for MF with SGD clients only (other models "
                "and Adam train each client through Opacus)")
    if cfg.model.model in FEATURE_MODELS:
        return ("models with side features train each client with its own users' "
                "features, one client after another")
    if cfg.train.weight_decay > 0:
        return "weight decay moves rows a client never reads"
    return None


@dataclasses.dataclass
class _Plan:
    """One client's round, laid out before training: its steps and the rows they read."""

    index: int  # position in the caller's client list
    data: ClientData
    state: ClientState
    ledger: Ledger
    builder: ExampleBuilder | None  # None: examples drawn for its whole chunk at once
    rows: np.ndarray  # sorted global item rows it holds: at least those its steps read
    # (all under DP with exact_noise)
    examples: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (users, items, targets)
    # of every step, back to back (items: indices into ``rows``)
    lengths: list[int]  # examples of each step
    epochs: list[int]  # epoch of each step
    local: dict[str, torch.Tensor]  # user tensors at the start of the round
    dp: DPPlan | None = None  # record-level DP: q, steps, sigma of this round
    noise: torch.Generator | None = None  # record-level DP, exact_noise: its noise source
    stream: tuple[int, int] = (0, 0)  # (seed, round): names its test-only DP streams


def _plan(cfg: RunConfig, index: int, data: ClientData, state: ClientState | None,
          ledger: Ledger | None, seed: int, server_round: int, exact_noise: bool,
          streams: tuple[torch.Generator, np.random.Generator] | None = None
          ) -> _Plan | FitResult:
    """fit_client's examples and batch order for one client (same seeds, same draws);
    under record-level DP, its Poisson batches (and, for ``exact_noise``, its own noise
    source), or the FitResult of a client whose budget does not allow the round.
    ``streams``: under record-level DP, the (sampling, negatives) generators of its chunk,
    instead of a pair of its own (same distribution; fit_client's draws need its own)."""
    pcfg = cfg.privacy
    ledger = ledger or Ledger(delta=pcfg.delta if pcfg.dp else 0.0,
                              unit=privacy.UNIT_OF_PRIVACY if pcfg.dp else "")
    state = state or ClientState(user_ids=list(data.user_ids))
    dp = client_dp_plan(cfg, ledger, server_round) if pcfg.dp else None
    if pcfg.dp and dp is None:
        return FitResult(None, None, 0, math.nan, ledger.epsilon, True, 0.0, state, ledger)
    noise = None
    fresh = initial_local(cfg, data.n_users, seed)
    local = fresh
    if state.local:  # fit_client's checks of a state file (``_model``)
        if state.user_ids != data.user_ids:
            raise StateError(f"client state holds users {state.user_ids[:3]}..., but this "
                             f"client has {data.user_ids[:3]}...")
        bad = [k for k in fresh if k not in state.local
               or tuple(state.local[k].shape) != tuple(fresh[k].shape)]
        if bad:
            raise StateError(f"client state: local tensors {bad} missing or of another shape")
        local = {k: torch.as_tensor(state.local[k]) for k in fresh}
    if streams is not None and (cfg.uniform_negatives or not data.implicit):
        empty = torch.zeros(0, dtype=torch.long)  # drawn with its chunk (_sample_chunk)
        return _Plan(index, data, state, ledger, None, np.zeros(0, np.int64),
                     (empty, empty, empty), [], [], local, dp, None, (seed, server_round))
    if dp is not None:
        stream = (seed, server_round)
        neg: int | np.random.Generator
        if streams is not None:
            gen, neg = streams
        else:
            neg = np.random.default_rng(privacy.dp_seed(pcfg, *stream, privacy.NEGATIVES))
            gen = privacy.dp_generator(pcfg, *stream, privacy.SAMPLING)
        if exact_noise:  # else the chunk's generator draws its noise
            noise = privacy.dp_generator(pcfg, *stream, privacy.NOISE)
    else:
        neg = seed * 7919 + server_round
        gen = torch.Generator().manual_seed(seed * 104729 + server_round)
    builder = ExampleBuilder(data.train, implicit=data.implicit,
                             negatives=cfg.data.negatives, seed=neg,
                             uniform=cfg.uniform_negatives)
    parts: list[tuple[torch.Tensor, ...]] = []
    lengths: list[int] = []
    epochs: list[int] = []
    for epoch in range(cfg.fed.local_epochs):
        ex = builder.build()
        batches = list(batch_indices(len(ex), cfg.train.batch_size, poisson=dp is not None,
                                     generator=gen,
                                     sample_rate=dp.sample_rate if dp else None))
        order = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
        parts.append((ex.users[order], ex.items[order], ex.targets[order]))
        lengths += [len(b) for b in batches]
        epochs += [epoch] * len(batches)
    users, items, targets = (torch.cat(t) for t in zip(*parts))
    if dp is not None and exact_noise:  # step-by-step noise: the whole table
        rows = np.arange(data.n_items)
    else:  # the rows it reads, renumbered (DP: other rows only owe noise)
        rows = np.flatnonzero(builder.touched)
        position = np.zeros(data.n_items, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        items = torch.from_numpy(position[items.numpy()])
    return _Plan(index, data, state, ledger, builder, rows, (users, items, targets), lengths,
                 epochs, local, dp, noise, (seed, server_round))


def fit_clients(cfg: RunConfig, clients: Sequence[ClientData], shared: Arrays,
                states: Sequence[ClientState | None], ledgers: Sequence[Ledger | None], *,
                seeds: Sequence[int], server_round: int, chunk: int = 256,
                exact_noise: bool = False, fold_noise: bool = False, as_rows: bool = False,
                client_streams: bool = False) -> Iterator[tuple[int, FitResult]]:
    """``fit_client`` for each client: yields ``(position in clients, result)``.

    Under record-level DP the noise on an item row is drawn when a step reads the row
    and at the end, as the one Gaussian the steps since its last draw add up to (same
    distribution, several times fewer draws; ``_train_chunk_dp``); ``exact_noise`` draws
    it step by step in Opacus's order instead, the very numbers ``fit_client`` adds from
    the same stream, with each client's own sampling and negatives streams (equality
    tests); otherwise a chunk's clients draw those from one OS-seeded pair (own streams
    with ``client_streams``, for tests of the lazy noise). ``fold_noise`` (for a caller
    that only sums the updates, as ``fedrec.inprocess`` does) leaves out the noise each
    row still owes after the last step and reports its variance per item row
    (``FitResult.owed``): the sum of the updates then takes it as one draw
    (``owed_noise``), not one per client.

    ``as_rows``: each result's item arrays hold only the rows its client held
    (``FitResult.rows``; every other row is the received one, its noise, under
    ``fold_noise``, owed to the sum), for a caller that sums them as rows
    (``MeanAccumulator``, ``ClippedSum``): no client copies the whole catalogue.

    Clients train ``chunk`` at a time, grouped by size (a chunk pads to its largest
    client), so results come in chunk order, not list order; a round of thousands of
    clients never holds all their updates at once.

    Raises:
        ValueError: the config needs ``fit_client`` (``unsupported``).
    """
    why = unsupported(cfg)
    if why:
        raise ValueError(f"the batched engine cannot run this config: {why}")
    if clients:  # the received arrays pass fit_client's checks (finite, bounded, keys)
        _model(cfg, clients[0], shared, None, 0, None)
        if len({(c.n_items, c.offset) for c in clients}) > 1:
            raise ValueError("clients of one batched round share one catalogue and offset")
    order = sorted(range(len(clients)), key=lambda j: len(clients[j].train))
    for start in range(0, len(order), chunk):
        t0 = time.perf_counter()
        plans, done = [], {}
        streams = (_chunk_streams(cfg, seeds[order[start]], server_round)
                   if cfg.privacy.dp and not (exact_noise or client_streams) else None)
        for j in order[start:start + chunk]:
            if len(clients[j].train) == 0 and not cfg.privacy.dp:  # under DP it still steps
                done[j] = FitResult(None, None, 0, math.nan, 0.0, False, 0.0,
                                    states[j] or ClientState(user_ids=list(clients[j].user_ids)),
                                    ledgers[j] or Ledger(delta=0.0, unit=""))
                continue
            plan = _plan(cfg, j, clients[j], states[j], ledgers[j], seeds[j], server_round,
                         exact_noise, streams)
            if isinstance(plan, FitResult):
                done[j] = plan
            else:
                plans.append(plan)
        if streams is not None:
            plans = _sample_chunk(cfg, plans, streams)
        trained = (_train_chunk_dp(cfg, plans, shared, exact_noise, fold_noise, as_rows)
                   if cfg.privacy.dp else _train_chunk(cfg, plans, shared, as_rows))
        done.update({p.index: r for p, r in zip(plans, trained)})
        seconds = (time.perf_counter() - t0) / max(1, len(done))
        for j, res in done.items():
            yield j, dataclasses.replace(res, seconds=seconds)


def _chunk_streams(cfg: RunConfig, seed: int, server_round: int
                   ) -> tuple[torch.Generator, np.random.Generator]:
    """A chunk's (Poisson sampling, negatives) generators under record-level DP: OS
    entropy (keyed by its first client's seed and the round only under the test seed)."""
    pcfg = cfg.privacy
    return (privacy.dp_generator(pcfg, seed, server_round, privacy.CHUNK_SAMPLING),
            np.random.default_rng(privacy.dp_seed(pcfg, seed, server_round,
                                                  privacy.CHUNK_NEGATIVES)))


def _sample_chunk(cfg: RunConfig, plans: list[_Plan],
                  streams: tuple[torch.Generator, np.random.Generator]) -> list[_Plan]:
    """Record-level DP: the examples and Poisson batches of every client of a chunk whose
    plan left them to it (``_plan`` with ``streams``), drawn for all at once from the
    chunk's generators, as ``_plan`` draws them for one client: each local epoch, every
    rating with ``negatives`` items uniform over the catalogue, and ``round(1/q)`` steps,
    each taking every example independently with probability q; a client's examples in
    step order, in rating order within a step. A client holds the item rows its batches
    read."""
    todo = [c for c, p in enumerate(plans) if p.builder is None and p.dp is not None]
    if not todo:
        return plans
    gen, rng = streams
    trains = [plans[c].data.train for c in todo]
    n_items, implicit = plans[todo[0]].data.n_items, plans[todo[0]].data.implicit
    rates = {plans[c].dp.sample_rate for c in todo}  # type: ignore[union-attr]
    if len(rates) != 1:
        raise RuntimeError("DP clients of one chunk sample at one rate")
    q = rates.pop()
    steps = steps_per_epoch(0, cfg.train.batch_size, poisson=True, sample_rate=q)
    n = np.array([len(t) for t in trains], dtype=np.int64)
    client_of = np.repeat(np.arange(len(todo)), n)
    users = np.concatenate([t.users for t in trains]).astype(np.int64)
    positives = np.concatenate([t.items for t in trains]).astype(np.int64)
    k_neg = cfg.data.negatives if implicit else 0
    epochs = cfg.fed.local_epochs
    picked: list[tuple[np.ndarray, ...]] = []
    for epoch in range(epochs):
        negatives = rng.integers(0, n_items, (len(positives), k_neg))
        keep = torch.rand(steps, len(positives), generator=gen) < q
        s_idx, j_idx = (t.numpy() for t in keep.nonzero(as_tuple=True))
        picked.append((client_of[j_idx], np.full(len(j_idx), epoch), s_idx, j_idx,
                       np.concatenate([positives[j_idx, None], negatives[j_idx]], 1)))
    c_of, e_of, s_of, j_of, items = (np.concatenate(t) for t in zip(*picked))
    order = np.lexsort((j_of, s_of, e_of, c_of))  # client, epoch, step, rating
    c_of, step_of, j_of, items = (c_of[order], (e_of * steps + s_of)[order], j_of[order],
                                  items[order])
    if implicit:
        targets = np.zeros(items.shape, np.float32)
        targets[:, 0] = 1.0
    else:
        targets = np.concatenate([t.ratings for t in trains]).astype(np.float32)[j_of, None]
    counts = np.bincount(c_of * (epochs * steps) + step_of,
                         minlength=len(todo) * epochs * steps).reshape(len(todo), -1)
    # each client's rows: the distinct items its batches read, numbered in item order
    keys = c_of[:, None] * n_items + items
    held, position = np.unique(keys, return_inverse=True)
    first = np.searchsorted(held, np.arange(len(todo) + 1) * n_items)
    local_items = position.reshape(items.shape) - first[c_of][:, None]
    ends = np.concatenate([[0], np.cumsum(counts.sum(1))])
    users_t, items_t = torch.from_numpy(users[j_of]), torch.from_numpy(local_items)
    targets_t = torch.from_numpy(targets)
    out = list(plans)
    for i, c in enumerate(todo):
        a, b = ends[i], ends[i + 1]
        out[c] = dataclasses.replace(
            plans[c], rows=held[first[i]:first[i + 1]] - i * n_items,
            examples=(users_t[a:b], items_t[a:b], targets_t[a:b]),
            lengths=counts[i].tolist(), epochs=np.repeat(np.arange(epochs), steps).tolist())
    return out


def _pad_stack(tensors: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Stack ``[n_i, ...]`` tensors into ``[len, size, ...]``, zero-padded."""
    out = tensors[0].new_zeros((len(tensors), size) + tuple(tensors[0].shape[1:]))
    for c, t in enumerate(tensors):
        out[c, :len(t)] = t
    return out


def _flat_index(index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Rows ``index [C, M]`` of per-client tables ``[C, R, ...]`` as rows of the tables
    flattened to ``[C * R, ...]``: ``[C * M]``."""
    base = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * n_rows
    return (index + base).reshape(-1)


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index [C, M]`` of each client's ``table [C, R, ...]``: ``[C, M, ...]``.
    (``index_select`` on the flattened table: several times faster on the CPU than
    ``torch.gather`` with an expanded index.)"""
    c, r = table.shape[:2]
    flat = table.reshape((c * r,) + table.shape[2:])
    return flat.index_select(0, _flat_index(index, r)).reshape(index.shape + table.shape[2:])


def _scatter_add(table: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``table[c, index[c, m]] += values[c, m]`` (repeated rows add up); ``table`` must
    be contiguous (it is updated through a flattened view)."""
    c, r = table.shape[:2]
    flat = table.view((c * r,) + table.shape[2:])
    flat.index_add_(0, _flat_index(index, r), values.reshape((-1,) + table.shape[2:]))


def _layout(plans: Sequence[_Plan], n_steps: int, width: int, k: int
            ) -> tuple[torch.Tensor, ...]:
    """Every client's examples in one ``[C, S, width]`` layout (users; items and targets
    with a trailing K; a 0/1 mask), each placed by one indexed write."""
    lengths = [np.asarray(p.lengths, dtype=np.int64) for p in plans]
    step_of = torch.from_numpy(np.concatenate([np.repeat(np.arange(len(n)), n)
                                               for n in lengths]))
    slot_of = torch.from_numpy(np.concatenate([
        np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) for n in lengths]))
    client_of = torch.from_numpy(np.repeat(np.arange(len(plans)),
                                           [int(n.sum()) for n in lengths]))
    where = (client_of, step_of, slot_of)
    c = len(plans)
    users = torch.zeros(c, n_steps, width, dtype=torch.long)
    items = torch.zeros(c, n_steps, width, k, dtype=torch.long)
    targets = torch.zeros(c, n_steps, width, k)
    mask = torch.zeros(c, n_steps, width)
    users[where] = torch.cat([p.examples[0] for p in plans])
    items[where] = torch.cat([p.examples[1] for p in plans])
    targets[where] = torch.cat([p.examples[2] for p in plans])
    mask[where] = 1.0
    return users, items, targets, mask


def _last_epoch(plans: Sequence[_Plan], n_steps: int) -> torch.Tensor:
    """``[C, S]``: which steps of each client belong to its last local epoch (the loss
    a client reports); steps past a client's own are False."""
    last = torch.zeros(len(plans), n_steps, dtype=torch.bool)
    for c, p in enumerate(plans):
        last[c, :len(p.epochs)] = torch.tensor([e == p.epochs[-1] for e in p.epochs])
    return last


def _row_scores(template: torch.nn.Module, rows: dict[str, torch.Tensor], batch: int, k: int,
                batched: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Scores ``[C, batch, k]`` of each client's ``batch`` examples from the rows they
    read: local tables ``[C, batch, ...]`` (row b: example b's user) and item tables
    ``[C, batch * k, ...]`` (row b * k + j: its j-th item); other parameters whole.

    MF (every parameter a table) is scored directly on the rows (``MF.score``, what its
    forward computes after the lookups); other models through ``vmap`` of their own
    forward (``batched``, if given, is that vmap, built once by the caller).
    """
    if type(template) is MF:
        c = rows["user_emb.weight"].shape[0]
        return MF.score(rows["user_emb.weight"],  # [C, B, d]
                        rows["item_emb.weight"].reshape(c, batch, k, -1),  # [C, B, K, d]
                        rows["user_bias.weight"], rows["item_bias.weight"].reshape(c, batch, k),
                        template.offset)
    batched = batched or vmap(lambda p, u, i: functional_call(template, p, (u, i)))
    first = next(iter(rows.values()))
    c, device = first.shape[0], first.device
    return batched(rows, torch.arange(batch, device=device).expand(c, -1),
                   torch.arange(batch * k, device=device).reshape(batch, k).expand(c, -1, -1))


def _train_chunk(cfg: RunConfig, plans: list[_Plan], shared: Arrays,
                 as_rows: bool = False) -> list[FitResult]:
    """Train ``plans`` side by side; one FitResult each.

    SGD steps touch only the rows a step reads (gathered, differentiated, added back:
    what a dense embedding gradient does, since other rows get zero); Adam steps update
    every row a client holds, as its moments move rows a step does not read.
    """
    if not plans:
        return []
    device = resolve_device(cfg.train.device)
    n_clients = len(plans)
    n_rows = max(len(p.rows) for p in plans)
    n_users = max(p.data.n_users for p in plans)
    n_steps = max(len(p.lengths) for p in plans)
    batch = cfg.train.batch_size
    k = plans[0].examples[1].shape[1]
    users, items, targets, mask = _layout(plans, n_steps, batch, k)
    last = _last_epoch(plans, n_steps)
    sparse = cfg.train.optimizer == "sgd"
    template = (build_model(cfg.model, batch, batch * k, offset=plans[0].data.offset)
                if sparse else
                build_model(cfg.model, n_users, n_rows, offset=plans[0].data.offset))
    template.to(device)
    local_keys, item_keys = set(template.local_keys()), set(template.item_keys())
    rows = _pad_stack([torch.from_numpy(p.rows) for p in plans], n_rows)
    params: dict[str, torch.Tensor] = {}
    for key in template.state_dict():
        if key in local_keys:
            value = _pad_stack([p.local[key].float() for p in plans], n_users)
        elif key in item_keys:
            value = torch.from_numpy(np.asarray(shared[key], dtype=np.float32))[rows]
        else:
            value = torch.from_numpy(np.asarray(shared[key], dtype=np.float32)).expand(
                (n_clients,) + shared[key].shape).clone()
        params[key] = value.to(device).requires_grad_(not sparse or (
            key not in local_keys and key not in item_keys))
    dense_keys = [key for key in params if params[key].requires_grad]
    optimizer = _BatchedOptimizer(cfg, {key: params[key] for key in dense_keys}, n_clients,
                                  device)
    criterion = RowLoss(cfg.train.objective, reduction="none")
    batched = vmap(lambda p, u, i: functional_call(template, p, (u, i)))
    losses = torch.zeros(n_clients, n_steps, dtype=torch.float64)
    count = mask.sum(2)  # [C, S]
    for s in range(n_steps):
        u, i = users[:, s].to(device), items[:, s].to(device)
        t, m = targets[:, s].to(device), mask[:, s].to(device)
        if sparse:  # this step's rows, as leaves; gradients are added back below
            index = {key: u if key in local_keys else i.reshape(n_clients, -1)
                     for key in params if key in local_keys or key in item_keys}
            leaves = {key: _gather(params[key].detach(), idx).requires_grad_()
                      for key, idx in index.items()}
            scores = _row_scores(template, {**params, **leaves}, batch, k, batched)
        else:
            scores = batched(params, u, i)
        per = criterion(scores.reshape(-1, k), t.reshape(-1, k)).reshape(m.shape)
        n_s = count[:, s].to(device)
        client_loss = (per * m).sum(1) / n_s.clamp(min=1)
        client_loss.sum().backward()
        if sparse:
            with torch.no_grad():
                for key, leaf in leaves.items():
                    _scatter_add(params[key].data, index[key], -cfg.train.lr * leaf.grad)
        optimizer.step(n_s > 0)
        losses[:, s] = (client_loss.detach() * n_s).double().cpu()
    results = []
    shared_keys = template.shared_keys()
    finite = all(bool(torch.isfinite(v.detach().sum())) for v in params.values())  # no NaN/inf
    last_loss = (losses * last).sum(1) / (count.double() * last).sum(1).clamp(min=1)
    item_order = sorted(item_keys)
    for c, p in enumerate(plans):
        local = {key: params[key][c, :p.data.n_users].detach().cpu().clone()
                 for key in local_keys}
        out: Arrays = {}
        for key in shared_keys:
            value = params[key][c].detach().cpu()
            out[key] = (value[:len(p.rows)] if key in item_keys else value).numpy().copy()
        weighting = cfg.fed.item_weighting
        touched = (p.builder.touched.astype(np.float32)
                   if not (cfg.privacy.user_dp or cfg.privacy.ddp)
                   and weighting in ("auto", "touched") else None)
        res = _finish(p, local, out, float(last_loss[c]), touched,
                      dataclasses.replace(p.ledger, rounds=p.ledger.rounds + 1),
                      weight=float(len(p.data.train)), finite=finite)
        results.append(_as_rows(res, p.rows, shared, item_order, as_rows))
    return results


def _finish(p: _Plan, local: dict[str, torch.Tensor], out: Arrays, loss: float,
            touched: np.ndarray | None, ledger: Ledger, *, weight: float,
            owed: np.ndarray | None = None, finite: bool = False) -> FitResult:
    """One client's FitResult after its steps; non-finite values are refused, as
    ``fit_client`` refuses them (nothing is sent or kept). ``finite``: the caller found
    every value of the chunk finite (its rows not read came from the checked message)."""
    if not finite and (not all(torch.isfinite(v).all() for v in local.values())
                       or not all(np.isfinite(v).all() for v in out.values())):
        raise PrivacyError("training produced non-finite values; nothing is sent or kept")
    return FitResult(out, touched, len(p.data.train), loss, ledger.epsilon, False, 0.0,
                     ClientState(local=local, rounds=p.state.rounds + 1,
                                 user_ids=list(p.data.user_ids)), ledger, weight=weight,
                     owed=owed)


def _secure_noise(std: float, shape: tuple[int, ...], generator: torch.Generator
                  ) -> torch.Tensor:
    """Opacus's ``secure_mode`` noise, draw for draw (one discarded, four summed, halved):
    the same numbers a client's DPOptimizer takes from the same generator."""
    torch.normal(mean=0, std=std, size=(1, 1), generator=generator)
    total = torch.zeros(shape)
    for _ in range(4):
        total += torch.normal(mean=0, std=std, size=shape, generator=generator)
    return total / 2


def _example_sq_norms(grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Squared norms ``[C, B]`` of each example's gradient on one table, from its lookups'
    gradients ``grad [C, B, K, d]`` and rows ``ids [C, B, K]`` (repeated rows add up):
    ``sum_{k,k'} [id_k == id_k'] <g_k, g_k'>``, as ``fedrec.privacy``'s norm sampler."""
    c, b, k, d = grad.shape
    return lookup_sq_norms(grad.reshape(c * b, k, d), ids.reshape(c * b, k)).reshape(c, b)


def _first_of_each_row(index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``[C, M]`` mask: True at one position of each distinct row of ``index [C, M]``."""
    position = torch.arange(index.shape[1]).expand_as(index)
    owner = torch.full((index.shape[0], n_rows), -1, dtype=torch.long)
    owner.scatter_(1, index, position)  # one writer per repeated row wins
    return owner.gather(1, index) == position


def _train_chunk_dp(cfg: RunConfig, plans: list[_Plan], shared: Arrays,
                    exact_noise: bool = False, fold_noise: bool = False,
                    as_rows: bool = False) -> list[FitResult]:
    """Record-level DP-SGD for ``plans`` side by side (MF, SGD): what Opacus does in
    ``fit_client``, step for step.

    Each step takes every client's Poisson batch; one backward pass gives each lookup's
    gradient (every example's lookups are separate leaves), hence each example's exact
    gradient norm over all four tables; examples are clipped to ``max-grad-norm`` C
    (Opacus's factor ``min(1, C / (norm + 1e-6))``), summed into the client's tables,
    noised (std sigma C on every coordinate of every table, Opacus's secure draws),
    divided by the configured batch size and applied by SGD. A step with no example adds
    noise only. Runs on the CPU, where the noise generators are.

    Item-row noise is applied lazily (unless ``exact_noise``): with SGD and no weight
    decay a row's value only matters when a step reads it, and the sum of k independent
    N(0, (sigma C)^2) draws is one N(0, k (sigma C)^2) draw. So each row keeps a count of
    the steps whose noise it has not received; before a step reads it, it gets those
    steps' noise as one draw, and after the last step every row gets what it still owes
    (or, with ``fold_noise``, reports it for the caller to draw for the sum). Every row
    ends with the noise of all S steps, and every read sees the noise of every earlier
    step: the same distribution as step-by-step noise, with a draw per read
    instead of a draw per step and row. The draws for a whole chunk come from one
    OS-seeded generator. ``exact_noise`` instead draws each client's noise step by step
    from its own generator in Opacus's order: the very numbers ``fit_client`` adds from
    the same stream (equality tests). ``fold_noise``: what the rows still owe after the
    last step is not drawn but reported (``FitResult.owed``, see ``fit_clients``).
    """
    if not plans:
        return []
    pcfg = cfg.privacy
    n_clients = len(plans)
    n_users = max(p.data.n_users for p in plans)
    n_steps = max(len(p.lengths) for p in plans)
    if any(len(p.lengths) != n_steps for p in plans):
        raise RuntimeError("DP clients of one round take the same number of steps")
    n_items = plans[0].data.n_items
    template = build_model(cfg.model, n_users, n_items, offset=plans[0].data.offset)
    local_keys = template.local_keys()
    item_keys = [key for key in template.state_dict() if key not in local_keys]
    # each client holds the item rows its examples read (all of them with exact_noise):
    # a row it never reads only owes noise, one draw at the end (or folded)
    n_rows = max(1, max(len(p.rows) for p in plans))
    held = _pad_stack([torch.from_numpy(p.rows) for p in plans], n_rows)  # [C, R]
    real = torch.arange(n_rows).expand(n_clients, -1) < torch.tensor(
        [len(p.rows) for p in plans]).unsqueeze(1)  # [C, R]: False on padding
    tables: dict[str, torch.Tensor] = {}
    for key in template.state_dict():  # registration order = Opacus's parameter order
        if key in local_keys:
            tables[key] = _pad_stack([p.local[key].float() for p in plans], n_users)
        else:
            whole = torch.from_numpy(np.asarray(shared[key], dtype=np.float32))
            if whole.shape[0] != n_items:
                raise RuntimeError("item tables of the batched DP engine have one row per "
                                   "item")
            tables[key] = whole[held]
    clip, lr = pcfg.max_grad_norm, cfg.train.lr
    normalizer = max(1, round(cfg.train.batch_size))  # privacy.set_expected_batch_size
    std = torch.tensor([p.dp.sigma * clip for p in plans if p.dp is not None])
    if len(std) != n_clients:
        raise RuntimeError("every client of a DP chunk has a DP plan")
    # one OS-seeded generator for the chunk's lazy draws (test-only stream when seeded)
    chunk_noise = privacy.dp_generator(pcfg, plans[0].stream[0], plans[0].stream[1],
                                       privacy.CHUNK_NOISE)
    owed = torch.zeros(n_clients, n_rows)  # steps whose noise each held row still owes
    criterion = RowLoss(cfg.train.objective, reduction="none")
    k = 1 + cfg.data.negatives if plans[0].data.implicit else 1
    losses = torch.zeros(n_clients, n_steps, dtype=torch.float64)
    counts = torch.zeros(n_clients, n_steps)
    last = _last_epoch(plans, n_steps)

    def pay(into: dict[str, torch.Tensor], rows: torch.Tensor, due: torch.Tensor) -> None:
        """Add ``due [C, M]`` steps' noise (one draw each) to ``rows [C, M]`` of the item
        tables ``into`` (drawn only where something is due)."""
        c_idx, m_idx = torch.nonzero(due > 0, as_tuple=True)
        if not len(c_idx):
            return
        scale = std[c_idx] * due[c_idx, m_idx].sqrt() * (-lr / normalizer)
        for key in item_keys:
            table = into[key]
            flat = table.view((-1,) + table.shape[2:])
            z = _secure_noise(1.0, (len(c_idx),) + table.shape[2:], chunk_noise)
            flat.index_add_(0, c_idx * table.shape[1] + rows[c_idx, m_idx],
                            z * scale.reshape((-1,) + (1,) * (table.dim() - 2)))

    widths = np.array([p.lengths for p in plans], dtype=np.int64).max(0)  # per step
    all_users, all_items, all_targets, all_mask = _layout(
        plans, n_steps, max(1, int(widths.max(initial=0))), k)
    for s in range(n_steps):
        width = max(1, int(widths[s]))
        users, items = all_users[:, s, :width], all_items[:, s, :width].contiguous()
        targets, mask = all_targets[:, s, :width], all_mask[:, s, :width]
        index = {key: (users if key in local_keys else items).reshape(n_clients, -1)
                 for key in tables}
        if not exact_noise:  # rows this step reads first take the noise they owe
            flat = items.reshape(n_clients, -1)
            with torch.no_grad():
                pay(tables, flat, owed.gather(1, flat) * _first_of_each_row(flat, n_rows))
            owed.scatter_(1, flat, 0.0)
        leaves = {key: _gather(tables[key], index[key]).requires_grad_() for key in tables}
        scores = _row_scores(template, leaves, width, k)
        per = criterion(scores.reshape(-1, k), targets.reshape(-1, k)).reshape(mask.shape)
        (per * mask).sum().backward()
        sq = torch.zeros(n_clients, width)
        for key in tables:
            g = leaves[key].grad
            if key in local_keys:  # one row per example
                sq += g.reshape(n_clients, width, -1).pow(2).sum(-1)
            else:
                sq += _example_sq_norms(g.reshape(n_clients, width, k, -1),
                                        items.reshape(n_clients, width, k))
        coef = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0) * mask  # [C, B]
        with torch.no_grad():
            for key, table in tables.items():
                g = leaves[key].grad.reshape(n_clients, width, -1, table.shape[-1])
                clipped = (g * coef.reshape(n_clients, width, 1, 1)).reshape(
                    n_clients, -1, table.shape[-1])
                # SGD on (clipped sum + noise) / B, applied in two parts: the sum where
                # the examples' rows are, the noise where (and when) it is drawn
                _scatter_add(table, index[key], clipped * (-lr / normalizer))
                if exact_noise:  # each client's generator, Opacus's order and sizes
                    for c, p in enumerate(plans):
                        assert p.noise is not None
                        rows = p.data.n_users if key in local_keys else table.shape[1]
                        table[c, :rows] -= lr * _secure_noise(
                            float(std[c]), (rows,) + table.shape[2:], p.noise) / normalizer
                elif key in local_keys:  # user rows: this step's noise, all clients at once
                    table -= (lr / normalizer) * std.reshape(
                        (-1,) + (1,) * (table.dim() - 1)) * _secure_noise(
                            1.0, tuple(table.shape), chunk_noise)
            owed += 1.0
            counts[:, s] = mask.sum(1)
            losses[:, s] = (per.detach() * mask).sum(1).double()
    per_step = (std * lr / normalizer) ** 2  # [C]: an item coordinate's noise variance
    owed = owed * real  # padding rows are never sent: no draws for them
    out_tables, owed_var = tables, None
    if fold_noise and not exact_noise:  # the caller draws it for the sum
        owed_var = np.repeat((per_step * n_steps).double().numpy()[:, None], n_items, 1)
        for c, p in enumerate(plans):  # rows never read owe every step
            owed_var[c, p.rows] = (owed[c, :len(p.rows)] * per_step[c]).double().numpy()
    elif not exact_noise:  # whole tables, every row with the noise it still owes
        with torch.no_grad():
            pay(tables, torch.arange(n_rows).expand(n_clients, -1), owed)
            c_idx, r_idx = torch.nonzero(real, as_tuple=True)
            rows = held[c_idx, r_idx]
            out_tables = {key: torch.from_numpy(np.asarray(
                shared[key], dtype=np.float32)).expand((n_clients,) + shared[key].shape
                                                       ).clone() for key in item_keys}
            due = torch.full((n_clients, n_items), float(n_steps))
            due[c_idx, rows] = 0.0  # held rows had theirs (copied in below): no draws
            pay(out_tables, torch.arange(n_items).expand(n_clients, -1), due)
            for key in item_keys:
                out_tables[key][c_idx, rows] = tables[key][c_idx, r_idx]
    last_loss = (losses * last).sum(1) / (counts.double() * last).sum(1).clamp(min=1)
    results = []
    finite = all(bool(torch.isfinite(v.sum())) for v in (*tables.values(),
                                                          *out_tables.values()))
    for c, p in enumerate(plans):
        assert p.dp is not None
        local = {key: tables[key][c, :p.data.n_users].clone() for key in local_keys}
        if out_tables is tables:  # the held rows; the others are the received ones
            out = {key: tables[key][c, :len(p.rows)].numpy().copy() for key in item_keys}
        else:
            out = {key: out_tables[key][c].numpy().copy() for key in item_keys}
        history = privacy.add_entry(p.ledger.history, (p.dp.sigma, p.dp.sample_rate,
                                                       len(p.lengths)))
        ledger = dataclasses.replace(
            p.ledger, rounds=p.ledger.rounds + 1, history=[tuple(h) for h in history],
            epsilon=privacy.epsilon_of(history, pcfg.delta, pcfg.accountant))
        res = _finish(p, local, out, float(last_loss[c]), None, ledger, weight=1.0,
                      owed=None if owed_var is None else owed_var[c], finite=finite)
        results.append(_as_rows(res, p.rows, shared, item_keys, as_rows)
                       if out_tables is tables else res)
    return results


def _as_rows(res: FitResult, rows: np.ndarray, shared: Arrays, item_keys: Sequence[str],
             as_rows: bool) -> FitResult:
    """``res``, whose item arrays hold ``rows`` (the others are ``shared``'s), given as
    those rows (``as_rows``) or whole."""
    res = dataclasses.replace(res, rows=rows)
    return res if as_rows else dataclasses.replace(res, shared=res.full(shared, item_keys),
                                                    rows=None)


def owed_noise(owed: np.ndarray, shared: Arrays, keys: Sequence[str],
               generator: torch.Generator) -> Arrays:
    """The noise a sum of updates still owes (``fit_clients(fold_noise=True)``): for each
    table in ``keys`` (one row per item), N(0, ``owed[r]``) on every coordinate of row r,
    drawn in Opacus's secure mode from ``generator`` (OS-seeded outside experiments)."""
    out = {}
    scale = torch.from_numpy(np.sqrt(np.maximum(owed, 0.0))).float()
    for key in keys:
        shape = tuple(shared[key].shape)
        z = _secure_noise(1.0, shape, generator)
        out[key] = (z * scale.reshape((-1,) + (1,) * (len(shape) - 1))).double().numpy()
    return out


class _BatchedOptimizer:
    """SGD or Adam (``build_optimizer``'s, no weight decay) with one state per client;
    a client without a step this time (its steps are done) is left as it is."""

    def __init__(self, cfg: RunConfig, params: dict[str, torch.Tensor], n: int,
                 device: torch.device) -> None:
        self.kind, self.lr = cfg.train.optimizer, cfg.train.lr
        self.params = params
        self.t = torch.zeros(n, dtype=torch.float64, device=device)
        if self.kind == "adam":
            self.m = {k: torch.zeros_like(v) for k, v in params.items()}
            self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One step for the ``active`` clients; gradients are consumed."""
        self.t += active.to(self.t.dtype)
        for key, p in self.params.items():
            g = p.grad
            shape = (-1,) + (1,) * (p.dim() - 1)
            if self.kind == "sgd":  # a client without examples has a zero gradient
                p.sub_(g * self.lr)
            else:
                on = active.reshape(shape)
                b1, b2 = ADAM_BETAS
                m = torch.where(on, self.m[key] * b1 + g * (1 - b1), self.m[key])
                v = torch.where(on, self.v[key] * b2 + g * g * (1 - b2), self.v[key])
                t = self.t.clamp(min=1)
                step_size = (self.lr / (1 - b1 ** t)).to(p.dtype).reshape(shape)
                bias2_sqrt = torch.sqrt(1 - b2 ** t).to(p.dtype).reshape(shape)
                update = step_size * m / (v.sqrt() / bias2_sqrt + ADAM_EPS)
                p.sub_(torch.where(on, update, torch.zeros_like(update)))
                self.m[key], self.v[key] = m, v
            p.grad = None
