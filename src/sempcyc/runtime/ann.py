"""Approximate nearest-neighbour search for large galleries, through faiss (the faiss-cpu package: a serving host
installs it into TorchServe's Python).

The index is faiss's inverted file over 4-bit product-quantised codes, scanned by its fast-scan kernels
(IndexIVFPQFastScan): faiss's k-means (seeded, on a sample) splits the gallery into `nlist` lists around coarse
centroids, and each vector is kept only as `width / code_dims` 4-bit codes of its offset from its list's centroid
(68 bytes at 405 wide, code_dims 3) and its id. A query scans the lists of its `nprobe` nearest centroids by the
codes' approximate distances; the best `shortlist` candidates are then ranked again exactly, in float32, against
the gallery's own vectors, which the caller hands in (`vectors`: anything indexed by an integer array, such as the
served gallery's shard files, memory-mapped) and the index never holds. So the answers' order and scores are exact
search's over the candidates found; what the codes can lose is only a neighbour that misses the short list.

The file is an .npz (deterministic bytes) of faiss's serialised index and what it was built for: the faiss
version, the digest of the vectors, their count and width, and the index's parameters. `load` refuses any mismatch
with one line (IndexMismatch), since faiss itself would read an index of another release or answer for another
gallery's vectors without complaint. Built on one OpenMP thread: then k-means and the coding give the same bytes
on any machine and under torchrun.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

try:  # a serving host's library: a host without it is told so by require_faiss(), not by a failed handler import
    # faiss's loader logs, at INFO, an "ImportError(...)" for each CPU-specific build it does not find before the one
    # it loads: in a TorchServe worker's log those read like the worker's own load failure
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss
except ImportError:
    faiss = None

from .gallery_shards import npz_bytes

FORMAT = 2
PACKAGE = "faiss-cpu"
CODE_BITS = 4  # faiss's fast-scan kernels read 4-bit codes
MIN_ITEMS = 2 ** CODE_BITS  # each code's k-means needs at least its 16 centroids' worth of training vectors
CHUNK = 16384  # vectors coded, and queries searched, at a time: bounded temporaries at a million items
RERANK_ROWS = 32768  # candidate vectors gathered at a time for the exact ranking (53 MB at 405 wide)


class IndexMismatch(ValueError):
    """The index file does not belong to the gallery vectors or the faiss at hand: serving with it would answer
    wrongly."""


@dataclass(frozen=True)
class IndexParams:
    """How an index is built (gallery.ann_*): lists, vector dimensions a 4-bit code covers, and faiss's k-means
    (seed, Lloyd iterations, at most sample_per_list training vectors a list)."""
    nlist: int
    code_dims: int
    seed: int
    iterations: int
    sample_per_list: int


def faiss_version() -> str:
    return faiss.__version__ if faiss is not None else ""


def require_faiss(wanted: str = "") -> None:
    """ModuleNotFoundError, one line naming the package to install, when this Python cannot import faiss."""
    if faiss is None:
        pin = f"=={wanted}" if wanted else ""
        raise ModuleNotFoundError(f"this Python ({sys.executable}) cannot import faiss: a serving host needs the "
                                  f"{PACKAGE} package in TorchServe's Python (pip install {PACKAGE}{pin}), then "
                                  "deploy again", name="faiss")


def default_nlist(n: int) -> int:
    """About sqrt(n) / 2 lists, rounded to a power of two (1M items -> 512 lists of ~2000): the fast-scan kernels
    read a list's codes cheaply, so fewer, longer lists than an exact scan would want keep k-means (its cost grows
    with the square of the lists) and the coarse step (nlist distances a query) small. Never more lists than
    items."""
    if n < 1:
        raise ValueError(f"an index needs at least one item, got {n}")
    return max(1, min(2 ** round(math.log2(math.sqrt(n) / 2)), 2 ** int(math.log2(n))))


def indexable(items: int, nlist: int) -> bool:
    """Whether `items` vectors can train an index of `nlist` lists (a smaller gallery is searched exactly)."""
    return items >= max(nlist, MIN_ITEMS)


@contextlib.contextmanager
def one_thread():
    """faiss on one OpenMP thread inside the block (its builds are then the same bytes on any machine)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def set_threads(threads: int) -> None:
    """faiss's OpenMP threads for searching (serve.threads; 0 leaves faiss's default)."""
    if faiss is not None and threads > 0:
        faiss.omp_set_num_threads(threads)


