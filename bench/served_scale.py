"""Served end to end on a million-item gallery: a real TorchServe, HTTP clients on the same 2 cores, sketch PNG in,
top-30 JSON out, at one or more serving configurations (workers, TorchServe batch size and delay, threads).

The archive is built by the archive stage's own code from
  - the demo model (models/sem_pcyc.pt) as trained (its retrieval vector: 405 wide with the default recipe), or
    with --narrow its copy with `embed_skip` 0 and no seen-class posterior, whose vector is the 128-wide SEM-PCYC
    embedding (same networks, about the same cost per query: the width of the earlier measurements),
  - --items synthetic gallery vectors (bench/index.py's clustered mixture), written by the gallery stage's own
    code: content-addressed shards and the faiss index (gallery.ann_* settings, as `dvc repro gallery` builds it).
Each worker reads the shards' vectors in place for the exact re-ranking (runtime/served_vectors.py): its memory is
printed as private (the index, the model, Python) and file-backed (shard pages it touched, shared by the workers).
This measures time and memory, not quality (recall: bench/index.py and serve-check). The last lines print the
issue's table rows: today's figures (before faiss: quoted) next to this run's.

Usage: python bench/served_scale.py [--items 1000000] [--requests 240] [--narrow] [--configs w2b1d0t1,w2b4d1t1]
                                    [--keep DIR]
       (1M x 405: about 15 minutes and 5 GB of disk on 2 cores; needs `dvc repro` for the model and query sketches)
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
# Served at 1M items before faiss (hand-written IVF, 128 wide, 2 workers, batch 4, 1 ms): quoted, the code is gone.
TODAY = {"rps8": "71-108 requests/s", "p50_1": "18.9 ms"}


def model_copy(out: Path, narrow: bool) -> int:
    """The demo model saved to `out`, with --narrow its embed_skip 0, posterior_weight 0 copy; its retrieval
    width."""
    bundle = torch.load(REPO / "models/sem_pcyc.pt", map_location="cpu", weights_only=True)
    if narrow:
        bundle["config"] = {**bundle["config"], "embed_skip": 0.0, "posterior_weight": 0.0}
    torch.save(bundle, out)
    enc = Encoder.load(out)
    with torch.inference_mode():
        return int(enc.embed_sketches(torch.zeros(1, enc.size, enc.size, dtype=torch.uint8)).shape[1])


def synthetic_gallery(model: Path, out: Path, items: int, dim: int, settings: GallerySettings) -> float:
    """`items` clustered unit vectors as a gallery of CLASSES classes, written like the gallery stage writes one
    (shards, manifest, faiss index when items >= gallery.ann_min_items); seconds taken."""
    started = time.perf_counter()
    vectors, labels = Mixture(dim, CLASSES, 1.0, False, 0, (200, 0.5)).draw(items, seed=1)
    order = np.argsort(labels, kind="stable")  # gallery items come class by class, as the dataset index lists them
    gallery_items = [(f"c{labels[i]:04d}", f"{i:07d}.png") for i in order]
    meta = {"model_sha256": sha256_file(model), "items": items, "dim": dim, "classes": CLASSES,
            "size": Encoder.load(model).size, "buckets": settings.shards, "dtype": np.dtype(EMBEDDING_DTYPE).name,
            "thumbnails": {"format": THUMB_FORMAT, "size": settings.thumbnail_size, "items": 0}}
    ordered = vectors[order]
    del vectors
    write_sharded(out, meta, gallery_items, ordered, [], settings, 0)  # no neighbours: the search is timed
    return time.perf_counter() - started


def server_processes(ts) -> dict[int, str]:
    """pid -> "worker" or "frontend" of this TorchServe's processes (found by its private folder in their command
    line)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if str(ts.workdir) in cmdline:
            found[int(proc.name)] = "worker" if "model_service_worker" in cmdline else "frontend"
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def batch_sizes(ts) -> list[int]:
    """The size of every batch TorchServe's workers ran so far: one PredictionTime line a batch in its log, listing
    the batch's request ids."""
    log = ts.workdir / "logs" / "ts_log.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    marker, sizes = "MODEL_METRICS - PredictionTime.ms:", []
    for line in text.splitlines():
        if marker in line and "requestID:" in line:
            sizes.append(len(line.split("requestID:", 1)[1].split(",timestamp:")[0].split(",")))
    return sizes


