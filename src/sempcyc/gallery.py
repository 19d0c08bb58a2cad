"""gallery stage: the embedding of every gallery image (all classes) and its index, for the service.

Images go through exactly the path the handler uses for a query (imaging.decode -> *_to_array -> Encoder).
A content-hash cache (models/gallery-cache/, kept between runs) holds embeddings by (model, image bytes), so
after classes are added only the new images are embedded; a new model invalidates the cache.

It also makes the sketch page's result thumbnails: the first `gallery.thumbnail_max_items` images (index order) as
small square WebP files; the archive carries them (the handler never reads them) and the page server serves them.

Output: manifest.json and shards/<sha256>.npz (runtime/gallery_shards.py): every class goes to one of
`gallery.shards` buckets by a hash of its name, and each non-empty bucket is one shard holding its items'
embeddings, ids, classes and thumbnails, written with deterministic bytes. Adding classes (zero-shot: no
retraining) changes only the shards they hash into and the manifest, so a deploy sends only those.
"""
from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import params as params_mod
from .embedcache import EmbeddingCache, embedding_key
from .errors import UserError
from .fsutil import atomic_dir, dumps_json, sha256_file
from .params import setting
from .runtime import imaging
from .runtime.encoder import Encoder
from .runtime.gallery_shards import EMBEDDING_DTYPE, MANIFEST, SHARD_DIR, bucket_of, pack_shard, sha256_bytes
from .shards import load_json

THUMB_FORMAT, THUMB_QUALITY = "webp", 70  # 64-px WebP at q70: ~400 bytes a demo photo (JPEG q80: ~880)


@dataclass(frozen=True)
class GallerySettings:
    SECTION: ClassVar[str] = "gallery"
    batch_size: int = setting(min=1)
    thumbnail_size: int = setting(min=16, max=256)
    thumbnail_max_items: int = setting(min=0)
    shards: int = setting(min=1, max=4096)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--dataset", default="data/dataset", help="extracted dataset (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="dataset index (default: %(default)s)")
    parser.add_argument("--out", default="models/gallery", help="output folder (default: %(default)s)")
    parser.add_argument("--cache", default="models/gallery-cache", help="embedding cache (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    (settings,) = params_mod.read(args.params, GallerySettings)
    started = time.time()
    index = load_json(Path(args.index), "run `dvc repro extract`")
    model_path = Path(args.model)
    if not model_path.exists():
        raise UserError(f"{model_path}: not found; run `dvc repro train`")
    n_items, n_embedded = build_gallery(model_path, Path(args.dataset), index, Path(args.out), Path(args.cache),
                                        settings)
    print(f"gallery: {n_items} images ({n_embedded} embedded, {n_items - n_embedded} from cache) and "
          f"{min(n_items, settings.thumbnail_max_items)} thumbnails in {time.time() - started:.1f} s -> {args.out}")


def build_gallery(model_path: Path, dataset: Path, index: dict, out: Path, cache_dir: Path,
                  settings: GallerySettings) -> tuple[int, int]:
    """Embed the images the cache lacks and write `out`: (gallery items, images embedded now)."""
    model_sha = sha256_file(model_path)
    enc = Encoder.load(model_path)
    cache = EmbeddingCache(cache_dir, embedding_key(model_sha))
    items = [(c, f) for c in index["classes"] for f in index["files"]["images"].get(c, [])]
    hashes, todo = [], []
    for cls, fname in items:
        path = dataset / "images" / cls / fname
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise UserError(f"{path}: missing; rerun `dvc repro extract`") from None
        hashes.append(digest)
        if digest not in cache.table:
            todo.append((digest, path))
    todo = list(dict(todo).items())  # identical files are embedded once
    embed_into_cache(enc, todo, cache, settings.batch_size)
    cache.save()
    embeddings = np.stack([cache.table[h] for h in hashes]).astype(EMBEDDING_DTYPE)
    thumbs = make_thumbnails(dataset, items[:settings.thumbnail_max_items], settings.thumbnail_size)
    meta = {"model_sha256": model_sha, "items": len(items), "dim": int(embeddings.shape[1]),
            "classes": len(index["classes"]), "size": enc.size, "buckets": settings.shards,
            "dtype": np.dtype(EMBEDDING_DTYPE).name,
            "thumbnails": {"format": THUMB_FORMAT, "size": settings.thumbnail_size, "items": len(thumbs)}}
    write_sharded(out, meta, items, embeddings, thumbs)
    return len(items), len(todo)


def write_sharded(out: Path, meta: dict, items: list[tuple[str, str]], embeddings: np.ndarray,
                  thumbs: list[bytes]) -> None:
    """`out`/shards/<sha256>.npz, one per non-empty bucket (items in index order within it), and manifest.json:
    `meta` plus the shards in bucket order."""
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
        (scratch / MANIFEST).write_text(dumps_json({**meta, "shards": shards}), encoding="utf-8")


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


def embed_into_cache(enc: Encoder, todo: list[tuple[str, Path]], cache: EmbeddingCache, batch_size: int) -> None:
    """Embed (sha256, path) images through the handler's preprocessing into the cache table."""
    with tqdm(total=len(todo), desc="gallery embed", unit="img", mininterval=2) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            try:
                arrays = np.stack([imaging.image_to_array(imaging.load_file(p), enc.size) for _, p in chunk])
            except imaging.ImageDecodeError as exc:
                raise UserError(f"{exc}; fix the file and rerun `dvc repro extract`") from None
            with torch.inference_mode():
                vectors = enc.embed_images(torch.from_numpy(arrays)).numpy()
            for (digest, _), vector in zip(chunk, vectors):
                cache.table[digest] = vector.astype(np.float32)  # the cache keeps full precision
            bar.update(len(chunk))
