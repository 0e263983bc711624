"""Text embeddings of item titles, the content a new item with no ratings is scored by.

The encoder is WordLlama (``pip install 'fedrec[text]'``): a static token-embedding
model whose weights ship inside its PyPI package, so it loads offline and runs on the
CPU in milliseconds per thousand titles. A title is embedded without its ``(YYYY)``
suffix (the release decade is a feature of its own); the first ``TEXT_DIM`` of the
model's Matryoshka dimensions are kept. Titles are public catalogue data, so their
vectors cost no privacy; the layer that projects them into the model is a shared weight
trained under the run's DP like every other shared weight.

Vectors are cached per catalogue: in memory, and on disk under ``$FEDREC_CACHE``
(default ``~/.cache/fedrec``) in ``text/<sha256 of the titles>.npy``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedrec.errors import ConfigError
from fedrec.report import write_bytes_atomic

TEXT_DIM = 64  # kept dimensions of the encoder's 256 (Matryoshka: a prefix is a model)
ENCODER = "wordllama l2_supercat"  # named in the cache key
_YEAR_SUFFIX = re.compile(r"\s*\(\d{4}\)\s*$")
_WEIGHTS = Path("weights") / "l2_supercat_256.safetensors"
_TOKENIZER = Path("tokenizers") / "l2_supercat_tokenizer_config.json"


def clean_title(title: str) -> str:
    """The title without its trailing ``(YYYY)``; MovieLens's "Matrix, The" order is kept
    (a bag-of-tokens encoder does not care)."""
    return _YEAR_SUFFIX.sub("", title).strip()


@functools.lru_cache(maxsize=1)
def _encoder() -> object:
    """WordLlama's inference object, from the files its package ships (no download)."""
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    try:
        import wordllama
        from safetensors import safe_open
        from tokenizers import Tokenizer
        from wordllama.inference import WordLlamaInference
    except ImportError as e:
        raise ConfigError("item-text=on needs the text extra: pip install 'fedrec[text]' "
                          f"({e})") from e
    finally:  # its import calls logging.basicConfig(INFO): keep the caller's logging
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
    root = Path(wordllama.__file__).parent
    for part in (_WEIGHTS, _TOKENIZER):
        if not (root / part).is_file():
            raise ConfigError(f"item-text=on: {root / part} is missing; this wordllama "
                              "package does not ship its model (reinstall 'fedrec[text]')")
    with safe_open(str(root / _WEIGHTS), framework="np", device="cpu") as f:
        table = f.get_tensor("embedding.weight")
    return WordLlamaInference(table, Tokenizer.from_file(str(root / _TOKENIZER)))


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDREC_CACHE", Path.home() / ".cache" / "fedrec")) / "text"


@functools.lru_cache(maxsize=1)
def _encoder_version() -> str:
    try:
        return importlib.metadata.version("wordllama")
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def catalogue_key(titles: Sequence[str]) -> str:
    """A digest naming a catalogue's titles (each length-prefixed), the encoder and its
    version, and the kept dimensions."""
    h = hashlib.sha256(f"{ENCODER} {_encoder_version()}|{TEXT_DIM}\n".encode())
    for t in titles:
        raw = t.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


_MEMORY: dict[str, np.ndarray] = {}


def title_vectors(titles: Sequence[str]) -> np.ndarray:
    """``[len(titles), TEXT_DIM]`` float32: each title's embedding scaled to unit norm;
    zeros where the title is empty (an item with no text has no text feature)."""
    key = catalogue_key(titles)
    if key in _MEMORY:
        return _MEMORY[key]
    path = _cache_dir() / f"{key}.npy"
    out = _read_cached(path, len(titles))
    if out is None:
        out = _embed(titles)
        _write_cached(path, out)
    out.flags.writeable = False
    _MEMORY[key] = out
    return out


def _embed(titles: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(titles), TEXT_DIM), np.float32)
    texts = [clean_title(t) for t in titles]
    rows = [j for j, t in enumerate(texts) if t]
    if rows:
        enc = _encoder()
        vec = np.asarray(enc.embed([texts[j] for j in rows]),  # type: ignore[attr-defined]
                         np.float32)[:, :TEXT_DIM]
        norm = np.linalg.norm(vec, axis=1, keepdims=True)
        out[rows] = vec / np.maximum(norm, 1e-12)
    return out


def _read_cached(path: Path, n: int) -> np.ndarray | None:
    """The cached vectors, or None when absent or not what this catalogue needs: a
    damaged or foreign file (any load error, not one array, another shape or dtype, a
    row neither of unit norm nor zero) is recomputed, never trusted."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            out = np.load(f, allow_pickle=False)
    except Exception:  # noqa: BLE001 - whatever a damaged file raises, it is recomputed
        return None
    if (not isinstance(out, np.ndarray) or out.shape != (n, TEXT_DIM)
            or out.dtype != np.float32 or not np.isfinite(out).all()):
        return None
    with np.errstate(over="ignore"):  # a huge row overflows to inf: refused below
        norms = np.linalg.norm(out, axis=1)
    if not np.all((np.abs(norms - 1.0) < 1e-3) | (norms == 0.0)):
        return None
    return out


def _write_cached(path: Path, vectors: np.ndarray) -> None:
    """Best effort: a read-only home only costs the next run the encoding again."""
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    try:
        write_bytes_atomic(path, buf.getvalue())
    except OSError:
        pass
