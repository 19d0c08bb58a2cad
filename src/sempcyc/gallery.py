"""gallery stage: the embedding of every gallery image (all classes) and its index, for the service.

Images go through exactly the path the handler uses for a query (imaging.decode -> *_to_array -> Encoder).
A content-hash cache (models/gallery-cache/, kept between runs) holds embeddings by (model, image bytes), so
after classes are added only the new images are embedded; a new model invalidates the cache.

It also makes the sketch page's result thumbnails: the first `gallery.thumbnail_max_items` images (index order) as
small square WebP files, concatenated in thumbs.bin with their [offset, length] in thumbs.json; the archive carries
them (the handler never reads them) and the page server serves them from there.
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
from .shards import load_json

THUMB_FORMAT, THUMB_QUALITY = "webp", 70  # 64-px WebP at q70: ~400 bytes a demo photo (JPEG q80: ~880)


@dataclass(frozen=True)
class GallerySettings:
    SECTION: ClassVar[str] = "gallery"
    batch_size: int = setting(min=1)
    thumbnail_size: int = setting(min=16, max=256)
    thumbnail_max_items: int = setting(min=0)


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
    embeddings = np.stack([cache.table[h] for h in hashes]).astype(np.float32)
    entries = [{"id": f"{c}/{f}", "class": c} for c, f in items]
    thumbs, thumbs_index = make_thumbnails(dataset, items[:settings.thumbnail_max_items], settings.thumbnail_size)
    with atomic_dir(out) as scratch:
        np.save(scratch / "embeddings.npy", embeddings)
        (scratch / "index.json").write_text(dumps_json(entries), encoding="utf-8")
        (scratch / "meta.json").write_text(dumps_json({
            "model_sha256": model_sha, "items": len(entries), "dim": int(embeddings.shape[1]),
            "classes": len(index["classes"]), "size": enc.size}), encoding="utf-8")
        (scratch / "thumbs.bin").write_bytes(thumbs)
        (scratch / "thumbs.json").write_text(dumps_json(thumbs_index), encoding="utf-8")
    return len(entries), len(todo)


def make_thumbnails(dataset: Path, items: list[tuple[str, str]], size: int) -> tuple[bytes, dict]:
    """Square `size`-px WebP thumbnails of `items` (the model's own fit-and-pad view of each photo), concatenated,
    and their index: {"format", "size", "offsets": [[start, length], ...] in item order}."""
    chunks, offsets, start = [], [], 0
    for cls, fname in tqdm(items, desc="gallery thumbnails", unit="img", mininterval=2):
        path = dataset / "images" / cls / fname
        try:
            square = imaging.image_to_array(imaging.load_file(path), size)
        except (imaging.ImageDecodeError, FileNotFoundError) as exc:
            raise UserError(f"{path}: {exc}; fix the file and rerun `dvc repro extract`") from None
        buf = io.BytesIO()
        Image.fromarray(square).save(buf, format=THUMB_FORMAT, quality=THUMB_QUALITY, method=4)
        chunks.append(buf.getvalue())
        offsets.append([start, len(chunks[-1])])
        start += len(chunks[-1])
    return b"".join(chunks), {"format": THUMB_FORMAT, "size": size, "offsets": offsets}


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
                cache.table[digest] = vector.astype(np.float32)
            bar.update(len(chunk))
