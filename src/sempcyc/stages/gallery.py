"""gallery stage: the embedding of every gallery image (all classes) and its index, for the service.

Images go through exactly the path the handler uses for a query (imaging.decode -> *_to_array -> Encoder).
A content-hash cache (models/gallery-cache/, kept between runs) holds embeddings by (model, image bytes), so
after classes are added only the new images are embedded; a new model invalidates the cache. Every network pass
takes exactly `gallery.batch_size` images (the last one padded): CPU kernels pick their algorithm by batch size,
so an image's vector then depends on the image alone, never on which images share its pass, and a cached vector,
a fresh one and one embedded by another process are the same bytes (the cache is keyed by the pass size, the
device type and torch's thread count too: the last bits also follow the threads, so torchrun's processes, one
thread each, write what one process with one thread writes, OMP_NUM_THREADS=1).

It also makes the sketch page's result thumbnails: the first `gallery.thumbnail_max_items` images (index order) as
small square WebP files; the archive carries them (the handler never reads them) and the page server serves them.

Output: manifest.json and shards/<sha256>.npz (runtime/gallery_shards.py): every class goes to one of
`gallery.shards` buckets by a hash of its name, and each non-empty bucket is one shard holding its items'
embeddings, ids, classes and thumbnails, written with deterministic bytes. Adding classes (zero-shot: no
retraining) changes only the shards they hash into and the manifest, so a deploy sends only those. With the
model's gallery_expansion k > 0, neighbours.npy holds each item's k nearest items (found exactly below
`gallery.ann_min_items` items, through a faiss index from there on), with which the loader averages each
embedding; it is one file beside the shards, because new classes change some old items' neighbours. Such a large
gallery also gets an approximate index, ivf.npz (runtime/ann.py: faiss's IVF with 4-bit product-quantised codes),
over its vectors as served, in manifest order; the manifest names it under "index" with its sha256, the digest it
was built for, the faiss version and the index's parameters. A gallery too small for its list count (fewer items
than gallery.ann_nlist) is searched exactly instead.

One process (what `dvc repro gallery` runs):
    sempcyc gallery --model models/sem_pcyc.pt --dataset data/dataset --index data/dataset.json --out models/gallery
Data-parallel embedding, e.g. 2 processes on the CPUs of one machine (torchrun gives each one torch thread):
    torchrun --standalone --nproc_per_node 2 -m sempcyc.cli gallery --model models/sem_pcyc.pt \
        --dataset data/dataset --index data/dataset.json --out models/gallery
or one process per GPU with train.device cuda (or auto): --nproc_per_node 4. Several machines: the same on each,
with --nnodes N --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT, and the model and dataset at the same
paths on every machine. Each process hashes and embeds a fixed share (every world-th image the cache lacks); the
vectors are gathered (gloo, on GPUs too: only results cross) to rank 0, which alone reads and writes the cache and
writes the gallery and its index: the same bytes as one process writes. The others exit after a barrier.
(Measured on CPUs only, bench/gallery_embed.py; the GPU path, images moved to cuda:LOCAL_RANK, has not been run.)
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .. import params as params_mod
from ..embedcache import EmbeddingCache, embedding_key
from ..errors import UserError
from ..fsutil import atomic_dir, dumps_json, sha256_file
from ..params import setting
from ..recipe import TrainSettings, pick_device, torchrun_ranks
from ..runtime import ann, imaging
from ..runtime.backbones import padded_pass
from ..runtime.encoder import Encoder
from ..runtime.gallery_shards import (
    EMBEDDING_DTYPE,
    MANIFEST,
    SHARD_DIR,
    bucket_of,
    pack_shard,
    sha256_bytes,
    vectors_digest,
)
from ..runtime.retrieval import expand_gallery, gallery_neighbours, others
from ..shards import load_json

THUMB_FORMAT, THUMB_QUALITY = "webp", 70  # 64-px WebP at q70: ~400 bytes a demo photo (JPEG q80: ~880)
INDEX_FILE = "ivf.npz"
NEIGHBOURS_FILE = "neighbours.npy"


@dataclass(frozen=True)
class GallerySettings:
    SECTION: ClassVar[str] = "gallery"
    batch_size: int = setting(min=1)
    thumbnail_size: int = setting(min=16, max=256)
    thumbnail_max_items: int = setting(min=0)
    shards: int = setting(min=1, max=4096)
    ann_min_items: int = setting(min=0)
    ann_nlist: int = setting(min=0)
    ann_seed: int = setting()
    ann_iterations: int = setting(min=0)
    ann_sample_per_list: int = setting(min=1)
    ann_code_dims: int = setting(min=1)
    ann_neighbour_nprobe: int = setting(min=1)
    ann_neighbour_rerank: int = setting(min=1)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (0 of 1 when started alone)."""
    rank: int = 0
    world: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--dataset", default="data/dataset", help="extracted dataset (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="dataset index (default: %(default)s)")
    parser.add_argument("--out", default="models/gallery", help="output folder (default: %(default)s)")
    parser.add_argument("--cache", default="models/gallery-cache", help="embedding cache (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    settings, train = params_mod.read(args.params, GallerySettings, TrainSettings)
    started = time.time()
    index = load_json(Path(args.index), "run `dvc repro extract`")
    model_path = Path(args.model)
    if not model_path.exists():
        raise UserError(f"{model_path}: not found; run `dvc repro train`")
    note_exact_search(settings, len(gallery_items(index)))
    device = pick_device(train.device)
    ranks = Ranks(*torchrun_ranks("gloo"))  # gloo on GPUs too: only the finished vectors cross between ranks
    if device == "cuda" and ranks.world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    counts = build_gallery(model_path, Path(args.dataset), index, Path(args.out), Path(args.cache), settings,
                           device, ranks)
    if ranks.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if counts is not None:
        n_items, n_embedded = counts
        print(f"gallery: {n_items} images ({n_embedded} embedded, {n_items - n_embedded} from cache) and "
              f"{min(n_items, settings.thumbnail_max_items)} thumbnails in {time.time() - started:.1f} s "
              f"-> {args.out}")


def note_exact_search(settings: GallerySettings, items: int) -> None:
    """Say so when a gallery past gallery.ann_min_items is too small for its lists: it is searched exactly."""
    if 0 < settings.ann_min_items <= items and not builds_index(settings, items):
        nlist = index_params(settings, items).nlist
        print(f"gallery: {items} items cannot fill {nlist} lists (gallery.ann_nlist {settings.ann_nlist}; at least "
              f"{max(nlist, ann.MIN_ITEMS)} items needed): no approximate index, searched exactly")


def builds_index(settings: GallerySettings, items: int) -> bool:
    """Whether a gallery of `items` gets an approximate index: from gallery.ann_min_items on, when it can fill the
    lists."""
    return 0 < settings.ann_min_items <= items and ann.indexable(items, index_params(settings, items).nlist)


def index_params(settings: GallerySettings, items: int) -> ann.IndexParams:
    """The gallery's ann settings as an index's build parameters (gallery.ann_nlist 0: ann.default_nlist)."""
    return ann.IndexParams(nlist=settings.ann_nlist or ann.default_nlist(max(items, 1)),
                           code_dims=settings.ann_code_dims, seed=settings.ann_seed,
                           iterations=settings.ann_iterations, sample_per_list=settings.ann_sample_per_list)


def gallery_items(index: dict) -> list[tuple[str, str]]:
    """(class, file) of every gallery image, in index order."""
    return [(c, f) for c in index["classes"] for f in index["files"]["images"].get(c, [])]


def build_gallery(model_path: Path, dataset: Path, index: dict, out: Path, cache_dir: Path,
                  settings: GallerySettings, device: str = "cpu", ranks: Ranks = Ranks()) -> tuple[int, int] | None:
    """Embed the images the cache lacks (each rank its share) and, on rank 0, write `out`: (gallery items, images
    embedded now) on rank 0, None on the others."""
    items = gallery_items(index)
    model_sha = sha256_file(model_path)
    cache = None
    if ranks.rank == 0:
        producer = f"gallery model {model_sha} pass {settings.batch_size} on {torch.device(device).type}"
        cache = EmbeddingCache(cache_dir, embedding_key(producer))
    hashes = file_hashes(dataset, items, ranks)
    todo = from_rank0(missing(dataset, items, hashes, cache) if cache is not None else None, ranks)
    enc = Encoder.load(model_path, device)
    started = time.time()
    parts = to_rank0(embed(enc, todo[ranks.rank::ranks.world], settings.batch_size, device, ranks), ranks)
    if cache is None:
        return None
    for rank, part in enumerate(parts):
        cache.table.update((digest, vector) for (digest, _), vector in zip(todo[rank::ranks.world], part))
    if todo:
        took = time.time() - started  # decoding, network passes and the gather to rank 0
        print(f"gallery: embedded {len(todo)} images in {took:.2f} s on {ranks.world} process(es) on {device} "
              f"({len(todo) / max(took, 1e-9):.1f} images/s)")
    cache.save()
    embeddings = np.stack([cache.table[h] for h in hashes]).astype(EMBEDDING_DTYPE)
    thumbs = make_thumbnails(dataset, items[:settings.thumbnail_max_items], settings.thumbnail_size)
    meta = {"model_sha256": model_sha, "items": len(items), "dim": int(embeddings.shape[1]),
            "classes": len(index["classes"]), "size": enc.size, "buckets": settings.shards,
            "dtype": np.dtype(EMBEDDING_DTYPE).name,
            "thumbnails": {"format": THUMB_FORMAT, "size": settings.thumbnail_size, "items": len(thumbs)}}
    write_sharded(out, meta, items, embeddings, thumbs, settings, enc.cfg.gallery_expansion)
    return len(items), len(todo)


def file_hashes(dataset: Path, items: list[tuple[str, str]], ranks: Ranks) -> list[str]:
    """The sha256 of every gallery image, in item order; each rank hashes every world-th one, all get all."""
    mine = []
    for cls, fname in items[ranks.rank::ranks.world]:
        path = dataset / "images" / cls / fname
        try:
            mine.append(sha256_file(path))
        except FileNotFoundError:
            raise UserError(f"{path}: missing; rerun `dvc repro extract`") from None
    if ranks.world == 1:
        return mine
    parts: list = [None] * ranks.world
    dist.all_gather_object(parts, mine)
    hashes = [""] * len(items)
    for rank, part in enumerate(parts):
        hashes[rank::ranks.world] = part
    return hashes


def missing(dataset: Path, items: list[tuple[str, str]], hashes: list[str],
            cache: EmbeddingCache) -> list[tuple[str, Path]]:
    """(sha256, path) of the images the cache lacks, in item order, each distinct file once."""
    todo = {h: dataset / "images" / cls / fname for (cls, fname), h in zip(items, hashes) if h not in cache.table}
    return list(todo.items())


def from_rank0(obj, ranks: Ranks):
    """Rank 0's `obj`, on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def to_rank0(obj, ranks: Ranks) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    if ranks.world == 1:
        return [obj]
    parts = [None] * ranks.world if ranks.rank == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def embed(enc: Encoder, todo: list[tuple[str, Path]], pass_size: int, device: str, ranks: Ranks) -> np.ndarray:
    """The float32 embeddings (n, dim) of (sha256, path) images through the handler's preprocessing, `pass_size`
    images a network pass, the last pass padded with blank images."""
    vectors = []
    with tqdm(total=len(todo), desc=f"gallery embed (rank 0 of {ranks.world})" if ranks.world > 1 else
              "gallery embed", unit="img", mininterval=2, disable=ranks.rank != 0) as bar:
        for start in range(0, len(todo), pass_size):
            chunk = todo[start:start + pass_size]
            try:
                arrays = np.stack([imaging.image_to_array(imaging.load_file(p), enc.size) for _, p in chunk])
            except imaging.ImageDecodeError as exc:
                raise UserError(f"{exc}; fix the file and rerun `dvc repro extract`") from None
            vectors.append(padded_pass(enc.embed_images, arrays, pass_size, device))  # the cache keeps float32
            bar.update(len(chunk))
    return np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)


def write_sharded(out: Path, meta: dict, items: list[tuple[str, str]], embeddings: np.ndarray,
                  thumbs: list[bytes], settings: GallerySettings, expansion: int) -> None:
    """`out`/shards/<sha256>.npz, one per non-empty bucket (items in index order within it), with `expansion`
    (the model's gallery_expansion) k > 0 each item's k nearest items (neighbours.npy), the approximate index when
    the gallery is large enough, and manifest.json: `meta` plus the shards in bucket order (and those files)."""
    buckets: dict[int, list[int]] = {}
    for i, (cls, _) in enumerate(items):
        buckets.setdefault(bucket_of(cls, meta["buckets"]), []).append(i)
    shards = []
    with atomic_dir(out) as scratch:
        (scratch / SHARD_DIR).mkdir()
        for bucket in sorted(buckets):
            rows = buckets[bucket]
            data = pack_shard(embeddings[rows], [f"{items[i][0]}/{items[i][1]}" for i in rows],
                              [items[i][0] for i in rows], [thumbs[i] if i < len(thumbs) else None for i in rows])
            digest = sha256_bytes(data)
            (scratch / SHARD_DIR / f"{digest}.npz").write_bytes(data)
            shards.append({"bucket": bucket, "file": f"{SHARD_DIR}/{digest}.npz", "sha256": digest,
                           "bytes": len(data), "items": len(rows)})
        manifest = {**meta, "shards": shards}
        order = [i for bucket in sorted(buckets) for i in buckets[bucket]]  # manifest order
        write_served_files(scratch, manifest, embeddings, order, settings, expansion)
        (scratch / MANIFEST).write_text(dumps_json(manifest), encoding="utf-8")


def write_served_files(folder: Path, manifest: dict, embeddings: np.ndarray, order: list[int],
                       settings: GallerySettings, expansion: int) -> None:
    """The neighbours file (`expansion` k > 0) and the approximate index (a large enough gallery) of the gallery
    in manifest order (`embeddings[order]`, copied only when one of them is written), into `folder`, each named
    in `manifest`."""
    expands, indexes = expansion > 0 and len(order) > 1, builds_index(settings, len(order))
    if not (expands or indexes):
        return
    vectors = embeddings[order]
    if expands:
        manifest["neighbours"], neighbours = write_neighbours(folder, vectors, expansion, settings)
        vectors = expand_gallery(vectors, neighbours)
    if indexes:
        manifest["index"] = write_index(folder, vectors, vectors_digest(manifest), settings)


def write_neighbours(folder: Path, vectors: np.ndarray, k: int, settings: GallerySettings) -> tuple[dict, np.ndarray]:
    """Each item's k nearest items (positions in `vectors`, the gallery in manifest order) saved as
    `folder`/neighbours.npy; (its manifest entry, the neighbours). Exact below gallery.ann_min_items items; from
    there on through a faiss index of the vectors (approximate_neighbours): exact search grows with the square of
    the gallery (86 s at 100 000 items on 1 thread, about 2.4 hours at 1 000 000; bench/gallery_neighbours.py)."""
    started = time.time()
    neighbours = approximate_neighbours(vectors, k, settings) if builds_index(settings, len(vectors)) \
        else gallery_neighbours(vectors, k)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, neighbours, allow_pickle=False)
    (folder / NEIGHBOURS_FILE).write_bytes(buf.getvalue())
    print(f"gallery: the {neighbours.shape[1]} nearest items of each of {len(vectors)} in "
          f"{time.time() - started:.1f} s (model.gallery_expansion)")
    return {"file": NEIGHBOURS_FILE, "sha256": sha256_bytes(buf.getvalue()), "k": int(neighbours.shape[1])}, neighbours


def approximate_neighbours(vectors: np.ndarray, k: int, settings: GallerySettings) -> np.ndarray:
    """gallery_neighbours through a faiss index of `vectors` built with the gallery's ann settings: each item's
    k + 1 nearest among the gallery.ann_neighbour_rerank x (k + 1) best candidates of the
    gallery.ann_neighbour_nprobe lists nearest it, ranked exactly, then itself left out."""
    k = min(k, len(vectors) - 1)
    index = ann.AnnIndex.build(vectors, "", index_params(settings, len(vectors)))
    rows, block = [], ann.CHUNK
    with ann.one_thread():
        for start in tqdm(range(0, len(vectors), block), desc="gallery neighbours", unit="block", mininterval=2):
            nearest, _ = index.search(vectors[start:start + block], k + 1, settings.ann_neighbour_nprobe,
                                      settings.ann_neighbour_rerank * (k + 1), vectors)
            rows.append(others(nearest, start))
    return np.concatenate(rows).astype(np.int32)


def write_index(folder: Path, vectors: np.ndarray, digest: str, settings: GallerySettings) -> dict:
    """A faiss index (runtime/ann.py) of `vectors` (the gallery's as served, in manifest order) saved as
    `folder`/ivf.npz; its manifest entry: the file, its sha256, the digest of the vectors, the faiss version
    and the build parameters (what a loader checks before trusting it)."""
    started = time.time()
    index = ann.AnnIndex.build(vectors, digest, index_params(settings, len(vectors)))
    index.save(folder / INDEX_FILE)
    print(f"gallery: faiss IVF index of {len(vectors)} items in {index.nlist} lists ({index.nbytes / 1e6:.1f} MB) "
          f"in {time.time() - started:.1f} s")
    return {"file": INDEX_FILE, "sha256": sha256_file(folder / INDEX_FILE), "gallery_digest": digest,
            "faiss_version": ann.faiss_version(), **dataclasses.asdict(index.params)}


def make_thumbnails(dataset: Path, items: list[tuple[str, str]], size: int) -> list[bytes]:
    """Square `size`-px WebP thumbnails of `items` (the model's own fit-and-pad view of each photo), in order."""
    thumbs = []
    for cls, fname in tqdm(items, desc="gallery thumbnails", unit="img", mininterval=2):
        path = dataset / "images" / cls / fname
        try:
            square = imaging.image_to_array(imaging.load_file(path), size)
        except (imaging.ImageDecodeError, FileNotFoundError) as exc:
            raise UserError(f"{path}: {exc}; fix the file and rerun `dvc repro extract`") from None
        buf = io.BytesIO()
        Image.fromarray(square).save(buf, format=THUMB_FORMAT, quality=THUMB_QUALITY, method=4)
        thumbs.append(buf.getvalue())
    return thumbs
