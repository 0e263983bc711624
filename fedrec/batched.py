"""Many clients' local training at once, as batched tensors: the batched client engine.

It runs ``fedrec.federated.fit_client``'s semantics for clients that train without DP on
the device (no DP, and user-level DP, whose clipping and noise happen at the server):
each client gets its own copy of the shared rows it reads, its own user embeddings and
its own optimizer state; its examples, negatives and batch order come from the seeds
``fit_client`` uses, so both give the same update to float tolerance
(``tests/test_batched.py``). The clients' steps run side by side through
``torch.func.vmap`` over one model: a one-user client's ~85 ratings in steps of 16 no
longer pay a model build, an optimizer and a Python loop each.

Only the rows a client reads are copied (padded to the largest client of a chunk); rows
it never reads keep their value, as they do under ``fit_client`` when no weight decay
moves them (weight decay falls back to ``fit_client``). Record-level DP and distributed
DP stay on ``fit_client`` (Opacus, per-client noise): ``unsupported`` says why.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap

from fedrec.config import RunConfig
from fedrec.data import ExampleBuilder
from fedrec.errors import PrivacyError
from fedrec.federated import ClientData, FitResult, _model
from fedrec.model import build_model
from fedrec.privacy import RowLoss
from fedrec.state import ClientState, Ledger
from fedrec.train import resolve_device

Arrays = dict[str, np.ndarray]

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults (build_optimizer)


def unsupported(cfg: RunConfig) -> str | None:
    """Why this config's clients cannot train batched (None: they can)."""
    if cfg.privacy.dp:
        return "record-level DP trains each client through Opacus"
    if cfg.privacy.ddp:
        return "distributed DP adds noise shares per client"
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
    builder: ExampleBuilder
    rows: np.ndarray  # sorted global item rows read by any step
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (users, local items, targets)
    epochs: list[int]  # epoch of each step
    local: dict[str, torch.Tensor]  # user tensors at the start of the round


def _plan(cfg: RunConfig, index: int, data: ClientData, state: ClientState | None,
          ledger: Ledger | None, seed: int, server_round: int) -> _Plan:
    """fit_client's examples and batch order for one client (same seeds, same draws)."""
    ledger = ledger or Ledger(delta=0.0, unit="")
    state = state or ClientState(user_ids=list(data.user_ids))
    builder = ExampleBuilder(data.train, implicit=data.implicit,
                             negatives=cfg.data.negatives, seed=seed * 7919 + server_round,
                             uniform=cfg.uniform_negatives)
    gen = torch.Generator().manual_seed(seed * 104729 + server_round)
    raw, epochs = [], []
    for epoch in range(cfg.fed.local_epochs):
        ex = builder.build()
        for idx in torch.randperm(len(ex), generator=gen).split(cfg.train.batch_size):
            raw.append((ex.users[idx], ex.items[idx], ex.targets[idx]))
            epochs.append(epoch)
    rows = np.flatnonzero(builder.touched)
    steps = [(u, torch.from_numpy(np.searchsorted(rows, i.numpy())), t) for u, i, t in raw]
    if state.local:
        local = {k: torch.as_tensor(v) for k, v in state.local.items()}
    else:  # the user tables are drawn first from the client's seed: no item table needed
        model = build_model(cfg.model, data.n_users, 1, offset=data.offset, seed=seed)
        local = model.local_state_dict()
    return _Plan(index, data, state, ledger, builder, rows, steps, epochs, local)


def fit_clients(cfg: RunConfig, clients: Sequence[ClientData], shared: Arrays,
                states: Sequence[ClientState | None], ledgers: Sequence[Ledger | None], *,
                seeds: Sequence[int], server_round: int, chunk: int = 256
                ) -> Iterator[tuple[int, FitResult]]:
    """``fit_client`` for each client: yields ``(position in clients, result)``.

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
    order = sorted(range(len(clients)), key=lambda j: len(clients[j].train))
    for start in range(0, len(order), chunk):
        t0 = time.perf_counter()
        plans, done = [], {}
        for j in order[start:start + chunk]:
            if len(clients[j].train) == 0:
                done[j] = FitResult(None, None, 0, math.nan, 0.0, False, 0.0,
                                    states[j] or ClientState(user_ids=list(clients[j].user_ids)),
                                    ledgers[j] or Ledger(delta=0.0, unit=""))
            else:
                plans.append(_plan(cfg, j, clients[j], states[j], ledgers[j], seeds[j],
                                   server_round))
        done.update({p.index: r for p, r in zip(plans, _train_chunk(cfg, plans, shared))})
        seconds = (time.perf_counter() - t0) / max(1, len(done))
        for j, res in done.items():
            yield j, dataclasses.replace(res, seconds=seconds)


def _pad_stack(tensors: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Stack ``[n_i, ...]`` tensors into ``[len, size, ...]``, zero-padded."""
    out = tensors[0].new_zeros((len(tensors), size) + tuple(tensors[0].shape[1:]))
    for c, t in enumerate(tensors):
        out[c, :len(t)] = t
    return out


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index [C, M]`` of each client's ``table [C, R, ...]``: ``[C, M, ...]``."""
    shape = index.shape + table.shape[2:]
    flat = index.reshape(index.shape + (1,) * (table.dim() - 2)).expand(shape)
    return torch.gather(table, 1, flat)


