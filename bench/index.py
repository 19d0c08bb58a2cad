"""The search step on a large gallery, one query at a time on one thread (serving answers one sketch per request):
exact float32 search (retrieval.top_k, the reference and the path of small galleries) vs. the faiss index
(runtime/ann.py: IVF over 4-bit product-quantised codes, its short list ranked exactly against the vectors) at a
few nprobe and re-rank settings: build time, memory, search time and recall@k.

Synthetic embeddings, L2-normalised like the model's, --dim wide (405: the default model's retrieval vector): by
default a mixture of --clusters Gaussian clusters (class clusters of image embeddings; cluster sizes vary, each
cluster's spread around its centre varies by +-25% around --spread, the noise-to-centre norm ratio: 1.0 puts an
item at cosine ~0.7 to its centre and two items of a class at ~0.5). --groups G puts the cluster centres in G
groups of look-alike classes, each centre at --group-spread from its group's centre: then a query's exact
neighbours mix its own class with similar ones, as a real model's do (the bench prints the share of the exact
top-k in the query's own cluster: compare it with the model's precision@k). --uniform draws directions uniformly:
no structure at all, the worst case for any index. --real FILE.npy searches real embeddings instead (e.g. a
gallery's vectors as load_gallery gives them), queries drawn from its rows with --query-noise added, or from
--real-queries (e.g. the dataset's sketches embedded by the model). Queries are never gallery items. recall@k is
the share of exact float32 search's top-k that a method returns. Times are wall and CPU (process) seconds: on a
shared machine CPU time is the comparable figure.

The last lines print the issue's table: today's figures at 1M x 405 (the hand-written NumPy IVF, removed: quoted
from its last measurements) next to this run's.

Usage: python bench/index.py [--items 1000000] [--dim 405] [--k 30] [--nprobe 4 8 16] [--rerank 8 12 16]
                             [--queries 200] [--clusters 2000] [--spread 1.0] [--groups 0] [--group-spread 0.5]
                             [--uniform] [--real FILE.npy [--real-queries FILE.npy]] [--nlist N] [--code-dims 3]
                             [--iterations 10] [--sample-per-list 64] [--seed 0]
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
from sempcyc.runtime.ann import AnnIndex, IndexParams, default_nlist  # noqa: E402
from sempcyc.runtime.retrieval import top_k  # noqa: E402

# The hand-written NumPy IVF this replaced (4096 lists, float16 vectors), 1M x 405, 1 thread: quoted from its
# last measurements (the code is gone).
TODAY = {"memory": "833 MB", "build": "252 s", "p50": "1.3 ms (at 128 wide; recall@30 >= 0.95)"}


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def exact_answers(queries: np.ndarray, gallery: np.ndarray, k: int, norms: np.ndarray) -> tuple[np.ndarray, list]:
    """Exact float32 top-k, timed one query at a time: (indices, per-query wall seconds)."""
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


def index_rows(index: AnnIndex, gallery: np.ndarray, queries: np.ndarray, args, truth: np.ndarray) -> list:
    """(nprobe, rerank, wall times, CPU times, recall) of one-query searches at each setting."""
    rows = []
    for nprobe in args.nprobe:
        for rerank in args.rerank:
            index.search(queries[:1], args.k, nprobe, rerank * args.k, gallery)  # warm-up
            found, walls, cpus = [], [], []
            for q in queries:
                start = clock()
                idx, _ = index.search(q[None], args.k, nprobe, rerank * args.k, gallery)
                wall, cpu = since(start)
                walls.append(wall)
                cpus.append(cpu)
                found.append(idx[0])
            rows.append((nprobe, rerank, walls, cpus, recall(np.array(found), truth)))
    return rows


def ms(times: list, q: float) -> float:
    return float(np.percentile(times, q)) * 1000


def file_and_load(index: AnnIndex, shape: tuple) -> tuple[int, float, float]:
    """(file bytes, save s, load s) of the index's .npz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ivf.npz"
        start = time.perf_counter()
        index.save(path)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        AnnIndex.load(path, "bench", shape)
        return path.stat().st_size, save_s, time.perf_counter() - start


def report(args, gallery: np.ndarray, queries: np.ndarray, index: AnnIndex, build: tuple, labels: tuple) -> None:
    size, save_s, load_s = file_and_load(index, gallery.shape)
    norms = np.einsum("gd,gd->g", gallery, gallery)
    truth, exact_times = exact_answers(queries, gallery, args.k, norms)
    print(f"build (faiss k-means {args.iterations} iterations + coding): {build[0]:.1f} s wall, {build[1]:.1f} s CPU; "
          f"save {save_s:.2f} s, load {load_s:.2f} s")
    print(f"index in memory (faiss: codes, ids, centroids): {index.nbytes / 1e6:.1f} MB, file {size / 1e6:.1f} MB "
          f"(float32 gallery: {gallery.nbytes / 1e6:.1f} MB, read for the re-ranking, never copied)")
    print(f"exact float32:  p50 {ms(exact_times, 50):7.2f} ms   p95 {ms(exact_times, 95):7.2f} ms   recall@{args.k} 1")
    if labels[0] is not None and not args.uniform:  # how class-like the neighbourhoods are
        share = float((labels[0][truth] == labels[1][:, None]).mean())
        print(f"exact top-{args.k} in the query's own cluster: {share:.1%}")
    print(f"{'nprobe':>6} {'rerank':>6} {'short list':>10} {'p50 ms':>7} {'p95 ms':>7} {'p50 CPU ms':>10} "
          f"{f'recall@{args.k}':>9}")
    rows = index_rows(index, gallery, queries, args, truth)
    for nprobe, rerank, walls, cpus, rec in rows:
        print(f"{nprobe:6d} {rerank:6d} {rerank * args.k:10d} {ms(walls, 50):7.3f} {ms(walls, 95):7.3f} "
              f"{ms(cpus, 50):10.3f} {rec:9.4f}")
    summary(args, index, build, rows)