def _padded(vectors: np.ndarray, width: int) -> np.ndarray:
    """float32 rows widened with zero columns to `width` (a multiple of code_dims): distances do not change."""
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    return rows if rows.shape[1] == width else np.pad(rows, ((0, 0), (0, width - rows.shape[1])))


class AnnIndex:
    """A built or loaded faiss index of `items` vectors `dim` wide, for the vectors of `digest`."""

    def __init__(self, index, digest: str, params: IndexParams, items: int, dim: int):
        self.index, self.digest, self.params = index, digest, params
        self.items, self.dim = items, dim

    @classmethod
    def build(cls, vectors: np.ndarray, digest: str, params: IndexParams) -> AnnIndex:
        """Train the lists and codes on a seeded sample of at most sample_per_list * nlist rows (read in gallery
        order: memmap-friendly), then code every row, CHUNK at a time. `vectors` (N, d): any float array."""
        require_faiss()
        n, dim = np.shape(vectors)
        if not indexable(n, params.nlist) or params.code_dims < 1:
            raise ValueError(f"{n} vectors cannot train {params.nlist} lists of {params.code_dims}-dimension codes")
        width = -(-dim // params.code_dims) * params.code_dims
        rng = np.random.default_rng(params.seed)
        picked = np.sort(rng.choice(n, size=min(n, params.sample_per_list * params.nlist), replace=False))
        with one_thread():
            index = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(width), width, params.nlist,
                                             width // params.code_dims, CODE_BITS)
            index.by_residual = True  # codes of the offset from the list's centroid: finer than of the vector
            for cp in (index.cp, index.pq.cp):
                cp.seed, cp.min_points_per_centroid = params.seed, 1
            index.cp.niter, index.cp.max_points_per_centroid = params.iterations, params.sample_per_list
            index.train(_padded(vectors[picked], width))
            for start in range(0, n, CHUNK):
                index.add(_padded(vectors[start:start + CHUNK], width))
        return cls(index, digest, params, n, dim)

    @property
    def nlist(self) -> int:
        return self.params.nlist

    @property
    def nbytes(self) -> int:
        """The index's size as faiss writes it: its codes, ids and centroids (what a worker holds in memory)."""
        return int(faiss.serialize_index(self.index).nbytes)

    def candidates(self, queries: np.ndarray, shortlist: int, nprobe: int) -> np.ndarray:
        """(n, shortlist) gallery indices by the codes' distances, -1 where the lists scanned held fewer."""
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist))
        return self.index.search(_padded(queries, self.index.d), shortlist, params=params)[1]

    def search(self, queries: np.ndarray, k: int, nprobe: int, shortlist: int, vectors) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
        """Indices (n, k) int64 into the gallery's order, nearest first (ties by gallery index), and scores
        exp(-distance) as retrieval.top_k gives them, distances computed exactly against `vectors` (the gallery's
        float32 vectors, the ones this index was built for) for the best `shortlist` (at least k) candidates
        of the nprobe nearest lists. A query whose lists hold fewer than k items scans every list."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {queries.shape}")
        if k < 1 or nprobe < 1:
            raise ValueError(f"k and nprobe must be at least 1, got k={k}, nprobe={nprobe}")
        k = min(k, self.items)
        shortlist = min(max(shortlist, k), self.items)
        found = []
        for start in range(0, len(queries), CHUNK):
            block = queries[start:start + CHUNK]
            cand = self.candidates(block, shortlist, nprobe)
            short = np.flatnonzero((cand >= 0).sum(axis=1) < k)
            if len(short):
                cand[short] = self.candidates(block[short], shortlist, self.nlist)
            found.append(rerank(block, cand, vectors, k))
        idx, dist = (np.concatenate(parts) for parts in zip(*found)) if found else (
            np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        return idx, np.exp(-np.sqrt(dist))

    def save(self, path: str | Path) -> None:
        """One .npz, written atomically: faiss's bytes and what the index was built for."""
        _atomic_write(Path(path), npz_bytes({
            "format": np.int64(FORMAT), "faiss_version": np.str_(faiss_version()),
            "gallery_digest": np.str_(self.digest), "items": np.int64(self.items), "dim": np.int64(self.dim),
            **{name: np.int64(value) for name, value in asdict(self.params).items()},
            "index": faiss.serialize_index(self.index)}))

    @classmethod
    def load(cls, path: str | Path, expected_digest: str, shape: tuple[int, int]) -> AnnIndex:
        """The index saved at `path`, for the gallery vectors of `expected_digest` and `shape` (items, width).
        IndexMismatch, one line naming the file, when it was written by another faiss or for other vectors."""
        require_faiss()
        path = Path(path)
        rebuild = "rebuild the gallery and its index with `dvc repro gallery`"
        with np.load(path, allow_pickle=False) as saved:
            if "format" not in saved.files or int(saved["format"]) != FORMAT:
                raise IndexMismatch(f"{path} is not a faiss index of format {FORMAT}; {rebuild}")
            built_with = str(saved["faiss_version"])
            if built_with != faiss_version():
                raise IndexMismatch(f"{path} was built with faiss {built_with}, but this Python has faiss "
                                    f"{faiss_version()}; install {PACKAGE}=={built_with} or {rebuild}")
            digest, found = str(saved["gallery_digest"]), (int(saved["items"]), int(saved["dim"]))
            if digest != expected_digest:
                raise IndexMismatch(f"{path} was built for gallery {digest!r}, but the gallery loaded is "
                                    f"{expected_digest!r}; {rebuild}")
            if found != tuple(shape):
                raise IndexMismatch(f"{path} indexes {found[0]} items of dimension {found[1]}, but the gallery's "
                                    f"vectors are {tuple(shape)}; {rebuild}")
            params = IndexParams(**{name: int(saved[name]) for name in IndexParams.__dataclass_fields__})
            index = faiss.deserialize_index(saved["index"])
        return cls(index, digest, params, *found)


