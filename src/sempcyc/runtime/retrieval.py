"""Ranking a gallery for query embeddings, and the retrieval metrics: one implementation for evaluation,
the TorchServe handler and the benchmarks. NumPy only (the archive ships this file as it is).

Similarity is exp(-euclidean distance) as in the paper; ranking is by distance, so scores are monotone in it.
"""
from __future__ import annotations

import numpy as np


def squared_distances(queries: np.ndarray, gallery: np.ndarray, gallery_sq_norms: np.ndarray | None = None
                      ) -> np.ndarray:
    """(Q, G) squared euclidean distances through one matrix product (no (Q, G, D) intermediate)."""
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if gallery_sq_norms is None:
        gallery_sq_norms = np.einsum("gd,gd->g", gallery, gallery)
    q_sq = np.einsum("qd,qd->q", queries, queries)
    d2 = q_sq[:, None] + gallery_sq_norms[None, :] - 2.0 * (queries @ gallery.T)
    return np.maximum(d2, 0.0, out=d2)


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, gallery_sq_norms: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (Q, k) of the k nearest gallery rows, nearest first, and their scores exp(-distance).

    Ranks by |g|^2 - 2 q.g (the query's own norm does not change the order, so it is added to the k winners
    only); argpartition selects the k smallest in O(G) and only those are sorted: no full sort of the gallery.
    Ties are broken by gallery index, so the answer is deterministic: when the k-th value is tied, every item at
    that value is a candidate and the lowest indices win.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if gallery_sq_norms is None:
        gallery_sq_norms = np.einsum("gd,gd->g", gallery, gallery)
    partial = queries @ gallery.T
    partial *= -2.0
    partial += gallery_sq_norms[None, :]
    n = partial.shape[1]
    k = min(k, n)
    rows = []
    for row in partial:
        if k < n:
            cand = np.argpartition(row, k - 1)[:k]
            kth = row[cand].max()
            if np.count_nonzero(row <= kth) > k:  # a tie group cut by k: take all of it, order by index below
                cand = np.flatnonzero(row <= kth)
        else:
            cand = np.arange(n)
        rows.append(cand[np.lexsort((cand, row[cand]))][:k])
    idx = np.array(rows, dtype=np.int64).reshape(len(partial), k)
    q_sq = np.einsum("qd,qd->q", queries, queries)[:, None]
    dist = np.sqrt(np.maximum(np.take_along_axis(partial, idx, axis=1) + q_sq, 0.0))
    return idx, np.exp(-dist)


