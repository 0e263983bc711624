"""What a federated client does in a round, without Flower.

``client/client_app.py`` translates Flower Messages to and from these functions. A
client holds its users' interactions (local user ids ``0..n-1``, global item ids), its
users' embeddings and its accountant history (``fedrec.state``). It receives the shared
parameters, trains with the one loop (DP-SGD when configured) and returns the shared
parameters only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedrec import keys, privacy
from fedrec.central import build_trainer, rating_offset
from fedrec.config import DataConfig, ModelConfig, RunConfig
from fedrec.data import ExampleBuilder, Split, load_file, load_split
from fedrec.data.interactions import Interactions
from fedrec.data.split import temporal_split, to_feedback
from fedrec.ddp import DDPPlan, count_keys, encode, prior_vector
from fedrec.errors import ConfigError, DataError, PrivacyError, StateError
from fedrec.evaluate import evaluate_counts
from fedrec.features import example_context, model_features
from fedrec.metrics import finalize, merge_counts
from fedrec.model import RecModel, build_model
from fedrec.partition import num_partitions, partition_users
from fedrec.state import ClientState, Ledger, load_state, state_path
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
    rating_span: float = 1.0  # width of the declared rating scale (explicit; 1 if implicit)

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


def _as_local(sub: Interactions, data: Interactions, users: np.ndarray,
              lookup: np.ndarray) -> Interactions:
    """``sub`` (rows of ``data`` owned by ``users``) in the ids of those users
    (``lookup``: global user id -> local id)."""
    sub.users = lookup[sub.users]
    sub.user_ids = data.user_ids[users]
    sub.user_features = [data.user_features[u] for u in users] if data.user_features else []
    return sub


def _local(data: Interactions, users: np.ndarray) -> Interactions:
    lookup = np.full(data.n_users, -1, dtype=np.int64)
    lookup[users] = np.arange(len(users))
    return _as_local(data.subset(lookup[data.users] >= 0), data, users, lookup)


def _client_data(split: Split, users: np.ndarray, train: Interactions,
                 test: Interactions) -> ClientData:
    lo, hi = split.train.rating_range
    return ClientData(train, test, [str(u) for u in split.train.user_ids[users]],
                      split.implicit, rating_offset(split),
                      1.0 if split.implicit else float(hi - lo))


def split_for_users(split: Split, users: np.ndarray) -> ClientData:
    """The client view of a global split restricted to ``users``."""
    return _client_data(split, users, _local(split.train, users), _local(split.test, users))


def split_for_parts(split: Split, parts: Sequence[np.ndarray]) -> list[ClientData]:
    """``split_for_users`` of every part, the ratings of all parts found by one sort
    instead of a scan of the whole data per part (100,000 one-user clients of 2M ratings:
    seconds, not the better part of an hour). Parts that share a user are split one by
    one."""
    flat = np.concatenate([np.asarray(u, dtype=np.int64) for u in parts]) if parts else []
    if len(np.unique(flat)) != len(flat):
        return [split_for_users(split, users) for users in parts]
    part_of = np.full(split.n_users, len(parts), dtype=np.int64)  # len(parts): no part
    local = np.full(split.n_users, -1, dtype=np.int64)
    for j, users in enumerate(parts):
        part_of[users] = j
        local[users] = np.arange(len(users))

    def pieces(data: Interactions) -> list[Interactions]:
        owner = part_of[data.users]
        order = np.argsort(owner, kind="stable")  # a part's rows keep their order
        bounds = np.searchsorted(owner[order], np.arange(len(parts) + 1))
        return [_as_local(data.subset(order[bounds[j]:bounds[j + 1]]), data, users, local)
                for j, users in enumerate(parts)]

    return [_client_data(split, users, train, test)
            for users, train, test in zip(parts, pieces(split.train), pieces(split.test))]


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


@functools.lru_cache(maxsize=32)
def _local_layout(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """Per local key of the model: its shape per user and whether it is drawn (not
    zero); from a one-user model built once per model config."""
    template = build_model(model, 1, 1)
    state = template.state_dict()
    return tuple((key, tuple(state[key].shape[1:]),
                  key.split(".")[0] not in template.LOCAL_ZEROS)
                 for key in template.local_keys())


def initial_local(cfg: RunConfig, n_users: int, seed: int) -> dict[str, torch.Tensor]:
    """The user tables a client starts from without a state file: those of
    ``build_model(..., seed=seed)``, whose user tables are drawn first from the seed
    (``RecModel.LOCAL_ZEROS`` start at zero), drawn here without building the model."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, drawn in _local_layout(cfg.model):
        value = torch.zeros((n_users,) + shape)
        if drawn:
            value.normal_(0.0, cfg.model.init_std, generator=gen)
        out[key] = value
    return out