def _scatter_add(table: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``table[c, index[c, m]] += values[c, m]`` (repeated rows add up)."""
    flat = index.reshape(index.shape + (1,) * (table.dim() - 2)).expand(values.shape)
    table.scatter_add_(1, flat, values)


def _train_chunk(cfg: RunConfig, plans: list[_Plan], shared: Arrays) -> list[FitResult]:
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
    n_steps = max(len(p.steps) for p in plans)
    batch = cfg.train.batch_size
    k = plans[0].steps[0][1].shape[1]
    users = torch.zeros(n_clients, n_steps, batch, dtype=torch.long)
    items = torch.zeros(n_clients, n_steps, batch, k, dtype=torch.long)
    targets = torch.zeros(n_clients, n_steps, batch, k)
    mask = torch.zeros(n_clients, n_steps, batch)
    last = torch.zeros(n_clients, n_steps, dtype=torch.bool)  # steps of the last epoch
    for c, p in enumerate(plans):
        for s, (u, i, t) in enumerate(p.steps):
            users[c, s, :len(u)], items[c, s, :len(u)], targets[c, s, :len(u)] = u, i, t
            mask[c, s, :len(u)] = 1.0
            last[c, s] = p.epochs[s] == p.epochs[-1]
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
            value = torch.from_numpy(np.asarray(shared[key]))[rows]
        else:
            value = torch.from_numpy(np.asarray(shared[key])).expand(
                (n_clients,) + shared[key].shape).clone()
        params[key] = value.to(device).requires_grad_(not sparse or (
            key not in local_keys and key not in item_keys))
    dense_keys = [key for key in params if params[key].requires_grad]
    optimizer = _BatchedOptimizer(cfg, {key: params[key] for key in dense_keys}, n_clients,
                                  device)
    criterion = RowLoss(cfg.train.objective, reduction="none")
    batched = vmap(lambda p, u, i: functional_call(template, p, (u, i)))
    step_users = torch.arange(batch, device=device).expand(n_clients, -1)
    step_items = torch.arange(batch * k, device=device).reshape(batch, k).expand(
        n_clients, -1, -1)
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
            scores = batched({**params, **leaves}, step_users, step_items)
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
    last_loss = (losses * last).sum(1) / (count.double() * last).sum(1).clamp(min=1)
    for c, p in enumerate(plans):
        local = {key: params[key][c, :p.data.n_users].detach().cpu().clone()
                 for key in local_keys}
        out: Arrays = {}
        for key in template.shared_keys():
            value = params[key][c].detach().cpu()
            if key in item_keys:
                full = np.array(shared[key], dtype=np.float32, copy=True)
                full[p.rows] = value[:len(p.rows)].numpy()
                out[key] = full
            else:
                out[key] = value.numpy().copy()
        if not all(torch.isfinite(v).all() for v in local.values()) or not all(
                np.isfinite(v).all() for v in out.values()):
            raise PrivacyError("training produced non-finite values; nothing is sent or kept")
        weighting = cfg.fed.item_weighting
        touched = (p.builder.touched.astype(np.float32)
                   if not cfg.privacy.user_dp and weighting in ("auto", "touched") else None)
        n = len(p.data.train)
        results.append(FitResult(
            out, touched, n, float(last_loss[c]), p.ledger.epsilon, False, 0.0,
            ClientState(local=local, rounds=p.state.rounds + 1,
                        user_ids=list(p.data.user_ids)),
            dataclasses.replace(p.ledger, rounds=p.ledger.rounds + 1), weight=float(n)))
    return results


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
