"""Client state: user embeddings (a torch file) and the privacy ledger (JSON), per node.

Two files per partition/node in its state dir, both written atomically (temporary file
+ rename) with a format name and version:

- ``client-<p>.pt``: the local model state (user embeddings and biases). Losing it loses
  personalisation, not privacy: the next round starts the embeddings afresh.
- ``ledger-<p>.json``: the privacy ledger (accountant history, rounds, evaluations,
  epsilon, explicit resets). It is kept apart from the model state so that replacing
  the model never touches it. A ledger that is missing after the node has trained is a
  StateError, never a silent restart at epsilon 0; ``reset_ledger`` (``fedrec ledger
  reset``) is the explicit, logged operator action that starts a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedrec.errors import StateError
from fedrec.report import write_bytes_atomic

FORMAT = "fedrec-client-state"
VERSION = 2
LEDGER_FORMAT = "fedrec-privacy-ledger"
LEDGER_VERSION = 1


@dataclass
class ClientState:
    """The local model state a client keeps between rounds and across restarts."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # user embeddings/biases
    rounds: int = 0  # rounds trained with these embeddings
    user_ids: list[str] = field(default_factory=list)  # the users the local tables index


@dataclass
class Ledger:
    """A client's privacy spend: everything its epsilon is computed from."""

    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)
    # distributed user-level DP: Skellam releases (mu_total assumed, l2, l1, count)
    user_history: list[tuple[float, float, float, int]] = field(default_factory=list)
    rounds: int = 0  # rounds trained under DP (or not)
    evaluations: int = 0  # noised evaluation releases (also in history)
    epsilon: float = 0.0  # epsilon of history at delta
    delta: float = 0.0
    unit: str = ""  # the unit of privacy epsilon refers to
    resets: list[dict[str, Any]] = field(default_factory=list)  # explicit operator resets


def state_path(state_dir: str | Path, partition: int | str) -> Path:
    """The model state file of one partition (or node)."""
    return Path(state_dir) / f"client-{partition}.pt"


def find_partition(state_dir: str | Path, user: str) -> str:
    """The partition whose state file holds ``user`` (scans ``client-*.pt``).

    Raises:
        StateError: no state file holds the user.
    """
    folder = Path(state_dir)
    files = sorted(folder.glob("client-*.pt"))
    for path in files:
        state = load_state(path)
        if state is not None and user in state.user_ids:
            return path.stem.removeprefix("client-")
    raise StateError(f"{folder}: no client state holds user {user!r} ({len(files)} state "
                     "files searched)")


def ledger_path(state_dir: str | Path, partition: int | str) -> Path:
    """The privacy ledger of one partition (or node)."""
    return Path(state_dir) / f"ledger-{partition}.json"


def save_state(path: Path, state: ClientState) -> None:
    """Write atomically; a crash leaves the previous file intact."""
    _save({"format": FORMAT, "version": VERSION, "local": state.local,
           "rounds": state.rounds, "user_ids": list(state.user_ids)}, path)


def save_ledger(path: Path, ledger: Ledger) -> None:
    """Write the ledger atomically (JSON, readable by operators)."""
    payload = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
               "history": [list(h) for h in ledger.history],
               "user_history": [list(h) for h in ledger.user_history], "rounds": ledger.rounds,
               "evaluations": ledger.evaluations, "epsilon": ledger.epsilon,
               "delta": ledger.delta, "unit": ledger.unit, "resets": ledger.resets}
    write_bytes_atomic(path, (json.dumps(payload, indent=1) + "\n").encode())


def load_ledger(path: Path, *, trained_evidence: Path | None = None) -> Ledger | None:
    """Read a ledger; None when there is none and the node shows no sign of training.

    Args:
        path: the ledger file.
        trained_evidence: the node's model state file; if it exists while the ledger
            does not, the ledger was lost and the node refuses to start over at 0.

    Raises:
        StateError: unreadable, foreign, or missing after training.
    """
    if not path.exists():
        if trained_evidence is not None and trained_evidence.exists():
            raise StateError(
                f"{path}: privacy ledger missing although this node has trained "
                f"({trained_evidence} exists); its epsilon is never restarted at 0 "
                "silently. Restore the ledger, or reset it deliberately with 'fedrec "
                f"ledger reset --state-dir {path.parent} --partition "
                f"{path.stem.removeprefix('ledger-')} --reason TEXT' (logged)")
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(f"{path}: corrupted privacy ledger ({type(err).__name__}); "
                         "refusing to start over, which would reset this node's epsilon. "
                         "Restore the file, or reset it deliberately with 'fedrec ledger "
                         "reset'") from None
    if not isinstance(payload, dict) or payload.get("format") != LEDGER_FORMAT:
        raise StateError(f"{path}: not a fedrec privacy ledger")
    if payload.get("version") != LEDGER_VERSION:
        raise StateError(f"{path}: ledger version {payload.get('version')!r}; this fedrec "
                         f"reads version {LEDGER_VERSION}")
    try:
        return Ledger(
            history=[(float(s), float(q), int(n)) for s, q, n in payload["history"]],
            user_history=[(float(m), float(a), float(b), int(n))
                          for m, a, b, n in payload["user_history"]],
            rounds=int(payload["rounds"]), evaluations=int(payload["evaluations"]),
            epsilon=float(payload["epsilon"]), delta=float(payload["delta"]),
            unit=str(payload["unit"]), resets=list(payload["resets"]))
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{path}: privacy ledger has a bad field ({err})") from None


