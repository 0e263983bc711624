"""Client state files: user embeddings and privacy-accountant history, per partition.

One file per partition/node, written atomically (temporary file + rename) with a format
name and version. A missing file means a fresh client; a corrupted, foreign or
mismatched file is a StateError naming it, never a silent re-initialisation (which would
reset the client's epsilon).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedrec.errors import StateError

FORMAT = "fedrec-client-state"
VERSION = 1


@dataclass
class ClientState:
    """What a client keeps between rounds and across restarts."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # user embeddings/biases
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)
    rounds: int = 0  # rounds trained
    user_ids: list[str] = field(default_factory=list)  # the users the local tables index
    last_epsilon: float = 0.0  # epsilon reported after the last round


def state_path(state_dir: str | Path, partition: int | str) -> Path:
    """The state file of one partition (or node)."""
    return Path(state_dir) / f"client-{partition}.pt"


def save_state(path: Path, state: ClientState) -> None:
    """Write atomically; a crash leaves the previous file intact."""
    _save({"format": FORMAT, "version": VERSION, "local": state.local,
           "history": [list(h) for h in state.history], "rounds": state.rounds,
           "user_ids": list(state.user_ids), "last_epsilon": state.last_epsilon}, path)


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
                    hint="; refusing to start over, which would reset this client's epsilon. "
                    "Restore the file or remove it deliberately")
    try:
        return ClientState(
            local=dict(payload["local"]),
            history=[(float(s), float(q), int(n)) for s, q, n in payload["history"]],
            rounds=int(payload["rounds"]), user_ids=[str(u) for u in payload["user_ids"]],
            last_epsilon=float(payload.get("last_epsilon", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{path}: client state is missing or has a bad field ({err})") from None


def _load(path: Path, fmt: str, what: str, hint: str = "") -> dict[str, Any]:
    """A fedrec file of format ``fmt``: StateError naming it if unreadable or foreign."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise StateError(f"{path}: corrupted {what} ({type(err).__name__}){hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise StateError(f"{path}: not a fedrec {what} file")
    if payload.get("version") != VERSION:
        raise StateError(f"{path}: {what} version {payload.get('version')!r}; this fedrec "
                         f"reads version {VERSION}")
    return payload


GLOBAL_FORMAT = "fedrec-global-model"
CHECKPOINT_FORMAT = "fedrec-server-checkpoint"


def global_path(state_dir: str | Path, partition: int | str) -> Path:
    """Where a client keeps the last global shared model it received."""
    return Path(state_dir) / f"global-{partition}.pt"


def save_global(path: Path, shared: dict[str, Any], config: dict[str, Any]) -> None:
    """Keep the last global shared model and the run's flat config (atomic)."""
    _save({"format": GLOBAL_FORMAT, "version": VERSION, "config": dict(config),
           "shared": {k: torch.as_tensor(v) for k, v in shared.items()}}, path)


def load_global(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The last global shared model a client received and the run's flat config."""
    if not path.exists():
        raise StateError(f"{path}: no global model yet; it is written when the node "
                         "first evaluates (after round 1)")
    payload = _load(path, GLOBAL_FORMAT, "global model")
    return dict(payload["shared"]), dict(payload.get("config", {}))


def save_checkpoint(path: Path, round_: int, shared: dict[str, Any],
                    server_opt: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Server checkpoint: shared model, last completed round, server optimizer, rows."""
    _save({"format": CHECKPOINT_FORMAT, "version": VERSION, "round": round_,
           "shared": {k: torch.as_tensor(v) for k, v in shared.items()},
           "server_opt": {k: torch.as_tensor(v) for k, v in server_opt.items()},
           "rows": rows}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A server checkpoint as saved (StateError naming the file if bad)."""
    if not path.exists():
        raise StateError(f"{path}: no server checkpoint to resume from")
    payload = _load(path, CHECKPOINT_FORMAT, "server checkpoint")
    try:
        return {"round": int(payload["round"]), "rows": list(payload["rows"]),
                "shared": {k: v.numpy() for k, v in payload["shared"].items()},
                "server_opt": {k: v.numpy() for k, v in payload["server_opt"].items()}}
    except (KeyError, AttributeError, TypeError) as err:
        raise StateError(f"{path}: server checkpoint has a bad field ({err})") from None