def expand_queries(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Average query expansion: each query (Q, d) replaced by the mean of itself and its nearest gallery items
    `neighbours` (Q, k, d), found by a first search. A second search with these ranks the gallery again: images
    close to the query's best matches move up, which within one class they mostly are (README "Quality")."""
    queries = np.asarray(queries, dtype=np.float32)
    return (queries + np.asarray(neighbours, dtype=np.float32).sum(axis=1)) / (1 + neighbours.shape[1])


def expanded_distances(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """(Q, G) squared distances after expanding each query with its k nearest gallery items (k = 0: none)."""
    if k > 0 and len(gallery):
        idx, _ = top_k(queries, gallery, min(k, len(gallery)))
        queries = expand_queries(queries, np.asarray(gallery, dtype=np.float32)[idx])
    return squared_distances(queries, gallery)


def gallery_neighbours(gallery: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """(G, k) int32: each gallery item's k nearest other items, nearest first (top_k's order and ties), found
    exactly, `chunk` items at a time. An item's own row is left out by index, so a duplicate of it still counts."""
    gallery = np.asarray(gallery, dtype=np.float32)
    k = max(min(k, len(gallery) - 1), 0)
    if k == 0:
        return np.zeros((len(gallery), 0), np.int32)
    sq_norms = np.einsum("gd,gd->g", gallery, gallery)
    rows = [others(top_k(gallery[start:start + chunk], gallery, k + 1, sq_norms)[0], start)
            for start in range(0, len(gallery), chunk)]
    return np.concatenate(rows).astype(np.int32)


def others(nearest: np.ndarray, start: int) -> np.ndarray:
    """Rows start, start + 1, ... of the gallery's k + 1 nearest items (`nearest`, nearest first) without each
    row's own item: (n, k). Where the item is not among them (tied duplicates), the farthest is dropped instead."""
    own = nearest == np.arange(start, start + len(nearest))[:, None]
    own[~own.any(axis=1), -1] = True
    return nearest[~own].reshape(len(nearest), nearest.shape[1] - 1)


def expand_gallery(gallery: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Gallery-side expansion: each item replaced by a weighted mean of itself and its k nearest items
    `neighbours` (gallery_neighbours), weights k + 1 for itself down to 1 for the k-th. A class's photos lie close
    together, so each moves towards its class's centre and a sketch that finds some of them finds the rest
    (README "Quality"). The counterpart of expand_queries on the gallery side; k = 0 leaves it as it is."""
    gallery = np.asarray(gallery, dtype=np.float32)
    k = neighbours.shape[1]
    if k == 0 or not len(gallery):
        return gallery
    # one (G, D) gather at a time, not a (G, k, D) array
    return weighted_mean(gallery, (gallery[neighbours[:, rank]] for rank in range(k)), k)


def weighted_mean(own: np.ndarray, ranked, k: int) -> np.ndarray:
    """expand_gallery's mean of float32 rows `own` and their k neighbours' rows, given nearest first (`ranked`:
    k arrays shaped like `own`). Element by element, so any subset of rows comes out bit for bit as in the whole
    gallery's expansion (served_vectors expands only the rows a search reads)."""
    total = own * np.float32(k + 1)
    for rank, rows in enumerate(ranked):
        total += np.float32(k - rank) * rows
    return total / np.float32((k + 1) * (k + 2) / 2)


def rank_all(distances: np.ndarray) -> np.ndarray:
    """Full ranking (for metrics over the whole gallery), stable so ties keep gallery order."""
    return np.argsort(distances, axis=1, kind="stable")


def average_precisions(distances: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """AP over the whole ranked gallery for every query (relevance = same class). Queries with no relevant
    item in the gallery get NaN and are left out of the mean by callers."""
    order = rank_all(distances)
    relevant = gallery_labels[order] == query_labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at_hits = np.where(relevant, hits / ranks, 0.0)
    n_rel = relevant.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, precision_at_hits.sum(axis=1) / n_rel, np.nan)


def precision_at(distances: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the top-k that is relevant, per query (k capped at the gallery size)."""
    k = min(k, distances.shape[1])
    order = rank_all(distances)[:, :k]
    return (gallery_labels[order] == query_labels[:, None]).mean(axis=1)


def precision_recall_curve(distances: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                           points: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision at recall levels 0, 0.1, ..., 1."""
    order = rank_all(distances)
    relevant = gallery_labels[order] == query_labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    n_rel = np.maximum(relevant.sum(axis=1, keepdims=True), 1)
    precision = hits / np.arange(1, relevant.shape[1] + 1)
    # interpolated precision: best precision at any recall >= r
    interp = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    levels = np.linspace(0, 1, points)
    # recall >= i/(points-1), compared in integers: linspace's 0.30000000000000004 would miss recall 3/10
    reached = [hits * (points - 1) >= i * n_rel for i in range(points)]
    curve = np.stack([np.where(r, interp, 0).max(axis=1) for r in reached], axis=1)
    return levels, curve.mean(axis=0)


# ---------------------------------------------------------------------------------------------------- ITQ

class ITQ:
    """Iterative quantisation (Gong & Lazebnik): PCA to `bits` dims, then a rotation R minimising
    ||B - V R||_F with B = sign(V R). The R-step is orthogonal Procrustes: with V^T B = U S W^T, R = U W^T."""

    def __init__(self, bits: int = 64, iterations: int = 50, seed: int = 0):
        self.bits, self.iterations, self.seed = bits, iterations, seed
        self.losses: list[float] = []

    def fit(self, x: np.ndarray) -> ITQ:
        try:  # ~100 tiny SVDs: multi-threaded BLAS is far slower than one thread here (measured 200x)
            from threadpoolctl import threadpool_limits
        except ImportError:
            return self._fit(x)
        with threadpool_limits(1):
            return self._fit(x)

    def _fit(self, x: np.ndarray) -> ITQ:
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(axis=0)
        centred = x - self.mean
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        bits = self.bits
        pcs = vt[:bits].T                                    # (D, min(D, bits))
        if pcs.shape[1] < bits:                              # more bits than dims: random extra projections
            rng = np.random.default_rng(self.seed)
            pcs = np.concatenate([pcs, rng.standard_normal((x.shape[1], bits - pcs.shape[1]))], axis=1)
        self.projection = pcs
        v = centred @ pcs
        rng = np.random.default_rng(self.seed)
        r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
        self.losses = []
        for _ in range(self.iterations):
            z = v @ r
            b = np.where(z >= 0, 1.0, -1.0)
            self.losses.append(float(((b - z) ** 2).sum()))
            u, _, wt = np.linalg.svd(v.T @ b)
            r = u @ wt
        self.rotation = r
        self.losses.append(float(((np.where(v @ r >= 0, 1.0, -1.0) - v @ r) ** 2).sum()))
        return self

    def encode(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) @ self.projection @ self.rotation
        return z >= 0


def hamming_distances(query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    q = query_codes.astype(np.float32)
    g = gallery_codes.astype(np.float32)
    # differing bits = |q| + |g| - 2 q.g for 0/1 vectors
    return q.sum(1)[:, None] + g.sum(1)[None, :] - 2.0 * (q @ g.T)


def retrieval_metrics(distances: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                      ks: tuple[int, ...] = (10, 100, 200)) -> dict:
    aps = average_precisions(distances, query_labels, gallery_labels)
    out = {"map_all": float(np.nanmean(aps))}
    for k in ks:
        out[f"p_at_{k}"] = float(precision_at(distances, query_labels, gallery_labels, k).mean())
    return out