@contextlib.contextmanager
def ledger_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a ledger (``ledger-<p>.lock``, flock) across processes:
    two messages handled at once (two runs on one node) must not both read the same
    spend and both add to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def reset_ledger(state_dir: str | Path, partition: int | str, reason: str) -> Path:
    """Start a new, empty ledger deliberately; the old one (if any) is kept aside.

    The reset is recorded in the new ledger (time, reason, the epsilon left behind) and
    appended to ``ledger-<p>.log`` next to it.
    """
    if not reason.strip():
        raise StateError("a ledger reset needs a reason (it is logged)")
    path = ledger_path(state_dir, partition)
    with ledger_lock(path):
        return _reset_ledger(path, reason)


def _reset_ledger(path: Path, reason: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    previous: Ledger | None = None
    status = "missing"
    if path.exists():
        try:
            previous = load_ledger(path)
            status = "kept aside"
        except StateError:
            status = "unreadable, kept aside"
        os.replace(path, path.with_name(f"{path.stem}.before-reset-{stamp}.json"))
    event = {"time": stamp, "reason": reason,
             "previous_epsilon": previous.epsilon if previous else None,
             "previous_file": status}
    save_ledger(path, Ledger(resets=(previous.resets if previous else []) + [event]))
    with path.with_suffix(".log").open("a") as log:
        log.write(json.dumps(event) + "\n")
    return path


def _save(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: Path) -> ClientState | None:
    """Read a state file; None if it does not exist.

    Raises:
        StateError: unreadable, foreign or of an unknown version.
    """
    if not path.exists():
        return None
    payload = _load(path, FORMAT, "client state",
                    hint="; move it aside to start the user embeddings afresh (the privacy "
                    "ledger is a separate file and is kept)", version=VERSION)
    try:
        return ClientState(
            local=dict(payload["local"]), rounds=int(payload["rounds"]),
            user_ids=[str(u) for u in payload["user_ids"]])
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{path}: client state is missing or has a bad field ({err})") from None


def _load(path: Path, fmt: str, what: str, hint: str = "", version: int = 1
          ) -> dict[str, Any]:
    """A fedrec file of format ``fmt``: StateError naming it if unreadable or foreign."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise StateError(f"{path}: corrupted {what} ({type(err).__name__}){hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise StateError(f"{path}: not a fedrec {what} file")
    if payload.get("version") != version:
        raise StateError(f"{path}: {what} version {payload.get('version')!r}; this fedrec "
                         f"reads version {version}{hint}")
    return payload


GLOBAL_FORMAT = "fedrec-global-model"
CHECKPOINT_FORMAT = "fedrec-server-checkpoint"
CHECKPOINT_VERSION = 2


def global_path(state_dir: str | Path, partition: int | str) -> Path:
    """Where a client keeps the last global shared model it received."""
    return Path(state_dir) / f"global-{partition}.pt"


def save_global(path: Path, shared: dict[str, Any], config: dict[str, Any]) -> None:
    """Keep the last global shared model and the run's flat config (atomic)."""
    _save({"format": GLOBAL_FORMAT, "version": 1, "config": dict(config),
           "shared": {k: torch.as_tensor(v) for k, v in shared.items()}}, path)


def load_global(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The last global shared model a client received and the run's flat config."""
    if not path.exists():
        raise StateError(f"{path}: no global model yet; it is written when the node "
                         "first evaluates (after round 1)")
    payload = _load(path, GLOBAL_FORMAT, "global model")
    return dict(payload["shared"]), dict(payload.get("config", {}))


def save_checkpoint(path: Path, round_: int, shared: dict[str, Any],
                    server_opt: dict[str, Any], rows: list[dict[str, Any]],
                    user_history: list[tuple[float, float, int]] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Server checkpoint: shared model, last completed round, server optimizer, rows, the
    user-level DP history (one (z, q, 1) entry per noised round) and ``extra`` (plain
    values: e.g. distributed DP's Skellam history and its pending row)."""
    _save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "round": round_,
           "shared": {k: torch.as_tensor(v) for k, v in shared.items()},
           "server_opt": {k: torch.as_tensor(v) for k, v in server_opt.items()},
           "rows": rows, "user_history": [list(h) for h in user_history or []],
           "extra": json.loads(json.dumps(extra or {}))}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A server checkpoint as saved (StateError naming the file if bad)."""
    if not path.exists():
        raise StateError(f"{path}: no server checkpoint to resume from")
    payload = _load(path, CHECKPOINT_FORMAT, "server checkpoint", version=CHECKPOINT_VERSION)
    try:
        return {"round": int(payload["round"]), "rows": list(payload["rows"]),
                "shared": {k: v.numpy() for k, v in payload["shared"].items()},
                "server_opt": {k: v.numpy() for k, v in payload["server_opt"].items()},
                "user_history": [(float(z), float(q), int(n))
                                 for z, q, n in payload["user_history"]],
                "extra": dict(payload.get("extra") or {})}
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise StateError(f"{path}: server checkpoint has a bad field ({err})") from None