def summary(args, index: AnnIndex, build: tuple, rows: list) -> None:
    """The issue's table rows: today's (quoted) and this run's."""
    good = [r for r in rows if r[4] >= 0.95]
    best = min(good, key=lambda r: ms(r[3], 50)) if good else None
    shown = (f"{ms(best[2], 50):.2f} ms wall, {ms(best[3], 50):.2f} ms CPU (nprobe {best[0]}, rerank {best[1]}: "
             f"recall@{args.k} {best[4]:.4f})" if best else f"no setting reached recall@{args.k} 0.95")
    width = f"{args.items:,} x {index.dim}"
    print(f"\n| figure ({width}, 1 thread) | today at 1M x 405: hand-written IVF (quoted) | faiss (this run) |")
    print("|---|---|---|")
    print(f"| index in memory | {TODAY['memory']} | {index.nbytes / 1e6:.0f} MB |")
    print(f"| its build | {TODAY['build']} | {build[0]:.0f} s wall, {build[1]:.0f} s CPU |")
    print(f"| search step p50 at recall@{args.k} >= 0.95 | {TODAY['p50']} | {shown} |")


def data(args) -> tuple[np.ndarray, np.ndarray, tuple, str]:
    """(gallery, queries, (gallery labels, query labels) or (None, None), description)."""
    if args.real:
        vectors = np.load(args.real).astype(np.float32)
        rng = np.random.default_rng(args.seed)
        if args.real_queries:  # real queries too (e.g. sketches embedded by the model)
            queries = np.load(args.real_queries).astype(np.float32)
            queries = queries[np.sort(rng.choice(len(queries), size=min(args.queries, len(queries)), replace=False))]
            return vectors, queries, (None, None), f"real vectors from {args.real}, queries from {args.real_queries}"
        picked = rng.choice(len(vectors), size=args.queries, replace=False)
        keep = np.setdiff1d(np.arange(len(vectors)), picked)
        noise = rng.standard_normal((args.queries, vectors.shape[1])).astype(np.float32)
        queries = vectors[picked] + args.query_noise * noise * np.linalg.norm(vectors[picked], axis=1,
                                                                             keepdims=True) / np.sqrt(vectors.shape[1])
        return np.ascontiguousarray(vectors[keep]), queries, (None, None), f"real vectors from {args.real}"
    mixture = Mixture(args.dim, args.clusters, args.spread, args.uniform, args.seed, (args.groups, args.group_spread))
    (gallery, gallery_labels), (queries, query_labels) = (mixture.draw(args.items, args.seed + 1),
                                                          mixture.draw(args.queries, args.seed + 2))
    text = "uniform directions" if args.uniform else f"{args.clusters} clusters, spread {args.spread}" + (
        f", in {args.groups} groups, group spread {args.group_spread}" if args.groups else "")
    return gallery, queries, (gallery_labels, query_labels), text


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=405)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rerank", type=int, nargs="+", default=[8, 12, 16],
                        help="candidates ranked exactly per result (serve.ann_rerank)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--groups", type=int, default=0, help="put the clusters in this many groups of look-alikes")
    parser.add_argument("--group-spread", type=float, default=0.5,
                        help="cluster centres' distance from their group centre (noise-to-centre norm ratio)")
    parser.add_argument("--uniform", action="store_true", help="uniform directions instead of clusters")
    parser.add_argument("--real", help="a .npy of real embeddings (items, dim) instead of synthetic ones")
    parser.add_argument("--real-queries", help="with --real: a .npy of real queries (e.g. embedded sketches)")
    parser.add_argument("--query-noise", type=float, default=0.5,
                        help="with --real: noise added to the query rows (noise-to-vector norm ratio)")
    parser.add_argument("--nlist", type=int, help="lists (default: ann.default_nlist(items))")
    parser.add_argument("--code-dims", type=int, default=3, help="dimensions a 4-bit code stands for")
    parser.add_argument("--iterations", type=int, default=10, help="k-means iterations")
    parser.add_argument("--sample-per-list", type=int, default=64, help="k-means training rows per list")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    gallery, queries, labels, text = data(args)
    args.items = len(gallery)
    nlist = args.nlist or default_nlist(args.items)
    print(f"gallery {args.items:,} x {gallery.shape[1]} ({text}), {args.queries} queries one at a time, top-{args.k}, "
          f"nlist {nlist}, {args.code_dims} dimensions a 4-bit code, 1 thread")
    with threadpool_limits(1):
        start = clock()
        index = AnnIndex.build(gallery, "bench", IndexParams(nlist, args.code_dims, args.seed, args.iterations,
                                                             args.sample_per_list))
        build = since(start)
        report(args, gallery, queries, index, build, labels)


if __name__ == "__main__":
    main()
