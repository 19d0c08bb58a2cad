"""The search step on a large gallery, one query at a time on one thread (serving answers one sketch per request):
exact float32 search (retrieval.top_k, as served today) vs. the IVF index (runtime/ann.py) at a few nprobe, and
whether storing the vectors as float16 keeps exact search's answers.

Synthetic embeddings, L2-normalised like the model's: by default a mixture of --clusters Gaussian clusters in
--dim dimensions (class clusters of image embeddings; cluster sizes vary, each cluster's spread around its centre
varies by +-25% around --spread, the noise-to-centre norm ratio: 1.0 puts an item at cosine ~0.7 to its centre
and two items of a class at ~0.5). --groups G puts the cluster centres in G groups of look-alike classes, each
centre at --group-spread from its group's centre: then a query's exact neighbours mix its own class with similar
ones, as a real model's do (the bench prints the share of the exact top-k in the query's own cluster: compare it
with the model's precision@k). A larger --spread without groups fills the top-k with other classes' items at
random-like distances instead, and --uniform draws directions uniformly: no structure at all, the worst case for
any index. Queries are fresh draws from the same distribution, never gallery items. recall@k is the share of
exact float32 search's top-k that a method returns.

Usage: python bench/index.py [--items 1000000] [--dim 128] [--k 30] [--nprobe 4 8 16 32 64] [--queries 200]
                             [--clusters 2000] [--spread 1.0] [--groups 0] [--group-spread 0.5] [--uniform]
                             [--nlist N] [--iterations 10] [--sample-per-list 64] [--seed 0]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # 1 thread, before numpy loads BLAS
    os.environ[_var] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from common import Mixture  # noqa: E402
from sempcyc.runtime.ann import IVFIndex, default_nlist  # noqa: E402
from sempcyc.runtime.retrieval import top_k  # noqa: E402


def exact_answers(queries: np.ndarray, gallery: np.ndarray, k: int, norms: np.ndarray) -> tuple[np.ndarray, list]:
    """Exact float32 top-k, timed one query at a time: (indices, per-query seconds)."""
    top_k(queries[:1], gallery, k, norms)  # warm-up
    answers, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        idx, _ = top_k(q[None], gallery, k, norms)
        times.append(time.perf_counter() - t0)
        answers.append(idx[0])
    return np.array(answers), times


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def fp16_recall(queries: np.ndarray, gallery: np.ndarray, k: int, truth: np.ndarray) -> float:
    """Exact search over the float16-rounded gallery (distances in float32) vs. exact float32."""
    rounded = gallery.astype(np.float16).astype(np.float32)
    found = np.concatenate([top_k(queries[i:i + 25], rounded, k)[0] for i in range(0, len(queries), 25)])
    return recall(found, truth)


def ivf_rows(index: IVFIndex, queries: np.ndarray, k: int, nprobes: list[int], truth: np.ndarray) -> list:
    rows = []
    for nprobe in nprobes:
        index.search(queries[:1], k, nprobe)  # warm-up
        found, times = [], []
        for q in queries:
            t0 = time.perf_counter()
            idx, _ = index.search(q[None], k, nprobe)
            times.append(time.perf_counter() - t0)
            found.append(idx[0])
        scanned = nprobe * index.items / index.nlist
        rows.append((nprobe, times, recall(np.array(found), truth), scanned))
    return rows


def ms(times: list, q: float) -> float:
    return float(np.percentile(times, q)) * 1000


def report(args, gallery: np.ndarray, queries: np.ndarray, index: IVFIndex, build_s: float, labels: tuple) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.npz"
        t0 = time.perf_counter()
        index.save(path)
        save_s, size = time.perf_counter() - t0, path.stat().st_size
        t0 = time.perf_counter()
        IVFIndex.load(path, gallery, "bench")
        load_s = time.perf_counter() - t0
    norms = np.einsum("gd,gd->g", gallery, gallery)
    truth, exact_times = exact_answers(queries, gallery, args.k, norms)
    exact_p50 = ms(exact_times, 50)
    print(f"build (k-means {args.iterations} iterations + assign + reorder): {build_s:7.1f} s   "
          f"save {save_s:.2f} s, load (reorder the gallery's vectors) {load_s:.1f} s")
    print(f"index file: {size / 1e6:8.1f} MB (centroids + assignment)   in memory: {index.nbytes / 1e6:8.1f} MB "
          f"(float32 gallery: {gallery.nbytes / 1e6:.1f} MB)")
    print(f"exact float32:        p50 {exact_p50:7.2f} ms   p95 {ms(exact_times, 95):7.2f} ms   recall@{args.k} 1")
    if not args.uniform:  # how class-like the neighbourhoods are: compare with the model's real precision@k
        share = float((labels[0][truth] == labels[1][:, None]).mean())
        print(f"exact top-{args.k} in the query's own cluster: {share:.1%}")
    print(f"exact on float16-stored vectors:                            recall@{args.k} "
          f"{fp16_recall(queries, gallery, args.k, truth):.4f}")
    print(f"{'IVF nprobe':>10} {'scanned':>9} {'p50 ms':>8} {'p95 ms':>8} {f'recall@{args.k}':>10} "
          f"{'vs exact p50':>13}")
    for nprobe, times, rec, scanned in ivf_rows(index, queries, args.k, args.nprobe, truth):
        print(f"{nprobe:10d} {scanned:9,.0f} {ms(times, 50):8.2f} {ms(times, 95):8.2f} {rec:10.4f} "
              f"{exact_p50 / ms(times, 50):12.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--groups", type=int, default=0, help="put the clusters in this many groups of look-alikes")
    parser.add_argument("--group-spread", type=float, default=0.5,
                        help="cluster centres' distance from their group centre (noise-to-centre norm ratio)")
    parser.add_argument("--uniform", action="store_true", help="uniform directions instead of clusters")
    parser.add_argument("--nlist", type=int, help="lists (default: ann.default_nlist(items))")
    parser.add_argument("--iterations", type=int, default=10, help="Lloyd iterations")
    parser.add_argument("--sample-per-list", type=int, default=64, help="k-means training rows per list")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    nlist = args.nlist or default_nlist(args.items)
    mixture = Mixture(args.dim, args.clusters, args.spread, args.uniform, args.seed, (args.groups, args.group_spread))
    (gallery, gallery_labels), (queries, query_labels) = (mixture.draw(args.items, args.seed + 1),
                                                          mixture.draw(args.queries, args.seed + 2))
    data = "uniform directions" if args.uniform else f"{args.clusters} clusters, spread {args.spread}" + (
        f", in {args.groups} groups, group spread {args.group_spread}" if args.groups else "")
    print(f"gallery {args.items:,} x {args.dim} ({data}), {args.queries} queries one at a time, top-{args.k}, "
          f"nlist {nlist}, 1 thread")
    with threadpool_limits(1):
        t0 = time.perf_counter()
        index = IVFIndex.build(gallery, nlist, "bench", seed=args.seed, iterations=args.iterations,
                               sample_per_list=args.sample_per_list)
        build_s = time.perf_counter() - t0
        report(args, gallery, queries, index, build_s, (gallery_labels, query_labels))


if __name__ == "__main__":
    main()