# The largest magnitude a received shared value may have (a public check on the message).
# Trained embeddings and weights stay orders of magnitude below it.
MAX_RECEIVED_ABS = 1e4


def _model(cfg: RunConfig, data: ClientData, shared: Arrays, state: ClientState | None,
           seed: int, path: Path | None) -> RecModel:
    model = build_model(cfg.model, data.n_users, data.n_items, offset=data.offset, seed=seed,
                        features=model_features(cfg, data.train))
    expected = set(model.shared_keys())
    if set(shared) != expected:
        raise ValueError(f"shared parameters {sorted(shared)} do not match the model's "
                         f"{sorted(expected)}")
    bad = [k for k, v in shared.items()
           if not np.issubdtype(np.asarray(v).dtype, np.floating) or not np.isfinite(v).all()]
    if bad:  # a NaN would pass through clipping and noise and mark the rows trained on
        raise PrivacyError(f"received shared arrays {bad} are not finite floats; refusing "
                           "to train or evaluate on them")
    big = [k for k, v in shared.items() if np.abs(v).max(initial=0.0) > MAX_RECEIVED_ABS]
    if big:  # checked before any data is read: a crafted model must not overflow on some
        # items only, which would tell by a failure whether the node holds them
        raise PrivacyError(f"received shared arrays {big} hold values beyond +-"
                           f"{MAX_RECEIVED_ABS:g}; refusing to train or evaluate on them")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in shared.items()}
    if state is not None:
        if state.user_ids != data.user_ids:
            raise StateError(f"{path}: holds users {state.user_ids[:3]}..., but this client "
                             f"has {data.user_ids[:3]}...; this state file belongs to other "
                             "data (move it aside to start the user embeddings afresh; "
                             "the privacy ledger is kept)")
        want = model.local_state_dict()
        bad = [k for k in want if k not in state.local or state.local[k].shape != want[k].shape]
        if bad:
            raise StateError(f"{path}: local tensors {bad} missing or of another shape; "
                             "the model config changed (move the file aside to start the "
                             "user embeddings afresh; the privacy ledger is kept)")
        tensors.update(state.local)
    else:
        tensors.update(model.local_state_dict())
    model.load_state_dict(tensors, strict=True)
    return model


# A federated client's DP-SGD sampling rate when ``sample-rate`` is 0: a public
# constant, because a rate derived from the client's own data size would reveal it.
CLIENT_SAMPLE_RATE = 0.125


@dataclass
class DPPlan:
    """A client's DP-SGD parameters for one round (none of them depends on its data)."""

    sample_rate: float  # Poisson rate q
    steps: int  # DP steps this round
    sigma: float  # noise multiplier
    epsilon_after: float  # epsilon once this round is spent


