"""Content-hash caches of network outputs, shared by the gallery and evaluate stages.

A cache file holds the vectors one producer (a model, a backbone) computed, by the sha256 of each input item; the
file's name carries the producer's key (`embedding_key`: the producer's identity, the runtime code that runs
it and torch's thread count), so a new model, changed runtime code or another thread count never reuses old
vectors, and saving drops the files of older producers. A damaged file is only a cache: it is ignored and its
vectors are computed again.

The evaluate cache (EVALUATE_CACHE) holds one file per model, named after the model's sha256 (model_prefix), and
keeps the files of the current model and of the pinned ones only (prune_models): the release pins the model it
releases (and, while it re-scores the last release, that one too), so experiments and newer models never push out
the vectors the next release re-scores its last release with.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from .fsutil import atomic_write_bytes, dumps_json
from .runtime import RUNTIME_DIR

RUNTIME_CODE = ("imaging.py", "backbones.py", "model.py", "encoder.py")
# The evaluate stage's cache folder (not a DVC output: what it holds never changes a report, so neither a re-score
# writing into it nor a fresh clone without it makes evaluate run again), and its list of pinned models.
EVALUATE_CACHE = Path("models/evaluate-cache")
PINS_FILE = "pinned-models.json"


def embedding_key(producer: str) -> str:
    """What a cached vector depends on besides its item: `producer` (e.g. the model's sha256), the runtime code
    that computes it (a code change with the same model, e.g. a new embedding layout, must not reuse old vectors)
    and torch's thread count: CPU kernels split the work by it, and a vector's last bits follow (measured on the
    demo model: up to 2e-7 between 1 and 2 threads), so a gallery never mixes vectors of two thread counts."""
    h = hashlib.sha256(f"{producer} torch threads {torch.get_num_threads()}".encode())
    for name in RUNTIME_CODE:
        h.update((RUNTIME_DIR / name).read_bytes())
    return h.hexdigest()


class EmbeddingCache:
    """item sha256 -> vector, for one producer key: the file `<folder>/<prefix><key[:20]>.npz`. Files of other
    keys with the same prefix are removed on save; several prefixes (producers) may share a folder."""

    def __init__(self, folder: Path, key: str, prefix: str = ""):
        self.folder, self.key, self.prefix = Path(folder), key, prefix
        self.path = self.folder / f"{prefix}{key[:20]}.npz"
        self.table: dict[str, np.ndarray] = {}
        self.loaded = -1  # vectors the file held; -1: no usable file
        if self.path.exists():
            try:
                with np.load(self.path) as data:
                    keys, vectors = data["keys"], data["vectors"]
                if len(keys) != len(vectors) or vectors.ndim != 2:
                    raise ValueError("keys and vectors differ in length")
                self.table = dict(zip(keys.tolist(), vectors))
                self.loaded = len(self.table)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                self.table = {}  # a damaged cache is only a cache: recompute

    def save(self) -> None:
        """Write the table (when it grew or no usable file holds it) and remove the files of other producers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if len(self.table) != self.loaded:
            keys = sorted(self.table)
            buf = io.BytesIO()
            vectors = np.stack([self.table[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
            np.savez(buf, keys=np.array(keys), vectors=vectors)
            atomic_write_bytes(self.path, buf.getvalue())
            self.loaded = len(self.table)
        for old in self.folder.glob(f"{self.prefix}*.npz"):  # vectors of older producers are useless now
            if old != self.path:
                old.unlink()


def model_prefix(model_sha256: str) -> str:
    """The name prefix of a model's embedding files in the evaluate cache: `model-<first 16 hex of its sha256>-`."""
    return f"model-{model_sha256[:16]}-"


def pinned_models(folder: Path) -> list[str]:
    """The sha256 of the models whose files prune_models keeps (none when the pins file is missing or damaged)."""
    try:
        pins = json.loads((Path(folder) / PINS_FILE).read_text(encoding="utf-8"))["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [p for p in pins if isinstance(p, str)] if isinstance(pins, list) else []


def pin_models(folder: Path, model_sha256s: list[str]) -> None:
    """Pin exactly these models (sha256 of their files): their embeddings outlive newer models' runs."""
    atomic_write_bytes(Path(folder) / PINS_FILE, dumps_json({"models": sorted(set(model_sha256s))}).encode())


def prune_models(folder: Path, current_sha256: str) -> list[str]:
    """Remove the embedding files of models other than the current and the pinned ones; the names removed. Files
    of the old layout (`model-<key>.npz`, no model digest) are removed too."""
    keep = {model_prefix(sha) for sha in [current_sha256, *pinned_models(folder)]}
    removed = []
    for path in sorted(Path(folder).glob("model-*.npz")):
        if not any(path.name.startswith(prefix) for prefix in keep):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.name)
    return removed
