"""What a federated client does in a round, without Flower.

``client/client_app.py`` translates Flower Messages to and from these functions. A
client holds its users' interactions (local user ids ``0..n-1``, global item ids), its
users' embeddings and its accountant history (``fedrec.state``). It receives the shared
parameters, trains with the one loop (DP-SGD when configured) and returns the shared
parameters only.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedrec import privacy
from fedrec.central import build_trainer, noise_multiplier, rating_offset
from fedrec.config import DataConfig, RunConfig
from fedrec.data import ExampleBuilder, Split, load_file, load_split
from fedrec.data.interactions import Interactions
from fedrec.data.split import temporal_split, to_feedback
from fedrec.errors import ConfigError, DataError, StateError
from fedrec.evaluate import evaluate_counts
from fedrec.model import RecModel, build_model
from fedrec.partition import num_partitions, partition_users
from fedrec.state import ClientState
from fedrec.train import resolve_device, steps_per_epoch, train_epochs

Arrays = dict[str, np.ndarray]


@dataclass
class ClientData:
    """One client's interactions: local user ids, global item ids."""

    train: Interactions
    test: Interactions
    user_ids: list[str]  # original ids of the local users, by local id
    implicit: bool
    offset: float  # fixed score offset (see fedrec.central.rating_offset)

    @property
    def n_users(self) -> int:
        """Local users."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Items in the (global) catalogue."""
        return self.train.n_items


@functools.lru_cache(maxsize=2)
def cached_split(data_cfg: DataConfig) -> Split:
    """``load_split`` cached per process (a simulation worker serves many clients)."""
    return load_split(data_cfg)


def _local(data: Interactions, users: np.ndarray) -> Interactions:
    lookup = np.full(data.n_users, -1, dtype=np.int64)
    lookup[users] = np.arange(len(users))
    mask = lookup[data.users] >= 0
    sub = data.subset(mask)
    sub.users = lookup[sub.users]
    sub.user_ids = data.user_ids[users]
    return sub


def split_for_users(split: Split, users: np.ndarray) -> ClientData:
    """The client view of a global split restricted to ``users``."""
    train, test = _local(split.train, users), _local(split.test, users)
    return ClientData(train, test, [str(u) for u in split.train.user_ids[users]],
                      split.implicit, rating_offset(split))


def partition_data(cfg: RunConfig, partition_id: int, num_nodes: int) -> ClientData:
    """Simulation: load the dataset (cached per process) and take one partition."""
    split = cached_split(cfg.data)
    n_clients = cfg.fed.num_clients or num_nodes
    expected = num_partitions(cfg.fed.partition, split.n_users, n_clients)
    if expected != num_nodes:
        raise ConfigError(
            f"partition {cfg.fed.partition!r} makes {expected} clients but the federation "
            f"has {num_nodes} nodes; set num-supernodes to {expected}")
    parts = partition_users(cfg.fed.partition, split.n_users, n_clients, cfg.data.seed)
    return split_for_users(split, parts[partition_id])


def read_catalogue(path: Path) -> pd.DataFrame:
    """The shared item catalogue (``item`` id column, optional ``title``/``genres``).

    Row order defines the global item index: every node and the server must hold the
    same file. Raises DataError naming the file on a missing column or duplicate id.
    """
    if not path.is_file():
        raise DataError(f"{path}: item catalogue not found (node-config 'catalogue-file')")
    try:
        cat = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV catalogue ({err})") from err
    if "item" not in cat.columns:
        raise DataError(f"{path}: needs a header with an 'item' column, got {list(cat.columns)}")
    dup = cat["item"].duplicated()
    if dup.any():
        line = int(np.flatnonzero(dup.to_numpy())[0]) + 2
        raise DataError(f"{path}, line {line}: item id {cat['item'][line - 2]!r} repeated")
    return cat


@functools.lru_cache(maxsize=2)
def node_data(cfg: RunConfig, data_file: str, catalogue_file: str) -> ClientData:
    """Deployment: this node's own ratings file, indexed by the shared catalogue.

    The file is read by the core loaders (CSV/TSV/Parquet with a header; columns named
    by the data config), converted to the configured feedback and split per user by time.
    """
    cat = read_catalogue(Path(catalogue_file))
    d = to_feedback(load_file(cfg.data, Path(data_file)), cfg.data.feedback,
                    cfg.data.threshold)
    index = {item: i for i, item in enumerate(cat["item"])}
    mapped = np.array([index.get(str(i), -1) for i in d.item_ids], dtype=np.int64)
    if (mapped < 0).any():
        missing = d.item_ids[mapped < 0][:3].tolist()
        raise DataError(f"{data_file}: items {missing} are not in the catalogue "
                        f"{catalogue_file}; every node must use the same catalogue")
    col = {c: cat[c].tolist() if c in cat.columns else [""] * len(cat)
           for c in ("title", "genres")}
    full = Interactions(d.users, mapped[d.items], d.ratings, d.timestamps, d.user_ids,
                        cat["item"].to_numpy(dtype=object), col["title"], col["genres"],
                        d.rating_range, d.name, cleaning=d.cleaning)
    split = temporal_split(full, cfg.data.split, cfg.data.test_fraction, cfg.data.seed)
    split.implicit = cfg.data.feedback == "implicit"
    return split_for_users(split, np.arange(full.n_users))


def catalogue_size(cfg: RunConfig) -> int:
    """Item count the server builds the shared model for (``num-items`` or the data)."""
    return cfg.fed.num_items or cached_split(cfg.data).n_items


