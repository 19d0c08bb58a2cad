"""gallery stage: the embedding of every gallery image (all classes) and its index, for the service.

Images go through exactly the path the handler uses for a query (imaging.decode -> *_to_array -> Encoder).
A content-hash cache (models/gallery-cache/, kept between runs) holds embeddings by (model, image bytes), so
after classes are added only the new images are embedded; a new model invalidates the cache.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from . import imaging, params as params_mod
from .errors import UserError
from .fsutil import atomic_dir, atomic_write_bytes, dumps_json, sha256_file

HELP = "Embed every gallery image with the trained model (only new images when a cache exists)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--dataset", default="data/dataset", help="extracted dataset (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="dataset index (default: %(default)s)")
    parser.add_argument("--out", default="models/gallery", help="output folder (default: %(default)s)")
    parser.add_argument("--cache", default="models/gallery-cache", help="embedding cache (default: %(default)s)")



class EmbeddingCache:
    """image sha256 -> embedding, for one model (the file name carries the model's hash)."""

    def __init__(self, folder: Path, model_sha: str):
        self.folder, self.model_sha = folder, model_sha
        self.path = folder / f"{model_sha[:20]}.npz"
        self.table: dict[str, np.ndarray] = {}
        if self.path.exists():
            try:
                with np.load(self.path) as data:
                    self.table = dict(zip(data["keys"].tolist(), data["vectors"]))
            except (OSError, ValueError, KeyError):
                self.table = {}  # a damaged cache is only a cache: recompute

    def save(self) -> None:
        import io
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.table)
        buf = io.BytesIO()
        vectors = np.stack([self.table[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
        np.savez(buf, keys=np.array(keys), vectors=vectors)
        atomic_write_bytes(self.path, buf.getvalue())
        for old in self.folder.glob("*.npz"):  # embeddings of older models are useless now
            if old != self.path:
                old.unlink()


def run(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm
    from .encoder import Encoder

    params = params_mod.load(getattr(args, "params", "params.yaml"))
    batch_size = params_mod.Section(params, "gallery").int("batch_size", 64, min=1)
    try:
        index = json.loads(Path(args.index).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{args.index}: not found; run `dvc repro extract`") from None
    model_path = Path(args.model)
    if not model_path.exists():
        raise UserError(f"{model_path}: not found; run `dvc repro train`")
    model_sha = sha256_file(model_path)
    enc = Encoder.load(model_path)
    cache = EmbeddingCache(Path(args.cache), model_sha)

    started = time.time()
    items = [(c, f) for c in index["classes"] for f in index["files"]["images"].get(c, [])]
    hashes, todo = [], []
    for cls, fname in items:
        path = Path(args.dataset) / "images" / cls / fname
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise UserError(f"{path}: missing; rerun `dvc repro extract`") from None
        hashes.append(digest)
        if digest not in cache.table:
            todo.append((digest, path))
    todo = list(dict(todo).items())  # identical files are embedded once
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
    cache.save()

    embeddings = np.stack([cache.table[h] for h in hashes]).astype(np.float32)
    entries = [{"id": f"{c}/{f}", "class": c} for c, f in items]
    with atomic_dir(args.out) as scratch:
        np.save(scratch / "embeddings.npy", embeddings)
        (scratch / "index.json").write_text(dumps_json(entries), encoding="utf-8")
        (scratch / "meta.json").write_text(dumps_json({
            "model_sha256": model_sha, "items": len(entries), "dim": int(embeddings.shape[1]),
            "classes": len(index["classes"]), "size": enc.size}), encoding="utf-8")
    print(f"gallery: {len(entries)} images ({len(todo)} embedded, {len(entries) - len(todo)} from cache) "
          f"in {time.time() - started:.1f} s -> {args.out}")
