"""Typed, frozen run configuration, parsed once from a flat kebab-case mapping.

Every field of every section has a unique name; its flat key is the field name with
``_`` replaced by ``-`` (``noise_multiplier`` -> ``noise-multiplier``). The same keys are
used by the CLI, by ``[tool.flwr.app.config]`` and by experiment TOML files.

>>> cfg = RunConfig.from_flat({"model": "mf", "epochs": 3})
>>> cfg.model.model, cfg.train.epochs
('mf', 3)
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedrec.errors import ConfigError

FAULT_KINDS = ("raise", "nan", "inf", "shape", "keys", "dtype", "norm", "mixed", "timeout")
DATASETS = ("synthetic", "ml-100k", "ml-1m", "ml-latest-small", "movietweetings", "csv")
MODELS = ("mf", "neumf", "mlp", "deepfm", "widedeep")
FEATURE_MODELS = ("deepfm", "widedeep")  # models that read side features
OBJECTIVES = ("bce", "bpr", "softmax", "mse")
ACCOUNTANTS = ("rdp", "prv")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _int_list(text: str) -> tuple[int, ...]:
    """``"64,32"`` -> ``(64, 32)``; raises ValueError on a non-integer item."""
    return tuple(int(s) for s in text.split(",") if s.strip())


def _check_int_list(text: str, key: str, example: str) -> None:
    try:
        values = _int_list(text)
    except ValueError:
        values = ()
    _check(len(values) >= 1 and all(v >= 1 for v in values), key,
           f"comma-separated positive integers such as '{example}'", text)


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is cleaned, turned into feedback and split."""

    dataset: str = "synthetic"  # one of DATASETS
    data_dir: str = ""  # folder of a MovieLens/MovieTweetings download
    data_file: str = ""  # ratings file for dataset=csv (.csv/.tsv/.txt or .parquet)
    test_file: str = ""  # optional pre-split test file (same format as data_file)
    sep: str = ","  # field separator of a generic CSV
    user_col: str = "user"  # generic CSV column names
    item_col: str = "item"
    rating_col: str = "rating"  # "" for implicit-only data (every row a positive)
    time_col: str = "timestamp"  # "" if the file has none (row order is then time)
    encoding: str = "utf-8"  # text encoding of a generic CSV
    feedback: str = "implicit"  # "implicit" (ranking) or "explicit" (rating regression)
    threshold: float = 0.0  # implicit: a rating >= threshold is a positive; 0 keeps every rating
    min_interactions: int = 0  # k-core: drop users and items with fewer interactions
    split: str = "fraction"  # "fraction" (latest per user), "leave-last-out" or "random"
    test_fraction: float = 0.2  # share of each user's latest interactions held out
    validation: bool = False  # tuning: evaluate on a split carved from training, not on test
    negatives: int = 0  # sampled negatives per positive (implicit); 0: the setting's default
    negative_sampling: str = "auto"  # "unseen", "uniform" (any item); auto: uniform under DP
    eval_negatives: int = 0  # 0: full ranking; N: 1 held-out positive + N sampled negatives
    negatives_file: str = ""  # fixed eval negatives, "(user,item)<TAB>neg1<TAB>neg2..." a line
    item_features_file: str = ""  # CSV/Parquet, a row per item-col id: title, genres, fields
    user_features_file: str = ""  # CSV/Parquet, a row per user-col id: fields (kept local)
    synthetic_users: int = 600  # size of the generated default dataset
    synthetic_items: int = 1000
    synthetic_activity: float = 60.0  # mean interactions per generated user (ML-1M: 166)
    seed: int = 0  # seeds generation, split ties, sampling and initialisation

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, "dataset", f"one of {DATASETS}", self.dataset)
        _check(self.feedback in ("implicit", "explicit"), "feedback",
               "'implicit' or 'explicit'", self.feedback)
        _check(self.split in ("fraction", "leave-last-out", "random"), "split",
               "'fraction', 'leave-last-out' or 'random'", self.split)
        _check(0.0 < self.test_fraction < 1.0, "test-fraction", "a number in (0, 1)",
               self.test_fraction)
        _check(self.threshold >= 0, "threshold", "a number >= 0", self.threshold)
        _check(self.min_interactions >= 0, "min-interactions", "an integer >= 0",
               self.min_interactions)
        _check(self.negatives >= 0, "negatives", "an integer >= 1 (0: auto)", self.negatives)
        _check(self.negative_sampling in ("auto", "unseen", "uniform"), "negative-sampling",
               "'auto', 'unseen' or 'uniform'", self.negative_sampling)
        _check(self.eval_negatives >= 0, "eval-negatives", "an integer >= 0",
               self.eval_negatives)
        _check(self.synthetic_users >= 2, "synthetic-users", "an integer >= 2",
               self.synthetic_users)
        _check(self.synthetic_activity >= 10, "synthetic-activity", "a number >= 10",
               self.synthetic_activity)
        _check(self.synthetic_items >= 10, "synthetic-items", "an integer >= 10",
               self.synthetic_items)
        _check(len(self.sep) >= 1, "sep", "a non-empty separator", self.sep)
        _check(bool(self.rating_col) or self.feedback == "implicit", "rating-col",
               "a column name with feedback 'explicit' (explicit ratings need a rating "
               "column)", self.rating_col)