def client_dp_plan(cfg: RunConfig, ledger: Ledger, server_round: int) -> DPPlan | None:
    """The round's DP parameters, or None when the budget does not allow the round.

    q is ``sample-rate`` (else ``CLIENT_SAMPLE_RATE``), the steps ``local-epochs`` x
    round(1/q); sigma is calibrated so that what the ledger has spent plus every round
    still planned (``rounds`` - ``server_round`` + 1, with their noised evaluations)
    spends at most ``target-epsilon``: a resume with more rounds spreads the budget that
    remains instead of overshooting it. A round past ``rounds`` is refused, and
    ``epsilon_cap`` (default: the target) is never crossed, whatever the server asks.
    """
    p = cfg.privacy
    if server_round > cfg.fed.rounds:
        return None
    q = p.sample_rate or CLIENT_SAMPLE_RATE
    steps = cfg.fed.local_epochs * steps_per_epoch(0, cfg.train.batch_size, poisson=True,
                                                   sample_rate=q)
    remaining = max(1, cfg.fed.rounds - server_round + 1)
    history = list(ledger.history)
    evals = []
    if p.eval_noise_multiplier > 0 and cfg.fed.fraction_evaluate > 0:
        evals = [(p.eval_noise_multiplier, 1.0, remaining)]
    if p.target_epsilon > 0:
        try:
            sigma = privacy.calibrate_remaining(p.target_epsilon, p.delta, history, q,
                                                steps * remaining, p.accountant, evals)
        except privacy.BudgetError:
            return None
    else:
        sigma = p.noise_multiplier
    after = privacy.epsilon_of(history + [(sigma, q, steps)], p.delta, p.accountant)
    cap = cfg.epsilon_cap
    if cap > 0 and after > cap * (1 + 1e-9):
        return None
    return DPPlan(q, steps, sigma, after)


@dataclass
class FitResult:
    """A client's training outcome (what may be sent is decided by the ClientApp)."""

    shared: Arrays | None  # None when the client did not train (budget exhausted)
    touched: np.ndarray | None  # item rows trained on (non-DP, touched weighting only)
    num_examples: int  # training examples (never sent under DP)
    loss: float  # mean training loss (never sent under DP)
    epsilon: float
    exhausted: bool
    seconds: float
    state: ClientState
    ledger: Ledger
    weight: float = 0.0  # aggregation weight sent: 1 under DP (a count would reveal n), else n
    # batched engine, record-level DP with fold_noise: per item row, the variance of the
    # noise this update still owes (the caller adds the sum's noise in one draw)
    owed: np.ndarray | None = None
    # batched engine, fold_noise: the item rows ``shared``'s item arrays hold, sorted;
    # every other row is the received value (``full``). None: the arrays are whole
    rows: np.ndarray | None = None

    def full(self, received: Arrays, item_keys: Sequence[str]) -> Arrays:
        """``shared`` whole: the rows ``rows`` leaves out are ``received``'s."""
        if self.shared is None or self.rows is None:
            return dict(self.shared or {})
        out = dict(self.shared)
        for key in item_keys:
            whole = np.array(received[key], dtype=self.shared[key].dtype, copy=True)
            whole[self.rows] = self.shared[key]
            out[key] = whole
        return out