def rerank(queries: np.ndarray, cand: np.ndarray, vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each query's candidates (n, m) (-1: none) by exact float32 squared distance to
    `vectors[cand]`, ranked as retrieval.top_k ranks (|g|^2 - 2 q.g, ties by gallery index): (indices, squared
    distances), both (n, k). RERANK_ROWS candidate vectors at a time."""
    step = max(1, RERANK_ROWS // max(cand.shape[1], 1))
    if len(cand) > step:
        parts = [rerank(queries[s:s + step], cand[s:s + step], vectors, k) for s in range(0, len(cand), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    valid = cand >= 0
    rows = np.asarray(vectors[np.where(valid, cand, 0)], dtype=np.float32)  # (n, m, d)
    partial = np.einsum("nmd,nmd->nm", rows, rows) - 2.0 * np.einsum("nmd,nd->nm", rows, queries)
    partial[~valid] = np.inf
    order = np.lexsort((cand, partial), axis=1)[:, :k]
    q_sq = np.einsum("nd,nd->n", queries, queries)[:, None]
    return np.take_along_axis(cand, order, axis=1), np.maximum(np.take_along_axis(partial, order, axis=1) + q_sq, 0)


def _atomic_write(path: Path, data: bytes) -> None:
    """`data` written to a temporary name beside `path`, then renamed over it: a crash never leaves half an index
    behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; the index gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