@dataclass(frozen=True)
class ModelConfig:
    """Model architecture."""

    # deepfm/widedeep read ids + item genres/decade + user demographics where the data has
    # them; mf, neumf, mlp read ids only
    model: str = "mf"  # mf (dot product), neumf (GMF + MLP), mlp, deepfm, widedeep
    dim: int = 0  # embedding dimension; 0: the setting's tuned default (see RECIPES)
    mlp_layers: str = "64,32,16"  # hidden sizes of the MLP tower (neumf, mlp)
    init_std: float = 0.01  # std of the normal embedding initialisation
    feature_buckets: int = 2048  # rows of each hashed feature-value table (deepfm, widedeep)
    # deepfm/widedeep: chance that training drops an item's id embedding and bias, so the
    # content features learn to score items alone (new items have only content)
    id_dropout: float = 0.0  # deepfm/widedeep: chance to drop an item's id in training
    # deepfm/widedeep: use the users' own features (age, gender, ...)? "auto": only where
    # they are protected or nothing is promised: under distributed DP (user-level, against
    # the server) and in non-private centralized runs. A reply's value-table rows show a
    # server which values a client's users have, and record-level DP does not cover them
    # (every rating carries them). "on": always (see docs/PRIVACY.md); "off": never.
    user_features: str = "auto"  # auto (only under ddp, or central without DP), on, off
    # deepfm/widedeep: "on" adds each item's title embedding (WordLlama, offline; the
    # optional extra fedrec[text]) to its content, through a shared projection
    item_text: str = "off"  # deepfm/widedeep: on adds title embeddings (fedrec[text])
    # deepfm/widedeep: each rating's context (hour of day, day of week, the item's age
    # then) as shared context rows; "auto": where the unit of privacy covers a rating's
    # time (centralized, record-level and distributed DP), not in non-private federated
    # rounds or user-level DP with the server's noise (``fedrec.features.uses_context``)
    context: str = "off"  # deepfm/widedeep: off, auto, on

    def __post_init__(self) -> None:
        _check(self.model in MODELS, "model", f"one of {MODELS}", self.model)
        _check(self.feature_buckets >= 2, "feature-buckets", "an integer >= 2",
               self.feature_buckets)
        _check(0 <= self.id_dropout < 1, "id-dropout", "a number in [0, 1)", self.id_dropout)
        _check(self.user_features in ("auto", "on", "off"), "user-features",
               "'auto', 'on' or 'off'", self.user_features)
        _check(self.item_text in ("on", "off"), "item-text", "'on' or 'off'", self.item_text)
        _check(self.item_text == "off" or self.model in FEATURE_MODELS, "item-text",
               f"'off' for model {self.model} (only {' and '.join(FEATURE_MODELS)} read "
               "titles)", self.item_text)
        _check(self.context in ("auto", "on", "off"), "context", "'auto', 'on' or 'off'",
               self.context)
        _check(self.context == "off" or self.model in FEATURE_MODELS, "context",
               f"'off' for model {self.model} (only {' and '.join(FEATURE_MODELS)} read "
               "context)", self.context)
        _check(self.dim >= 0, "dim", "an integer >= 1 (0: auto)", self.dim)
        _check(self.init_std > 0, "init-std", "a number > 0", self.init_std)
        _check_int_list(self.mlp_layers, "mlp-layers", "64,32,16")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """``mlp_layers`` as integers."""
        return _int_list(self.mlp_layers)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: the same for centralized and federated training."""

    epochs: int = 0  # centralized epochs (federated: local-epochs); 0: the setting's default
    batch_size: int = 0  # examples per step (one = a rating + negatives); 0: auto
    lr: float = 0.0  # learning rate; 0: the setting's tuned default
    weight_decay: float = 0.0  # L2 penalty applied by the optimizer
    optimizer: str = "auto"  # "adam", "sgd" or "auto" (the setting's tuned choice)
    objective: str = "bce"  # "bce", "bpr" or "softmax" (implicit), "mse" (explicit)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    early_stopping: int = 0  # central: stop after N epochs without validation gain; 0: off

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "epochs", "an integer >= 1 (0: auto)", self.epochs)
        _check(self.batch_size >= 0, "batch-size", "an integer >= 1 (0: auto)", self.batch_size)
        _check(self.lr >= 0, "lr", "a number > 0 (0: auto)", self.lr)
        _check(self.weight_decay >= 0, "weight-decay", "a number >= 0", self.weight_decay)
        _check(self.optimizer in ("adam", "sgd", "auto"), "optimizer", "'adam', 'sgd' or 'auto'",
               self.optimizer)
        _check(self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}",
               self.objective)
        _check(self.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'",
               self.device)
        _check(self.early_stopping >= 0, "early-stopping", "an integer >= 0",
               self.early_stopping)


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD through Opacus. The unit of privacy is one rating (with its negatives)."""

    dp: bool = True  # train with DP-SGD (--no-dp to turn it off)
    noise_multiplier: float = 1.0  # sigma, used when target-epsilon is 0
    target_epsilon: float = 8.0  # > 0: sigma is calibrated to spend exactly this over the run
    max_grad_norm: float = 0.0  # per-example clipping norm C; 0: auto
    sample_rate: float = 0.0  # DP-SGD Poisson rate q; 0: batch-size/n centrally, 1/8 on clients
    delta: float = 1e-5  # delta of the (epsilon, delta) guarantee
    accountant: str = "rdp"  # "rdp" or "prv"
    grad_sample_mode: str = "ghost"  # "ghost" (fedrec's exact fast norms) or "hooks" (Opacus)
    user_dp: bool = False  # user-level DP-FedAvg on the server (Flower's fixed-clipping wrapper)
    user_target_epsilon: float = 8.0  # user-level: z calibrated to spend this over `rounds`
    user_noise_multiplier: float = 0.0  # user-level z, used when user-target-epsilon is 0
    user_clip: float = 0.5  # user-level: L2 clip of each client's whole update
    ddp: bool = False  # distributed user-level DP: clients add noise shares, SecAgg+ sums
    ddp_dropout: float = 0.1  # ddp: share of sampled clients that may drop or collude
    ddp_bits: int = 16  # ddp: a clipped update becomes integers of L2 norm 2^bits
    ddp_prior: bool = False  # ddp: first release item counts, start item biases from them
    ddp_prior_weight: float = 1.0  # ddp: the prior's share of the budget, in rounds' worth
    eval_clip: float = 0.0  # ddp: L2 clip of a client's eval counts; 0: one user's worth
    eval_noise_multiplier: float = 0.0  # DP clients release eval counts with this noise; 0: none
    insecure_noise_seed: int = -1  # >= 0: reproducible, NOT secret DP noise (experiments only)

    def __post_init__(self) -> None:
        _check(self.user_target_epsilon >= 0 and math.isfinite(self.user_target_epsilon),
               "user-target-epsilon", "a finite number >= 0", self.user_target_epsilon)
        _check(self.user_noise_multiplier >= 0, "user-noise-multiplier", "a number >= 0",
               self.user_noise_multiplier)
        _check(self.user_clip > 0, "user-clip", "a number > 0", self.user_clip)
        _check(0 <= self.ddp_dropout < 1, "ddp-dropout", "a number in [0, 1)",
               self.ddp_dropout)
        _check(8 <= self.ddp_bits <= 22, "ddp-bits", "an integer in [8, 22]", self.ddp_bits)
        _check(self.ddp_prior_weight > 0, "ddp-prior-weight", "a number > 0",
               self.ddp_prior_weight)
        _check(self.eval_clip >= 0, "eval-clip", "a number >= 0", self.eval_clip)
        _check(not (self.ddp and (self.dp or self.user_dp)), "ddp",
               "false with dp or user-dp (distributed DP replaces both: turn them off)",
               self.ddp)
        _check(not self.ddp or self.user_target_epsilon > 0 or self.user_noise_multiplier > 0,
               "user-noise-multiplier", "> 0 (or user-target-epsilon > 0) with ddp",
               self.user_noise_multiplier)
        _check(not self.user_dp or self.user_target_epsilon > 0 or
               self.user_noise_multiplier > 0, "user-noise-multiplier",
               "> 0 (or user-target-epsilon > 0) with user-dp", self.user_noise_multiplier)
        _check(self.noise_multiplier >= 0, "noise-multiplier", "a number >= 0",
               self.noise_multiplier)
        _check(self.target_epsilon >= 0 and math.isfinite(self.target_epsilon),
               "target-epsilon", "a finite number >= 0", self.target_epsilon)
        _check(self.max_grad_norm >= 0, "max-grad-norm", "a number > 0 (0: auto)",
               self.max_grad_norm)
        _check(0 <= self.sample_rate <= 1, "sample-rate", "a number in [0, 1]",
               self.sample_rate)
        _check(self.eval_noise_multiplier >= 0, "eval-noise-multiplier", "a number >= 0",
               self.eval_noise_multiplier)
        _check(self.insecure_noise_seed >= -1, "insecure-noise-seed",
               "-1 (secret noise) or a seed >= 0", self.insecure_noise_seed)
        _check(0 < self.delta < 1, "delta", "a number in (0, 1)", self.delta)
        _check(self.accountant in ACCOUNTANTS, "accountant", f"one of {ACCOUNTANTS}",
               self.accountant)
        _check(self.grad_sample_mode in ("ghost", "hooks"), "grad-sample-mode",
               "'ghost' or 'hooks'", self.grad_sample_mode)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation cut-offs."""

    top_k: str = "10,20"  # comma-separated K values for Precision/Recall/NDCG/HR@K
    eval_every: int = 1  # evaluate every N epochs (0: only at the end)

    def __post_init__(self) -> None:
        _check_int_list(self.top_k, "top-k", "10,20")
        _check(self.eval_every >= 0, "eval-every", "an integer >= 0", self.eval_every)

    @property
    def ks(self) -> tuple[int, ...]:
        """``top_k`` as sorted integers."""
        return tuple(sorted(set(_int_list(self.top_k))))


@dataclass(frozen=True)
class FedConfig:
    """Federation: partitioning, rounds, sampling, client state, budget cap."""

    rounds: int = 20  # federated rounds
    local_epochs: int = 0  # local epochs per round (each client); 0: auto
    partition: str = "cross-silo"  # "cross-device" (a client per user) or "cross-silo"
    num_clients: int = 10  # cross-silo: number of clients (0: the number of nodes)
    fraction: float = 1.0  # share of clients sampled for training each round
    min_clients: int = 2  # at least this many clients train each round
    fraction_evaluate: float = 1.0  # share of clients evaluated each round
    # one message per node per round: the train message also evaluates the global model it
    # carries (the previous round's); the last round's model gets an evaluate message
    eval_with_train: bool = True
    epsilon_cap: float = 0.0  # a client never trains past this epsilon; 0: target-epsilon
    item_weighting: str = "auto"  # non-DP aggregation of item rows: "auto", "touched", "uniform"
    server_lr: float = 0.0  # server step on the averaged update (1: FedAvg); 0: auto
    server_opt: str = "auto"  # "avg" (FedAvg with server-lr), "adam" (FedAdam) or "auto"
    aggregation: str = "mean"  # "mean" (fedrec FedAvg), or robust: "median", "trimmed-mean", "krum"
    trim_fraction: float = 0.1  # trimmed-mean: share cut at each end, per coordinate
    krum_malicious: int = 1  # krum: assumed number of malicious clients per round
    max_update_norm: float = 1e4  # drop a client update whose L2 norm exceeds this (0: off)
    clip_update_norm: float = 0.0  # > 0: scale each client update down to this L2 norm
    fault_rate: float = 0.0  # testing: every round(1/rate)-th client misbehaves each round
    fault_kind: str = "raise"  # testing: raise, nan, inf, shape, keys, dtype, norm, mixed, timeout
    round_timeout: float = 3600.0  # seconds the server waits for replies per train/evaluate step
    secagg_shares: int = 0  # SecAgg+ neighbours per client (ddp); 0: from clients and ddp-dropout
    secagg_threshold: int = 0  # SecAgg+ shares needed to unmask (ddp); 0: a majority of them
    checkpoint_dir: str = ".fedrec-checkpoint"  # server checkpoint, written every round ("": off)
    resume: bool = False  # continue from the checkpoint in checkpoint-dir up to `rounds`
    overwrite: bool = False  # server: replace an existing out-dir and checkpoint
    num_items: int = 0  # size of the item catalogue (0: read it from the dataset)
    state_dir: str = ".fedrec-state"  # where each client keeps its user embeddings and epsilon
    out_dir: str = ""  # server: results directory ("" writes none)
    verbose: bool = True  # server: print one line per round

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "rounds", "an integer >= 1", self.rounds)
        _check(self.local_epochs >= 0, "local-epochs", "an integer >= 1 (0: auto)",
               self.local_epochs)
        _check(self.partition in ("cross-device", "cross-silo"), "partition",
               "'cross-device' or 'cross-silo'", self.partition)
        _check(self.num_clients >= 0, "num-clients", "an integer >= 0", self.num_clients)
        _check(0 < self.fraction <= 1, "fraction", "a number in (0, 1]", self.fraction)
        _check(self.min_clients >= 1, "min-clients", "an integer >= 1", self.min_clients)
        _check(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", "a number in [0, 1]",
               self.fraction_evaluate)
        _check(self.epsilon_cap >= 0, "epsilon-cap", "a number >= 0", self.epsilon_cap)
        _check(self.item_weighting in ("auto", "touched", "uniform"), "item-weighting",
               "'auto', 'touched' or 'uniform'", self.item_weighting)
        _check(self.num_items >= 0, "num-items", "an integer >= 0", self.num_items)
        _check(self.aggregation in ("mean", "median", "trimmed-mean", "krum"), "aggregation",
               "'mean', 'median', 'trimmed-mean' or 'krum'", self.aggregation)
        _check(0 <= self.trim_fraction < 0.5, "trim-fraction", "a number in [0, 0.5)",
               self.trim_fraction)
        _check(self.krum_malicious >= 0, "krum-malicious", "an integer >= 0",
               self.krum_malicious)
        _check(self.max_update_norm >= 0, "max-update-norm", "a number >= 0",
               self.max_update_norm)
        _check(self.clip_update_norm >= 0, "clip-update-norm", "a number >= 0",
               self.clip_update_norm)
        _check(self.round_timeout > 0, "round-timeout", "a number of seconds > 0",
               self.round_timeout)
        _check(self.secagg_shares == 0 or self.secagg_shares >= 3, "secagg-shares",
               "0 (auto) or an integer >= 3", self.secagg_shares)
        _check(self.secagg_threshold >= 0, "secagg-threshold", "an integer >= 0",
               self.secagg_threshold)
        _check(0 <= self.fault_rate <= 1, "fault-rate", "a number in [0, 1]", self.fault_rate)
        _check(self.fault_kind in FAULT_KINDS, "fault-kind", f"one of {FAULT_KINDS}",
               self.fault_kind)
        _check(self.server_opt in ("avg", "adam", "auto"), "server-opt",
               "'avg', 'adam' or 'auto'",
               self.server_opt)
        _check(0 <= self.server_lr <= 100, "server-lr", "a number in (0, 100] (0: auto)",
               self.server_lr)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "eval": EvalConfig,
    "fed": FedConfig,
}


def _flat_fields() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    out: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            out[f.name.replace("_", "-")] = (section, f)
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default``; raise ConfigError naming ``key``."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        if math.isnan(out):
            raise ConfigError(f"config key '{key}': expected a number, got NaN")
        return out
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


# Keys whose default depends on the setting, with the value that means "auto".
AUTO: dict[str, Any] = {"dim": 0, "optimizer": "auto", "lr": 0.0, "batch-size": 0,
                        "max-grad-norm": 0.0, "sample-rate": 0.0, "local-epochs": 0,
                        "server-opt": "auto", "server-lr": 0.0, "negatives": 0, "epochs": 0}
# The tuned defaults per setting: chosen on a validation split carved from ML-100K's
# training data (simulations/tune.py; docs/BENCHMARKS.md has the grids and the results on
# the test split, simulations/benchmark_defaults.py measures them).
RECIPES: dict[str, dict[str, Any]] = {
    "central": {"dim": 64, "optimizer": "adam", "lr": 0.002, "batch-size": 1024,
                "max-grad-norm": 1.0, "sample-rate": 0.0, "local-epochs": 1,
                "server-opt": "avg", "server-lr": 1.0, "negatives": 20, "epochs": 37},
    "central-dp": {"dim": 8, "optimizer": "adam", "lr": 0.02, "batch-size": 1024,
                   "max-grad-norm": 0.25, "sample-rate": 0.05, "local-epochs": 1,
                   "server-opt": "avg", "server-lr": 1.0, "negatives": 20, "epochs": 40},
    "cross-silo": {"dim": 64, "optimizer": "adam", "lr": 0.01, "batch-size": 1024,
                   "max-grad-norm": 1.0, "sample-rate": 0.0, "local-epochs": 2,
                   "server-opt": "avg", "server-lr": 1.0},
    "cross-silo-dp": {"dim": 8, "optimizer": "sgd", "lr": 80.0, "batch-size": 1024,
                      "max-grad-norm": 0.25, "sample-rate": 0.2, "local-epochs": 2,
                      "server-opt": "avg", "server-lr": 1.0},
    "cross-device": {"dim": 64, "optimizer": "sgd", "lr": 1.0, "batch-size": 16,
                     "max-grad-norm": 1.0, "sample-rate": 0.125, "local-epochs": 2,
                     "server-opt": "adam", "server-lr": 0.03},
}
# federated runs train local-epochs (epochs: unused there)
for _name, _negatives in (("cross-silo", 20), ("cross-silo-dp", 20), ("cross-device", 8)):
    RECIPES[_name].update({"negatives": _negatives, "epochs": 40})
# any DP mode on one-user clients: one local epoch, dim 32, 4 negatives and FedAdam 0.05
# (what the privacy sweeps measured; DP noise grows with the dimension)
RECIPES["cross-device-dp"] = {**RECIPES["cross-device"], "local-epochs": 1, "dim": 32,
                              "negatives": 4, "server-lr": 0.05}


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run.

    Keys at their "auto" value (``AUTO``) take the tuned default of the run's setting
    (``RECIPES``): ``central``/``central-dp`` for centralized training (``for_central``),
    else by partition and DP (``cross-silo``, ``cross-silo-dp``, ``cross-device``,
    ``cross-device-dp``: record-level, user-level or distributed DP).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    central: bool = field(default=False, compare=False, repr=False)  # a centralized run

    @property
    def setting(self) -> str:
        """The recipe this run's auto keys take."""
        dp = self.privacy.dp
        if self.central:
            return "central-dp" if dp else "central"
        if self.fed.partition == "cross-device":
            private = dp or self.privacy.user_dp or self.privacy.ddp
            return "cross-device-dp" if private else "cross-device"
        return "cross-silo-dp" if dp else "cross-silo"

    def _resolve(self) -> None:
        """Replace auto values by the setting's recipe (once, at construction)."""
        recipe = RECIPES[self.setting]
        known = _flat_fields()
        autos = []
        for key, sentinel in AUTO.items():
            section, f = known[key]
            obj = getattr(self, section)
            if getattr(obj, f.name) == sentinel:
                autos.append(key)
                object.__setattr__(self, section, dataclasses.replace(
                    obj, **{f.name: recipe[key]}))
        object.__setattr__(self, "_autos", tuple(autos))

    def for_central(self) -> RunConfig:
        """This config for centralized training: auto keys take the central recipe."""
        if self.central:
            return self
        flat = self.to_flat()
        flat.update({k: AUTO[k] for k in getattr(self, "_autos", ())})
        return RunConfig.from_flat(flat, central=True)

    def __post_init__(self) -> None:
        self._resolve()
        _check(not (self.privacy.dp and self.data.negative_sampling == "unseen"),
               "negative-sampling", "'uniform' or 'auto' with dp (negatives drawn from the "
               "items a user did not rate depend on the user's other ratings)",
               self.data.negative_sampling)

        _check(not (self.privacy.dp and self.train.early_stopping), "early-stopping",
               "0 with dp (choosing the epoch on validation ratings would read private data "
               "outside epsilon)", self.train.early_stopping)
        _check(not (self.privacy.user_dp and self.fed.aggregation != "mean"), "aggregation",
               "'mean' with user-dp (robust rules would change the clipped sum's "
               "sensitivity)", self.fed.aggregation)

    @property
    def uniform_negatives(self) -> bool:
        """Whether negatives are drawn from the whole catalogue (always under DP)."""
        mode = self.data.negative_sampling
        return mode == "uniform" or (mode == "auto" and self.privacy.dp)

    @property
    def fused_evaluation(self) -> bool:
        """Whether clients evaluate inside the train message (``eval-with-train``).

        Only where it changes nothing but the message count: every client trains and is
        evaluated each round (``fraction`` and ``fraction-evaluate`` 1), clients report
        counts at all (not under record-level DP without ``eval-noise-multiplier``), and
        not with distributed DP (its SecAgg+ rounds carry their own evaluation).
        """
        p, f = self.privacy, self.fed
        return (f.eval_with_train and f.fraction == 1.0 and f.fraction_evaluate == 1.0
                and not p.ddp and (not p.dp or p.eval_noise_multiplier > 0))

    @property
    def epsilon_cap(self) -> float:
        """The epsilon a client never exceeds: ``epsilon-cap``, else ``target-epsilon``
        (0, no cap, when sigma is given explicitly and no cap is set)."""
        return self.fed.epsilon_cap or self.privacy.target_epsilon

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, ignore: tuple[str, ...] = (),
                  central: bool = False) -> RunConfig:
        """Build from flat kebab-case keys; unknown keys raise ConfigError.

        Args:
            values: e.g. ``{"noise-multiplier": 1.2, "top-k": "10,20"}``.
            ignore: keys owned by another layer (e.g. federation settings), skipped.
            central: resolve auto keys for centralized training.

        Raises:
            ConfigError: an unknown key, a wrong type or an out-of-range value.
        """
        known = _flat_fields()
        per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in values.items():
            if key in ignore:
                continue
            if key not in known:
                valid = ", ".join(sorted(known))
                raise ConfigError(f"unknown config key '{key}'; valid keys: {valid}")
            section, f = known[key]
            per_section[section][f.name] = _coerce(key, value, f.default)
        return cls(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()},
                   central=central)

    def to_flat(self) -> dict[str, Any]:
        """The resolved configuration as flat kebab-case keys (for snapshots)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in fields(obj):
                out[f.name.replace("_", "-")] = getattr(obj, f.name)
        return out

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with some flat keys changed (auto keys re-resolved for the new setting)."""
        merged = self.to_flat()
        merged.update({k: AUTO[k] for k in getattr(self, "_autos", ())})
        merged.update(flat)
        return RunConfig.from_flat(merged, central=self.central)


