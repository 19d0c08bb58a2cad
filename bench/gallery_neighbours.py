"""The gallery expansion's neighbours (each gallery item's k nearest items, found once by the gallery stage):
exact search (retrieval.gallery_neighbours, every item against every other) vs. a faiss index of the gallery
(gallery.approximate_neighbours, what the stage uses from gallery.ann_min_items items on: IVF over 4-bit codes,
each item's best candidates ranked exactly) at a few gallery.ann_neighbour_nprobe / ann_neighbour_rerank values:
seconds (wall and CPU; the index's build included), and recall, the share of the exact neighbours found.

Synthetic embeddings as bench/index.py draws them (class-like clusters in groups of look-alikes, L2-normalised),
--dim wide (405: the demo model's retrieval vector), --per-class items a cluster, class by class (a gallery's
manifest order keeps a class's items together). One thread. The last lines print
the issue's table row: today's figure (the hand-written NumPy IVF, removed: quoted) next to this run's.

Usage: python bench/gallery_neighbours.py [--items 100000] [--dim 405] [--k 2] [--nprobe 2 4 8] [--rerank 4 8 16]
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

TODAY = "923 s (hand-written IVF, nprobe 8, 1 000 000 items; quoted: the code is gone)"


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each item's exact neighbours that `found` holds (order ignored)."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=405)
    parser.add_argument("--k", type=int, default=2, help="neighbours an item (the transfer preset's gallery_expansion)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rerank", type=int, nargs="+", default=[4, 8, 16],
                        help="candidates ranked exactly per neighbour wanted (gallery.ann_neighbour_rerank)")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--skip-exact", action="store_true", help="time the index only (no recall)")
    args = parser.parse_args()
    (settings,) = params_mod.read(REPO / "params.yaml", GallerySettings)
    vectors, labels = Mixture(args.dim, max(args.items // args.per_class, 1), 1.0, False, 0, (200, 0.5)).draw(
        args.items, seed=1)
    vectors = vectors[np.argsort(labels, kind="stable")]  # class by class, as a gallery's manifest order holds them
    exact = None
    if not args.skip_exact:
        started = time.perf_counter()
        exact = gallery_neighbours(vectors, args.k)
        print(f"exact: {time.perf_counter() - started:.1f} s for {args.items:,} items x {args.dim}", flush=True)
    rows = []
    for nprobe in args.nprobe:
        for rerank in args.rerank:
            wall, cpu = time.perf_counter(), time.process_time()
            found = approximate_neighbours(vectors, args.k, dataclasses.replace(
                settings, ann_neighbour_nprobe=nprobe, ann_neighbour_rerank=rerank))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            shown = f", recall {recall(found, exact):.4f}" if exact is not None else ""
            print(f"faiss, nprobe {nprobe}, rerank {rerank}: {wall:.1f} s wall, {cpu:.1f} s CPU (index built and "
                  f"searched){shown}", flush=True)
            rows.append((nprobe, rerank, wall, cpu))
    default = [r for r in rows if r[:2] == (settings.ann_neighbour_nprobe, settings.ann_neighbour_rerank)]
    if default:
        print(f"\n| figure | today (quoted) | faiss (this run, params.yaml's nprobe {default[0][0]}, rerank "
              f"{default[0][1]}) |\n|---|---|---|\n| gallery-expansion neighbours of {args.items:,} items x "
              f"{args.dim}, 1 thread | {TODAY} | {default[0][2]:.0f} s wall, {default[0][3]:.0f} s CPU |")


if __name__ == "__main__":
    main()
