"""The served vectors of a gallery with an approximate index, read where they already lie: in its shard files.

The index (runtime/ann.py) holds only codes; its short list is ranked exactly against the gallery's float32
vectors, a few hundred a query. Rather than keep a copy of all of them (1.6 GB at 1M x 405, per worker),
ShardVectors maps each shard's embeddings array in its file (stored uncompressed, gallery_shards.shard_files) and
reads the rows a search asks for; with the model's gallery expansion it averages each row with its neighbours' as
the loader would (retrieval.weighted_mean, bit for bit). The pages are the kernel's file cache: shared by every
worker and version that serves the same shard files (the blob store keeps one copy of each), read on first use and
dropped under memory pressure, never copied into a worker. Maps are made with torch.from_file, which closes the
file after mapping (a gallery has up to 4096 shards, more than a process's usual open-file limit).
"""
from __future__ import annotations

import numpy as np
import torch

from .gallery_shards import ShardFile
from .retrieval import weighted_mean


class ShardVectors:
    """(items, dim) vectors indexed like a float32 array by an integer array `idx` of any shape: `self[idx]` is
    (*idx.shape, dim). `neighbours` (items, k): the gallery expansion's neighbours by position (None or k = 0: the
    shards' vectors as they are)."""

    def __init__(self, files: list[ShardFile], dim: int, neighbours: np.ndarray | None = None):
        self.maps = [_mapped(f, dim) for f in files]
        self.starts = np.concatenate([[0], np.cumsum([f.rows for f in files])]).astype(np.int64)
        self.dim = dim
        self.neighbours = neighbours if neighbours is not None and neighbours.shape[1] else None
        if self.neighbours is not None and len(self.neighbours) != len(self):
            raise ValueError(f"{len(self.neighbours)} neighbour rows for {len(self)} vectors")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.ravel()
        if len(flat) and not 0 <= flat.min() <= flat.max() < len(self):
            raise IndexError(f"gallery positions outside 0..{len(self) - 1}")
        if self.neighbours is None:
            rows = self.raw(flat)
        else:
            k = self.neighbours.shape[1]
            together = self.raw(np.concatenate([flat, self.neighbours[flat].T.ravel()]))  # one gather: own, rank 1..k
            parts = together.reshape(k + 1, len(flat), self.dim)
            rows = weighted_mean(parts[0], parts[1:], k)
        return rows.reshape(*idx.shape, self.dim)

    def raw(self, positions: np.ndarray) -> np.ndarray:
        """The shards' own float32 vectors at `positions` (1-D, manifest order, in range), shard by shard."""
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        order = np.argsort(shard, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1):
            if len(group):
                s = shard[group[0]]
                out[group] = self.maps[s][positions[group] - self.starts[s]]
        return out


def _mapped(file: ShardFile, dim: int) -> np.ndarray:
    """A read-only (rows, dim) array over the shard file's embeddings, memory-mapped (private: never written)."""
    dtype = np.dtype(file.dtype)
    size = file.offset + file.rows * dim * dtype.itemsize
    whole = torch.from_file(str(file.path), shared=False, size=size, dtype=torch.uint8).numpy()
    rows = whole[file.offset:size].view(dtype).reshape(file.rows, dim)
    rows.flags.writeable = False
    return rows
