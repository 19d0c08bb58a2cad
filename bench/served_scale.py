"""Served end to end on a million-item gallery: a real TorchServe with the default serving settings, HTTP clients
on the same 2 cores, sketch PNG in, top-30 JSON out.

The archive is built by the archive stage's own code from
  - the demo model (models/sem_pcyc.pt) with `embed_skip` 0 and no seen-class posterior, so its retrieval vector
    is the 128-wide SEM-PCYC embedding (same networks, about the same cost per query; the default's wider vector,
    640 + one value per training class, would make the gallery 5-6x larger),
  - --items synthetic gallery vectors (bench/index.py's clustered mixture), written by the gallery stage's own
    code: content-addressed shards and the IVF index (gallery.ann_* settings, as `dvc repro gallery` builds it).
This measures time and memory, not quality (recall: bench/index.py and serve-check).

Usage: python bench/served_scale.py [--items 1000000] [--requests 240] [--keep DIR]
       (about 6 minutes and 4 GB of disk at 1M on 2 cores; needs `dvc repro` for the model and query sketches)
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # 1 thread, before numpy loads BLAS
    os.environ[_var] = "1"

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import REPO, Mixture, measure  # noqa: E402
from sempcyc import params as params_mod  # noqa: E402
from sempcyc.fsutil import sha256_file  # noqa: E402
from sempcyc.runtime.encoder import Encoder  # noqa: E402
from sempcyc.runtime.gallery_shards import EMBEDDING_DTYPE  # noqa: E402
from sempcyc.serving import ReleaseSettings, ServeSettings, pick_queries  # noqa: E402
from sempcyc.stages.archive import build_archive  # noqa: E402
from sempcyc.stages.gallery import THUMB_FORMAT, GallerySettings, write_sharded  # noqa: E402

CLASSES = 2000


def narrow_model(out: Path) -> int:
    """The demo model with embed_skip 0 and posterior_weight 0, saved to `out`; its retrieval width."""
    bundle = torch.load(REPO / "models/sem_pcyc.pt", map_location="cpu", weights_only=True)
    bundle["config"] = {**bundle["config"], "embed_skip": 0.0, "posterior_weight": 0.0}
    torch.save(bundle, out)
    enc = Encoder.load(out)
    with torch.inference_mode():
        return int(enc.embed_sketches(torch.zeros(1, enc.size, enc.size, dtype=torch.uint8)).shape[1])


def synthetic_gallery(model: Path, out: Path, items: int, dim: int, settings: GallerySettings) -> float:
    """`items` clustered unit vectors as a gallery of CLASSES classes, written like the gallery stage writes one
    (shards, manifest, IVF index when items >= gallery.ann_min_items); seconds taken."""
    started = time.perf_counter()
    vectors, labels = Mixture(dim, CLASSES, 1.0, False, 0, (200, 0.5)).draw(items, seed=1)
    order = np.argsort(labels, kind="stable")  # gallery items come class by class, as the dataset index lists them
    gallery_items = [(f"c{labels[i]:04d}", f"{i:07d}.png") for i in order]
    meta = {"model_sha256": sha256_file(model), "items": items, "dim": dim, "classes": CLASSES,
            "size": Encoder.load(model).size, "buckets": settings.shards, "dtype": np.dtype(EMBEDDING_DTYPE).name,
            "thumbnails": {"format": THUMB_FORMAT, "size": settings.thumbnail_size, "items": 0}}
    write_sharded(out, meta, gallery_items, vectors[order], [], settings, 0)  # no neighbours: the search is timed
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=240, help="requests per load level (default: %(default)s)")
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    release, serve, gallery = params_mod.read(REPO / "params.yaml", ReleaseSettings, ServeSettings, GallerySettings)
    bodies = [b for _, b in pick_queries(REPO / "data/dataset", REPO / "data/prepared/splits.json")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="sem-pcyc-served-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / "sem_pcyc.pt"
        dim = narrow_model(model)
        built = synthetic_gallery(model, work / "gallery", args.items, dim, gallery)
        started = time.perf_counter()
        mar = build_archive(model, work / "gallery", work / "sem_pcyc.mar", release, serve)
        print(f"{args.items:,} x {dim} gallery: shards + index written in {built:.0f} s; archive "
              f"{mar.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s")
        cfg = {"name": "default", "workers": serve.workers, "batch": serve.batch_size,
               "delay": serve.max_batch_delay_ms, "threads": serve.threads}
        started = time.perf_counter()
        r = measure(cfg, mar, release, bodies, args.requests, serve.top_k)
        print(f"served ({serve.workers} workers, batch {serve.batch_size}, {serve.max_batch_delay_ms} ms delay, "
              f"{serve.threads} thread each, nprobe {serve.ann_nprobe}; {time.perf_counter() - started:.0f} s "
              f"for start-up, load and the three load levels): 1 client p50 {r['p50_1']:.1f} ms, "
              f"p95 {r['p95_1']:.1f} ms; 8 clients {r['rps8']:.1f} requests/s (p50 {r['p50_8']:.1f} ms); "
              f"32 clients {r['rps32']:.1f} requests/s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
