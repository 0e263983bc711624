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
                ) -> Iterator[FitResult]:
    """``fit_client`` for each client, ``chunk`` clients at a time; results in order.

    Yields one ``FitResult`` per client as each chunk finishes, so a round of thousands
    of clients never holds all their updates at once.

    Raises:
        ValueError: the config needs ``fit_client`` (``unsupported``).
    """
    why = unsupported(cfg)
    if why:
        raise ValueError(f"the batched engine cannot run this config: {why}")
    if clients:  # the received arrays pass fit_client's checks (finite, bounded, keys)
        _model(cfg, clients[0], shared, None, 0, None)
    for start in range(0, len(clients), chunk):
        t0 = time.perf_counter()
        plans, empty = [], {}
        for j in range(start, min(start + chunk, len(clients))):
            if len(clients[j].train) == 0:
                empty[j] = FitResult(None, None, 0, math.nan, 0.0, False, 0.0,
                                     states[j] or ClientState(user_ids=list(clients[j].user_ids)),
                                     ledgers[j] or Ledger(delta=0.0, unit=""))
            else:
                plans.append(_plan(cfg, j, clients[j], states[j], ledgers[j], seeds[j],
                                   server_round))
        done = {p.index: r for p, r in zip(plans, _train_chunk(cfg, plans, shared))}
        done.update(empty)
        seconds = (time.perf_counter() - t0) / max(1, len(done))
        for j in sorted(done):
            yield dataclasses.replace(done[j], seconds=seconds)


def _pad_stack(tensors: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Stack ``[n_i, ...]`` tensors into ``[len, size, ...]``, zero-padded."""
    out = tensors[0].new_zeros((len(tensors), size) + tuple(tensors[0].shape[1:]))
    for c, t in enumerate(tensors):
        out[c, :len(t)] = t
    return out


def _train_chunk(cfg: RunConfig, plans: list[_Plan], shared: Arrays) -> list[FitResult]:
    """Train ``plans`` side by side; one FitResult each."""
    if not plans:
        return []
    device = resolve_device(cfg.train.device)
    n_rows = max(len(p.rows) for p in plans)
    n_users = max(p.data.n_users for p in plans)
    n_steps = max(len(p.steps) for p in plans)
    template = build_model(cfg.model, n_users, n_rows, offset=plans[0].data.offset).to(device)
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
                (len(plans),) + shared[key].shape).clone()
        params[key] = value.to(device).requires_grad_()
    optimizer = _BatchedOptimizer(cfg, params, len(plans))
    criterion = RowLoss(cfg.train.objective, reduction="none")
    batch = cfg.train.batch_size
    k = plans[0].steps[0][1].shape[1]

    def scores_of(p: dict[str, torch.Tensor], users: torch.Tensor,
                  items: torch.Tensor) -> torch.Tensor:
        return functional_call(template, p, (users, items))

    batched = vmap(scores_of)
    epochs = cfg.fed.local_epochs
    loss_sums = torch.zeros(len(plans), epochs, dtype=torch.float64)
    seen = torch.zeros(len(plans), epochs)
    for s in range(n_steps):
        users = torch.zeros(len(plans), batch, dtype=torch.long)
        items = torch.zeros(len(plans), batch, k, dtype=torch.long)
        targets = torch.zeros(len(plans), batch, k)
        mask = torch.zeros(len(plans), batch)
        for c, p in enumerate(plans):
            if s < len(p.steps):
                u, i, t = p.steps[s]
                users[c, :len(u)], items[c, :len(u)], targets[c, :len(u)] = u, i, t
                mask[c, :len(u)] = 1.0
        count = mask.sum(1)
        active = count > 0
        users, items, targets, mask = (x.to(device) for x in (users, items, targets, mask))
        scores = batched(params, users, items)  # [C, B, K]
        per = criterion(scores.reshape(-1, k), targets.reshape(-1, k)).reshape(mask.shape)
        client_loss = (per * mask).sum(1) / count.to(device).clamp(min=1)
        client_loss.sum().backward()
        optimizer.step(active.to(device))
        with torch.no_grad():
            for c, p in enumerate(plans):
                if s < len(p.steps):
                    e = p.epochs[s]
                    loss_sums[c, e] += float(client_loss[c]) * float(count[c])
                    seen[c, e] += count[c]
    results = []
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
        last = int(p.epochs[-1])
        loss = float(loss_sums[c, last] / max(1.0, float(seen[c, last])))
        weighting = cfg.fed.item_weighting
        touched = (p.builder.touched.astype(np.float32)
                   if not cfg.privacy.user_dp and weighting in ("auto", "touched") else None)
        n = len(p.data.train)
        results.append(FitResult(
            out, touched, n, loss, p.ledger.epsilon, False, 0.0,
            ClientState(local=local, rounds=p.state.rounds + 1,
                        user_ids=list(p.data.user_ids)),
            dataclasses.replace(p.ledger, rounds=p.ledger.rounds + 1), weight=float(n)))
    return results


class _BatchedOptimizer:
    """SGD or Adam (``build_optimizer``'s, no weight decay) with one state per client;
    a client without a step this time (its steps are done) is left as it is."""

    def __init__(self, cfg: RunConfig, params: dict[str, torch.Tensor], n: int) -> None:
        self.kind, self.lr = cfg.train.optimizer, cfg.train.lr
        self.params = params
        self.t = torch.zeros(n, dtype=torch.float64, device=next(iter(params.values())).device)
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
            on = active.reshape(shape)
            if self.kind == "sgd":
                p.sub_(torch.where(on, g, torch.zeros_like(g)) * self.lr)
            else:
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