def fit_client(cfg: RunConfig, data: ClientData, shared: Arrays, state: ClientState | None,
               ledger: Ledger | None = None, *, seed: int, server_round: int,
               state_file: Path | None = None) -> FitResult:
    """Train one client for ``local-epochs`` on its data.

    With DP, one example is one rating with its negatives (epsilon per rating), the user
    embeddings train under the same DP optimizer, and the ledger continues. The sampling
    rate, steps and noise come from ``client_dp_plan`` and do not depend on the client's
    data (a client with no ratings takes the same noisy steps); noise, batches and
    negatives are drawn from OS entropy (``fedrec.privacy.dp_generator``).
    """
    t0 = time.perf_counter()
    pcfg = cfg.privacy
    ledger = ledger or Ledger(delta=pcfg.delta if pcfg.dp else 0.0,
                              unit=privacy.UNIT_OF_PRIVACY if pcfg.dp else "")
    state = state or ClientState(user_ids=list(data.user_ids))
    n = len(data.train)
    plan = client_dp_plan(cfg, ledger, server_round) if pcfg.dp else None
    if pcfg.dp and plan is None:
        return FitResult(None, None, 0, float("nan"), ledger.epsilon, True,
                         time.perf_counter() - t0, state, ledger)
    if n == 0 and not pcfg.dp:
        return FitResult(None, None, 0, float("nan"), ledger.epsilon, False,
                         time.perf_counter() - t0, state, ledger)
    device = resolve_device(cfg.train.device)
    model = _model(cfg, data, shared, state if state.local else None, seed, state_file)
    model.to(device)
    if plan is not None:
        stream = (seed, server_round)
        neg_rng: int | np.random.Generator = np.random.default_rng(
            privacy.dp_seed(pcfg, *stream, privacy.NEGATIVES))
        trainer = build_trainer(cfg, model, n, steps=plan.steps, history=ledger.history,
                                sample_rate=plan.sample_rate, sigma=plan.sigma,
                                normalizer=cfg.train.batch_size,
                                generator=privacy.dp_generator(pcfg, *stream, privacy.NOISE,
                                                               device=device))
        sampler: torch.Generator | None = privacy.dp_generator(pcfg, *stream,
                                                               privacy.SAMPLING)
    else:
        neg_rng = seed * 7919 + server_round
        trainer = build_trainer(cfg, model, n, steps=1)
        sampler = torch.Generator().manual_seed(seed * 104729 + server_round)
    builder = ExampleBuilder(data.train, implicit=data.implicit, negatives=cfg.data.negatives,
                             seed=neg_rng, uniform=cfg.uniform_negatives,
                             context=example_context(cfg, data.train))
    res = train_epochs(trainer.model, trainer.optimizer, trainer.criterion, builder,
                       cfg.train, poisson=pcfg.dp, epochs=cfg.fed.local_epochs,
                       sample_rate=plan.sample_rate if plan else None, generator=sampler)
    new_ledger = dataclasses.replace(ledger, rounds=ledger.rounds + 1)
    if trainer.private is not None:
        new_ledger.history = [tuple(h) for h in trainer.private.accountant.history]
        new_ledger.epsilon = trainer.epsilon(pcfg.delta, pcfg.accountant)
    new_state = ClientState(local=model.local_state_dict(), rounds=state.rounds + 1,
                            user_ids=list(data.user_ids))
    shared_out = {k: v.cpu().numpy() for k, v in model.shared_state_dict().items()}
    if not all(torch.isfinite(v).all() for v in new_state.local.values()) or not all(
            np.isfinite(v).all() for v in shared_out.values()):
        raise PrivacyError("training produced non-finite values; nothing is sent or kept")
    touched = None
    weighting = cfg.fed.item_weighting
    if not (pcfg.dp or pcfg.user_dp or pcfg.ddp) and weighting in ("auto", "touched"):
        touched = builder.touched.astype(np.float32)
    return FitResult(shared_out, touched, n, res.loss, new_ledger.epsilon, False,
                     time.perf_counter() - t0, new_state, new_ledger,
                     weight=1.0 if pcfg.dp else float(n))


def evaluate_client(cfg: RunConfig, data: ClientData, shared: Arrays,
                    state: ClientState | None, *, seed: int,
                    state_file: Path | None = None) -> dict[str, float]:
    """Summable evaluation counts of one client on its held-out interactions (exact:
    a ClientApp releases them under DP only through ``release_counts``)."""
    model = _model(cfg, data, shared, state if state and state.local else None, seed,
                   state_file)
    model.to(resolve_device(cfg.train.device))
    return evaluate_counts(model, data.train, data.test, ks=cfg.eval.ks,
                           implicit=data.implicit, eval_negatives=cfg.data.eval_negatives,
                           seed=seed)


class ExperimenterEvaluation:
    """The experimenter's metrics of a global model over every partition (simulation).

    Reads each client's user embeddings from its state file in ``state_dir`` and its
    held-out data from the dataset, as an experimenter with access to everything would:
    nothing here is released by a client, so no privacy budget is involved.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        split = cached_split(cfg.data)
        parts = partition_users(cfg.fed.partition, split.n_users, cfg.fed.num_clients,
                                cfg.data.seed)
        self.clients = split_for_parts(split, parts)

    def __call__(self, shared: Arrays) -> dict[str, float]:
        """Exact metrics of ``shared`` with the clients' current user embeddings."""
        counts = []
        for pid, data in enumerate(self.clients):
            path = state_path(self.cfg.fed.state_dir, pid)
            counts.append(evaluate_client(self.cfg, data, shared, load_state(path),
                                          seed=self.cfg.data.seed + pid, state_file=path))
        return finalize(merge_counts(counts), self.cfg.eval.ks)