def worker_memory(ts, before: dict | None) -> dict:
    """Called before the load levels (before=None): the server's CPU seconds and batches so far. After them: the
    CPU seconds TorchServe (frontend and workers) spent meanwhile, the mean size of the batches it ran, and each
    worker's resident memory (MB), private (anonymous: the index, the model, Python, torch) and file-backed (mapped
    files' pages: libraries, and the shards' vectors it read, shared with the other workers)."""
    processes = server_processes(ts)
    cpu = {pid: cpu_seconds(pid) for pid in processes}
    if before is None:
        return {"cpu": cpu, "batches": len(batch_sizes(ts))}
    sizes = batch_sizes(ts)[before["batches"]:]
    memory = {"private_mb": [], "file_mb": [], "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
              "server_cpu_s": sum(cpu[p] - before["cpu"].get(p, 0.0) for p in cpu)}
    for pid, role in processes.items():
        if role == "worker":
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            memory["private_mb"].append(int(fields["RssAnon"].split()[0]) / 1024)
            memory["file_mb"].append(int(fields["RssFile"].split()[0]) / 1024)
    return memory


def parse_config(text: str, serve: ServeSettings) -> dict:
    """w<workers>b<batch>d<delay ms>t<threads> (as bench/serving.py reads them), or "default": the serve
    section's."""
    if text == "default":
        text = f"w{serve.workers}b{serve.batch_size}d{serve.max_batch_delay_ms}t{serve.threads}"
    numbers = text[1:].replace("b", " ").replace("d", " ").replace("t", " ").split()
    if not text.startswith("w") or len(numbers) != 4 or not all(n.isdigit() for n in numbers):
        raise SystemExit(f"bad config {text!r}: write w<workers>b<batch>d<delay ms>t<threads>, e.g. w2b4d1t1")
    workers, batch, delay, threads = map(int, numbers)
    return {"name": text, "workers": workers, "batch": batch, "delay": delay, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=240, help="requests per load level (default: %(default)s)")
    parser.add_argument("--narrow", action="store_true", help="the 128-wide embed_skip 0 copy of the model")
    parser.add_argument("--configs", default="default",
                        help="comma-separated w<workers>b<batch>d<delay ms>t<threads> or default (params.yaml)")
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    release, serve, gallery = params_mod.read(REPO / "params.yaml", ReleaseSettings, ServeSettings, GallerySettings)
    bodies = [b for _, b in pick_queries(REPO / "data/dataset", REPO / "data/prepared/splits.json")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="sem-pcyc-served-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        mar, dim = build(args, work, release, serve, gallery)
        results = []
        for cfg in (parse_config(text, serve) for text in args.configs.split(",")):
            started = time.perf_counter()
            r = measure(cfg, mar, release, bodies, args.requests, serve.top_k, inspect=worker_memory)
            results.append((cfg, r))
            print(f"served {cfg['name']} ({cfg['workers']} workers, batch {cfg['batch']}, {cfg['delay']} ms delay, "
                  f"{cfg['threads']} thread each, nprobe {serve.ann_nprobe}, rerank {serve.ann_rerank}; "
                  f"{time.perf_counter() - started:.0f} s for start-up, load and the three load levels): 1 client "
                  f"p50 {r['p50_1']:.1f} ms, p95 {r['p95_1']:.1f} ms; 8 clients {r['rps8']:.1f} requests/s (p50 "
                  f"{r['p50_8']:.1f} ms); 32 clients {r['rps32']:.1f} requests/s; TorchServe's CPU "
                  f"{1000 * r['server_cpu_s'] / r['requests']:.1f} ms a request, {r['mean_batch']:.2f} sketches a "
                  f"batch on average; workers' memory private "
                  f"{'/'.join(f'{m:.0f}' for m in r['private_mb'])} MB, file-backed "
                  f"{'/'.join(f'{m:.0f}' for m in r['file_mb'])} MB", flush=True)
        print(f"\n| figure ({args.items:,} x {dim}) | today (quoted) | faiss (this run) |\n|---|---|---|")
        for cfg, r in results:
            print(f"| served, 8 clients, {cfg['name']} | {TODAY['rps8']} | {r['rps8']:.0f} requests/s |")
            print(f"| served, 1 client p50, {cfg['name']} | {TODAY['p50_1']} | {r['p50_1']:.1f} ms |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def build(args, work: Path, release: ReleaseSettings, serve: ServeSettings, gallery: GallerySettings
          ) -> tuple[Path, int]:
    """The model copy, the synthetic gallery (reused from --keep when there) and the archive; (archive, width)."""
    model = work / "sem_pcyc.pt"
    dim = model_copy(model, args.narrow)
    mar = work / "sem_pcyc.mar"
    if mar.exists() and (work / "gallery/manifest.json").exists():
        return mar, dim
    built = synthetic_gallery(model, work / "gallery", args.items, dim, gallery)
    started = time.perf_counter()
    build_archive(model, work / "gallery", mar, release, serve)
    print(f"{args.items:,} x {dim} gallery: shards + index written in {built:.0f} s; archive "
          f"{mar.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s", flush=True)
    return mar, dim


if __name__ == "__main__":
    main()
