"""One sketch through the whole search path on a million-item gallery, in process, on one thread: the request's
PNG decoded and fitted, embedded by the demo model (models/sem_pcyc.pt, the frozen sketch path the handler uses)
and ranked by SketchSearch with a faiss index (runtime/ann.py) over --items synthetic gallery vectors, next to the
same path with exact search over the same vectors. The gallery vectors are bench/index.py's clustered mixture in
the model's embedding width; this measures time and memory, not quality (recall is bench/index.py's and
serve-check's). Add the HTTP front end's share from bench/serving.py (served p50 minus in-process p50 on the
demo gallery) for the served figure.

The short list is re-ranked against the gallery array in memory (a served gallery reads the shard files instead:
bench/served_scale.py).

Usage: python bench/search_scale.py [--items 1000000] [--nprobe 8] [--rerank 12] [--requests 200]
                                    [--dim 0 (the model's)]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # 1 thread, before numpy loads BLAS
    os.environ[_var] = "1"

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import REPO, Mixture  # noqa: E402
from sempcyc.runtime.ann import AnnIndex, IndexParams, default_nlist  # noqa: E402
from sempcyc.runtime.encoder import Encoder  # noqa: E402
from sempcyc.runtime.search import SketchSearch  # noqa: E402
from sempcyc.serving import pick_queries  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def timed(search: SketchSearch, bodies: list[bytes], n: int) -> tuple[float, float]:
    search.search(bodies[:1])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        search.search([bodies[i % len(bodies)]])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--rerank", type=int, default=12, help="candidates ranked exactly per result")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--dim", type=int, default=0, help="gallery width; 0: the model's (a smaller one times "
                                                           "the index of a narrower model, the query truncated)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder = Encoder.load(REPO / "models/sem_pcyc.pt")
    bodies = [b for _, b in pick_queries(REPO / "data/dataset", REPO / "data/prepared/splits.json")]
    with torch.inference_mode():
        dim = args.dim or encoder.embed_sketches(torch.zeros(1, encoder.size, encoder.size, dtype=torch.uint8)).shape[1]
    before = rss_mb()
    gallery, _ = Mixture(dim, 2000, 1.0, False, 0, (200, 0.5)).draw(args.items, seed=1)
    index = [{"id": f"c{i % 2000}/{i}.png", "class": f"c{i % 2000}"} for i in range(args.items)]
    t0 = time.perf_counter()
    ivf = AnnIndex.build(gallery, "bench", IndexParams(default_nlist(args.items), 3, 0, 10, 64))
    build_s = time.perf_counter() - t0
    approximate = SketchSearch(encoder, gallery, index, top_k=30, max_pixels=16_000_000, ann=ivf, nprobe=args.nprobe,
                               rerank=args.rerank)
    if args.dim:
        approximate.embed = lambda s, e=approximate.embed: np.ascontiguousarray(e(s)[:, :args.dim])
    p50, p95 = timed(approximate, bodies, args.requests)
    query = approximate.embed(approximate.preprocess(bodies[0])[None])
    rank_ms = min(_ms(lambda: approximate.rank(query)) for _ in range(50))
    embed_ms = min(_ms(lambda: approximate.embed(approximate.preprocess(bodies[0])[None])) for _ in range(20))
    print(f"{args.items:,} x {dim} gallery, faiss IVF {ivf.nlist} lists, nprobe {args.nprobe}, rerank "
          f"{args.rerank}: built in {build_s:.0f} s, "
          f"index in memory {ivf.nbytes / 1e6:.0f} MB; sketch bytes -> top-30 p50 {p50:.1f} ms, p95 {p95:.1f} ms "
          f"(fastest of its parts: decode + embed {embed_ms:.1f} ms, rank {rank_ms:.1f} ms)")
    exact = SketchSearch(encoder, gallery, index, top_k=30, max_pixels=16_000_000)
    exact.embed = approximate.embed if args.dim else exact.embed
    p50e, p95e = timed(exact, bodies, max(20, args.requests // 10))
    print(f"same path, exact float32 search: p50 {p50e:.1f} ms, p95 {p95e:.1f} ms ({p50e / p50:.1f}x); "
          f"peak RSS {rss_mb():.0f} MB (before the gallery {before:.0f} MB)")


if __name__ == "__main__":
    main()
