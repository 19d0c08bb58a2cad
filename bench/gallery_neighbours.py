"""The gallery expansion's neighbours (each gallery item's k nearest items, found once by the gallery stage):
exact search (retrieval.gallery_neighbours, every item against every other) vs. an IVF index of the gallery
(gallery.approximate_neighbours, what the stage uses from gallery.ann_min_items items on) at a few
gallery.ann_neighbour_nprobe values: seconds, and recall, the share of the exact neighbours found.

Synthetic embeddings as bench/index.py draws them (class-like clusters in groups of look-alikes, L2-normalised),
--dim wide (405: the demo model's retrieval vector), --per-class items a cluster. One thread.

Usage: python bench/gallery_neighbours.py [--items 100000] [--dim 405] [--k 2] [--nprobe 4 8 16 32]
                                          [--per-class 100] [--skip-exact]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy starts its BLAS threads

import argparse
import dataclasses
import time

import numpy as np

from common import REPO, Mixture
from sempcyc import params as params_mod
from sempcyc.runtime.retrieval import gallery_neighbours
from sempcyc.stages.gallery import GallerySettings, approximate_neighbours


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each item's exact neighbours that `found` holds (order ignored)."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=405)
    parser.add_argument("--k", type=int, default=2, help="neighbours an item (the transfer preset's gallery_expansion)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--skip-exact", action="store_true", help="time the index only (no recall)")
    args = parser.parse_args()
    (settings,) = params_mod.read(REPO / "params.yaml", GallerySettings)
    vectors, _ = Mixture(args.dim, max(args.items // args.per_class, 1), 1.0, False, 0, (200, 0.5)).draw(
        args.items, seed=1)
    exact = None
    if not args.skip_exact:
        started = time.perf_counter()
        exact = gallery_neighbours(vectors, args.k)
        print(f"exact: {time.perf_counter() - started:.1f} s for {args.items:,} items x {args.dim}", flush=True)
    for nprobe in args.nprobe:
        started = time.perf_counter()
        found = approximate_neighbours(vectors, args.k, dataclasses.replace(settings, ann_neighbour_nprobe=nprobe))
        took = time.perf_counter() - started
        shown = f", recall {recall(found, exact):.4f}" if exact is not None else ""
        print(f"IVF, nprobe {nprobe}: {took:.1f} s (index built and searched){shown}", flush=True)


if __name__ == "__main__":
    main()