def init_shared(cfg: RunConfig, n_items: int) -> Arrays:
    """The initial shared parameters (a model with one placeholder user)."""
    model = build_model(cfg.model, 1, n_items, seed=cfg.data.seed)
    return {k: v.numpy() for k, v in model.shared_state_dict().items()}


def item_keys(cfg: RunConfig, n_items: int) -> list[str]:
    """Shared keys indexed by item (rows that a client may or may not touch)."""
    return build_model(cfg.model, 1, n_items).item_keys()


def _model(cfg: RunConfig, data: ClientData, shared: Arrays, state: ClientState | None,
           seed: int, path: Path | None) -> RecModel:
    model = build_model(cfg.model, data.n_users, data.n_items, offset=data.offset, seed=seed)
    expected = set(model.shared_keys())
    if set(shared) != expected:
        raise ValueError(f"shared parameters {sorted(shared)} do not match the model's "
                         f"{sorted(expected)}")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in shared.items()}
    if state is not None:
        if state.user_ids != data.user_ids:
            raise StateError(f"{path}: holds users {state.user_ids[:3]}..., but this client "
                             f"has {data.user_ids[:3]}...; use a state dir per dataset/node")
        want = model.local_state_dict()
        bad = [k for k in want if k not in state.local or state.local[k].shape != want[k].shape]
        if bad:
            raise StateError(f"{path}: local tensors {bad} missing or of another shape; "
                             "the model config changed: use a fresh state dir")
        tensors.update(state.local)
    else:
        tensors.update(model.local_state_dict())
    model.load_state_dict(tensors, strict=True)
    return model


@dataclass
class FitResult:
    """A client's training outcome (what may be sent is ``shared`` and the scalars)."""

    shared: Arrays | None  # None when the client did not train (budget exhausted)
    touched: np.ndarray | None  # item rows trained on (non-DP, touched weighting only)
    num_examples: int
    loss: float
    epsilon: float
    exhausted: bool
    seconds: float
    state: ClientState


def fit_client(cfg: RunConfig, data: ClientData, shared: Arrays, state: ClientState | None,
               *, seed: int, server_round: int, state_file: Path | None = None) -> FitResult:
    """Train one client for ``local-epochs`` on its data.

    With DP, one example is one rating with its negatives (epsilon per rating), the user
    embeddings train under the same DP optimizer, and the accountant continues the
    state's history. ``target-epsilon`` calibrates sigma for the whole planned run
    (rounds x local epochs); ``epsilon-cap`` stops a client whose next round would cross
    the cap.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed * 1_000_003 + server_round)
    state = state or ClientState(user_ids=list(data.user_ids))
    model = _model(cfg, data, shared, state if state.local else None, seed, state_file)
    model.to(resolve_device(cfg.train.device))
    n = len(data.train)
    pcfg = cfg.privacy
    q = privacy.quantize_rate(min(1.0, cfg.train.batch_size / max(1, n)))
    per_round = cfg.fed.local_epochs * steps_per_epoch(n, cfg.train.batch_size, poisson=True,
                                                       sample_rate=q)
    planned = cfg.fed.rounds * per_round  # sigma is calibrated for the whole run
    history = list(state.history)
    if pcfg.dp and n > 0 and cfg.fed.epsilon_cap > 0:
        sigma = noise_multiplier(cfg, q, planned)
        nxt = privacy.epsilon_of(history + [(sigma, q, per_round)], pcfg.delta,
                                 pcfg.accountant)
        if nxt > cfg.fed.epsilon_cap:
            return FitResult(None, None, 0, float("nan"), state.last_epsilon, True,
                             time.perf_counter() - t0, state)
    if n == 0:
        return FitResult(None, None, 0, float("nan"), state.last_epsilon, False,
                         time.perf_counter() - t0, state)
    builder = ExampleBuilder(data.train, implicit=data.implicit, negatives=cfg.data.negatives,
                             seed=seed * 7919 + server_round)
    trainer = build_trainer(cfg, model, n, steps=planned, history=history, sample_rate=q)
    res = train_epochs(trainer.model, trainer.optimizer, trainer.criterion, builder,
                       cfg.train, poisson=pcfg.dp, epochs=cfg.fed.local_epochs,
                       seed=seed * 104729 + server_round, sample_rate=q if pcfg.dp else None)
    eps = trainer.epsilon(pcfg.delta, pcfg.accountant)
    new_state = ClientState(
        local=model.local_state_dict(),
        history=list(trainer.private.accountant.history) if trainer.private else history,
        rounds=state.rounds + 1, user_ids=list(data.user_ids), last_epsilon=eps)
    shared_out = {k: v.cpu().numpy() for k, v in model.shared_state_dict().items()}
    touched = None
    weighting = cfg.fed.item_weighting
    if not pcfg.dp and not pcfg.user_dp and weighting in ("auto", "touched"):
        touched = builder.touched.astype(np.float32)
    return FitResult(shared_out, touched, n, res.loss, eps, False,
                     time.perf_counter() - t0, new_state)


def evaluate_client(cfg: RunConfig, data: ClientData, shared: Arrays,
                    state: ClientState | None, *, seed: int,
                    state_file: Path | None = None) -> dict[str, float]:
    """Summable evaluation counts of one client on its held-out interactions."""
    model = _model(cfg, data, shared, state if state and state.local else None, seed,
                   state_file)
    model.to(resolve_device(cfg.train.device))
    return evaluate_counts(model, data.train, data.test, ks=cfg.eval.ks,
                           implicit=data.implicit, eval_negatives=cfg.data.eval_negatives,
                           seed=seed)
