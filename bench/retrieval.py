"""The retrieval step alone on a large gallery: ours (one matrix product with cached gallery norms, argpartition
top-k) vs. the original handler's method (scipy cdist + exp + full argsort), same machine, same run.

Usage: python bench/retrieval.py [--gallery 100000] [--dim 64] [--k 30] [--queries 1 8]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.spatial.distance import cdist

from sempcyc.runtime.retrieval import top_k


def original(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    sim = np.exp(-cdist(queries, gallery))
    return np.argsort(-sim, axis=1)[:, :k]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((args.gallery, args.dim)).astype(np.float32)
    norms = np.einsum("gd,gd->g", gallery, gallery)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    settings = [("BLAS default threads", None)] + ([("BLAS 1 thread (as in the handler)", 1)]
                                                    if threadpool_limits else [])
    for label, threads in settings:
        print(f"gallery {args.gallery:,} x {args.dim}, top-{args.k}, best of {args.repeats}, {label}:")
        if threads:
            with threadpool_limits(threads):
                compare(args, rng, gallery, norms)
        else:
            compare(args, rng, gallery, norms)


def compare(args, rng, gallery, norms) -> None:
    for nq in args.queries:
        queries = rng.standard_normal((nq, args.dim)).astype(np.float32)
        ours_idx, _ = top_k(queries, gallery, args.k, norms)
        assert (ours_idx == original(queries, gallery, args.k)).mean() > 0.99  # same answer
        ours = timed(lambda q=queries: top_k(q, gallery, args.k, norms), args.repeats)
        orig = timed(lambda q=queries: original(q, gallery, args.k), args.repeats)
        print(f"  {nq:3d} queries: ours {ours * 1000:8.2f} ms   cdist+exp+argsort {orig * 1000:8.2f} ms   "
              f"ratio {orig / ours:6.1f}x")


if __name__ == "__main__":
    main()