# Keys a run sets itself per results directory (simulate, privacy-sweep), not user options.
RUN_MANAGED_KEYS = ("out-dir", "state-dir", "verbose", "checkpoint-dir", "resume",
                    "overwrite")


def changed_keys(saved: dict[str, Any], cfg: RunConfig, ignore: Sequence[str] = ()
                 ) -> list[str]:
    """Keys whose value in ``cfg`` differs from ``saved`` (a flat config read from JSON).

    Keys a newer fedrec added, absent from ``saved`` and at their default in ``cfg``,
    change nothing.
    """
    def norm(flat: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(flat, default=str))

    flat, defaults = norm(cfg.to_flat()), norm(RunConfig().to_flat())
    return sorted(k for k in set(saved) | set(flat) if k not in ignore
                  and saved.get(k) != flat.get(k)
                  and not (k not in saved and flat.get(k) == defaults.get(k)))


def flat_defaults() -> dict[str, Any]:
    """Every key with its default value as written (auto keys at their auto value)."""
    return {f.name.replace("_", "-"): f.default for cls in SECTIONS.values()
            for f in fields(cls)}


# Keys a results directory's config.json holds besides the config (fedrec.report.run_facts)
RUN_FACT_KEYS = ("fedrec_version", "command", "python", "torch_version", "flwr_version",
                 "opacus_version", "numpy_version", "git_commit")


def read_config_file(path: str) -> dict[str, Any]:
    """Flat config keys from a TOML file (``key = value`` lines, kebab-case keys) or from a
    results directory's ``config.json`` (its run facts and run-managed keys dropped).

    Raises:
        ConfigError: naming the file: unreadable, not a table, or an unknown key.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except OSError as err:
        raise ConfigError(f"{file}: cannot read the config file ({err.strerror})") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{file}: not a valid {'JSON' if file.suffix == '.json' else 'TOML'}"
                          f" config file ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: expected a table of config keys")
    values = {k: v for k, v in values.items()
              if k not in RUN_FACT_KEYS and k not in RUN_MANAGED_KEYS}
    known = _flat_fields()
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"{file}: unknown config key(s) {unknown}; valid keys: "
                          f"{', '.join(sorted(known))}")
    return values