def release_counts(cfg: RunConfig, data: ClientData, counts: dict[str, float],
                   ledger: Ledger, *, seed: int, server_round: int
                   ) -> tuple[dict[str, float], Ledger]:
    """Evaluation counts as a DP client may send them: Gaussian noise, charged to the ledger.

    Each count is divided by how much one rating can change it (1 for per-user metric sums
    and user/rating counts; the rating range, squared for squared errors), so the vector
    has L2 sensitivity sqrt(m) for m counts; noise of std ``eval-noise-multiplier`` x
    sqrt(m) x that scale is added. One release is one Gaussian mechanism, ``(sigma, 1, 1)``
    in the ledger.

    Raises:
        PrivacyError: no release is allowed (``eval-noise-multiplier`` 0) or the cap
            would be crossed.
    """
    p = cfg.privacy
    sigma = p.eval_noise_multiplier
    if sigma <= 0:
        raise PrivacyError("evaluation counts are not released under DP unless "
                           "eval-noise-multiplier > 0")
    history = privacy.add_entry(ledger.history, (sigma, 1.0, 1))
    after = privacy.epsilon_of(history, p.delta, p.accountant)
    cap = cfg.epsilon_cap
    if cap > 0 and after > cap * (1 + 1e-9):
        raise PrivacyError(f"a noised evaluation would raise epsilon to {after:.3f}, past the "
                           f"cap {cap:g}")
    span = data.rating_span
    if not math.isfinite(span):
        raise PrivacyError("evaluation counts of explicit ratings without a bounded rating "
                           "scale cannot be released with DP (unbounded errors)")
    # a fixed key set: which keys a client has must not depend on its data
    names = count_keys(cfg) + ([] if data.implicit else
                               [keys.NUM_RATINGS, keys.SUM_SQ_ERR, keys.SUM_ABS_ERR])
    values = np.array([counts.get(k, 0.0) for k in names], np.float64)
    if not np.isfinite(values).all():
        raise PrivacyError("evaluation counts are not finite; nothing is released")
    scale = np.array([span ** 2 if k == keys.SUM_SQ_ERR else span if k == keys.SUM_ABS_ERR
                      else 1.0 for k in names])
    gen = privacy.dp_generator(p, seed, server_round, privacy.EVAL_NOISE)
    noise = privacy.secure_normal(len(names), gen).numpy() * sigma * math.sqrt(len(names))
    out = {k: float(v) for k, v in zip(names, values + noise * scale)}
    new = dataclasses.replace(ledger, history=history, evaluations=ledger.evaluations + 1,
                              epsilon=after, delta=p.delta,
                              unit=ledger.unit or privacy.UNIT_OF_PRIVACY)
    return out, new


def shared_order(cfg: RunConfig, n_items: int) -> list[str]:
    """Shared keys in the fixed order distributed DP flattens them in."""
    return list(_shared_order(cfg.model, n_items))


@functools.lru_cache(maxsize=64)
def _shared_order(model: ModelConfig, n_items: int) -> tuple[str, ...]:
    return tuple(build_model(model, 1, n_items).shared_keys())


def flatten(arrays: Arrays, order: list[str]) -> np.ndarray:
    """Concatenate arrays in ``order`` as float64 ``[sum of sizes]``."""
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in order])


def unflatten(vector: np.ndarray, like: Arrays, order: list[str]) -> Arrays:
    """Split ``vector`` back into arrays shaped (and typed) like ``like``."""
    out, start = {}, 0
    for k in order:
        size = like[k].size
        out[k] = vector[start:start + size].reshape(like[k].shape).astype(like[k].dtype)
        start += size
    return out


def count_vector(cfg: RunConfig, counts: dict[str, float]) -> np.ndarray:
    """Evaluation counts in ``fedrec.ddp.count_keys`` order (0 where absent)."""
    return np.array([counts.get(k, 0.0) for k in count_keys(cfg)], np.float64)


@dataclass
class DDPReply:
    """What a distributed-DP client sends (``ints``) and keeps (state, ledger)."""

    ints: np.ndarray | None  # None: the client refuses the round (its cap)
    state: ClientState
    ledger: Ledger
    epsilon: float  # the client's user-level epsilon, under the protocol's trust assumption


def ddp_allows(cfg: RunConfig, ledger: Ledger | None, plan: DDPPlan) -> bool:
    """Whether a client with ``ledger`` takes part in a release planned as ``plan``: its
    user-level epsilon after it (``plan.n_min`` honest shares) stays within its cap."""
    p = cfg.privacy
    history = ledger.user_history if ledger is not None else []
    after = privacy.skellam_epsilon(history + [plan.entry(plan.n_min)], p.delta)
    cap = cfg.fed.epsilon_cap or p.user_target_epsilon
    return not (cap > 0 and after > cap * (1 + 1e-9))


def ddp_client_round(cfg: RunConfig, data: ClientData, shared: Arrays,
                     state: ClientState | None, ledger: Ledger | None, plan: DDPPlan, *,
                     seed: int, server_round: int, task: str = "train",
                     state_file: Path | None = None, fit: FitResult | None = None,
                     counts: dict[str, float] | None = None, share: bool = True) -> DDPReply:
    """One distributed-DP release of a client, encoded with its noise share
    (``fedrec.ddp.encode``): for ``task`` "train", the counts of the model it received
    and its clipped update after local (non-DP) training; "evaluate", the counts only;
    "prior", its item counts (``fedrec.ddp.prior_vector``).

    The client checks the plan against its own ledger first: if the release would take
    its user-level epsilon (assuming ``plan.n_min`` honest shares) past its cap
    (``epsilon-cap``, else ``user-target-epsilon``), it refuses (``ddp_allows``).

    ``fit`` and ``counts``: this client's ``fit_client`` result and ``evaluate_client``
    counts for this round when the caller computed them already (the batched engine);
    by default they are computed here. ``share=False``: the reply leaves out the noise
    share (``fedrec.ddp.encode``; a simulation adds the survivors' shares to the sum).
    """
    p = cfg.privacy
    ledger = ledger or Ledger(delta=p.delta, unit=privacy.USER_UNIT_OF_PRIVACY)
    entry = plan.entry(plan.n_min)
    after = privacy.skellam_epsilon(ledger.user_history + [entry], p.delta)
    state = state or ClientState(user_ids=list(data.user_ids))
    if not ddp_allows(cfg, ledger, plan):
        return DDPReply(None, state, ledger, ledger.epsilon)
    order = shared_order(cfg, data.n_items)
    new_state = state
    rng = np.random.default_rng(privacy.dp_seed(p, seed, server_round, privacy.USER_NOISE))
    if task == "prior":
        ints = encode(prior_vector(data.train.users, data.train.items, data.n_items),
                      np.zeros(len(count_keys(cfg))), plan, rng, share=share)
        return DDPReply(ints, state, dataclasses.replace(
            ledger, user_history=privacy.add_skellam_entry(ledger.user_history, entry),
            epsilon=after, delta=p.delta, unit=privacy.USER_UNIT_OF_PRIVACY), after)
    if counts is None:
        counts = evaluate_client(cfg, data, shared, state if state.local else None,
                                 seed=seed, state_file=state_file)
    vector = count_vector(cfg, counts)
    update = np.zeros(sum(v.size for v in shared.values()))
    train = task == "train"
    if train:
        res = fit or fit_client(cfg, data, shared, state, ledger, seed=seed,
                                server_round=server_round, state_file=state_file)
        if res.shared is not None:
            update = flatten(res.shared, order) - flatten(shared, order)
            new_state = res.state
    ints = encode(update, vector, plan, rng, share=share)
    new_ledger = dataclasses.replace(
        ledger, user_history=privacy.add_skellam_entry(ledger.user_history, entry),
        rounds=ledger.rounds + int(train), epsilon=after, delta=p.delta,
        unit=privacy.USER_UNIT_OF_PRIVACY)
    return DDPReply(ints, new_state, new_ledger, after)
