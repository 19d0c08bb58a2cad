"""Sketch search, independent of any model server: raw sketch bytes in, ranked gallery items out.

The TorchServe handler is a thin adapter over this class, serve-check computes its offline reference answers
with it, and the benchmarks time it; another server (Triton, Ray Serve, a FastAPI app) could wrap it the same way.
It uses the same preprocessing (imaging) and the same model path (encoder) as training and evaluation.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from . import imaging
from .ann import AnnIndex, IndexMismatch, faiss_version, require_faiss
from .encoder import Encoder
from .gallery_shards import (
    GalleryError,
    load_gallery,
    load_neighbours,
    read_manifest,
    shard_files,
    vectors_digest,
    verified_path,
)
from .retrieval import expand_queries, top_k
from .served_vectors import ShardVectors


class RequestError(Exception):
    """A bad request: `status` is the HTTP status to answer with, the message says what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class SketchSearch:
    def __init__(self, encoder: Encoder, vectors, index: list[dict], *, top_k: int, max_pixels: int,
                 ann: AnnIndex | None = None, nprobe: int = 0, rerank: int = 0):
        """`vectors`: the gallery's vectors as served, (items, dim) float32, or for a gallery with an approximate
        index anything indexed like one (ShardVectors reads them from the shard files). top_k, max_pixels,
        nprobe and rerank: serve.top_k, serve.max_pixels, serve.ann_nprobe and serve.ann_rerank (the archive's
        serving.json). With an approximate index `ann` (a large gallery) a search scans its `nprobe` nearest
        lists and ranks the best rerank x k of their items exactly against `vectors`."""
        if ann is not None and (nprobe < 1 or rerank < 1):
            raise ValueError("a gallery with an approximate index needs nprobe and rerank >= 1 (serve.ann_nprobe, "
                             "serve.ann_rerank)")
        if len(vectors) != len(index) or (ann is not None and ann.items != len(index)):
            raise ValueError(f"gallery has {len(vectors)} vectors but {len(index)} index entries")
        self.encoder = encoder.freeze_sketch_path()
        self.ann, self.nprobe, self.rerank = ann, nprobe, rerank
        self.vectors = vectors if ann is not None else np.ascontiguousarray(vectors, dtype=np.float32)
        self.sq_norms = None if ann is not None else np.einsum("gd,gd->g", self.vectors, self.vectors)
        self.ids = [item["id"] for item in index]
        self.classes = [item["class"] for item in index]
        self.top_k = top_k
        self.max_pixels = max_pixels
        self._blas = _blas_controller()

    @classmethod
    def load(cls, model_path: str | Path, gallery_dir: str | Path, *, blob_store: str | Path | None = None,
             **kwargs) -> SketchSearch:
        """The model and the gallery (manifest.json + shards), each file verified against the manifest's sha256;
        a file missing from `model_path` / `gallery_dir` is taken from `blob_store` by its sha256 (a deployed slim
        archive). GalleryError names a missing or damaged file: nothing is served from a partial gallery. A gallery
        with an approximate index keeps no copy of its vectors (ShardVectors)."""
        manifest = read_manifest(gallery_dir)
        if not manifest.get("index"):
            return cls.from_gallery(model_path, gallery_dir, load_gallery(gallery_dir, blob_store),
                                    blob_store=blob_store, **kwargs)
        check_faiss(manifest)  # before reading any shard
        files, index = shard_files(gallery_dir, manifest, blob_store)
        neighbours = load_neighbours(Path(gallery_dir), manifest, blob_store) if manifest.get("neighbours") else None
        vectors = ShardVectors(files, int(manifest["dim"]), neighbours)
        return cls.from_gallery(model_path, gallery_dir, (manifest, vectors, index), blob_store=blob_store, **kwargs)

    @classmethod
    def from_gallery(cls, model_path: str | Path, gallery_dir: str | Path, gallery: tuple, *,
                     blob_store: str | Path | None = None, **kwargs) -> SketchSearch:
        """`load` for a gallery already read (gallery_shards.load_gallery: serve-check keeps its float32 vectors
        to measure the approximate index's recall, rather than reading every shard twice)."""
        manifest, vectors, index = gallery
        if not isinstance(manifest.get("model_sha256"), str):
            raise GalleryError(f"{Path(gallery_dir) / 'manifest.json'}: no model_sha256; run `dvc repro gallery`")
        model = verified_path(Path(model_path), manifest["model_sha256"], blob_store, "model sem_pcyc.pt",
                              "Either the gallery was built with another model (rerun `dvc repro gallery`) or "
                              "the file is damaged (deploy again, or rebuild the archive)")
        ann = load_ann_index(Path(gallery_dir), manifest, (len(vectors), int(manifest["dim"])), blob_store)
        return cls(Encoder.load(model), vectors, index, ann=ann, **kwargs)

    def preprocess(self, data) -> np.ndarray:
        """Raw request body -> uint8 sketch array, or RequestError (4xx) saying what was wrong."""
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise RequestError(415, "send the raw bytes of a PNG or JPEG sketch (e.g. curl -T sketch.png), "
                                    "not JSON or text")
        if not data:
            raise RequestError(400, "empty request body; send the raw bytes of a PNG or JPEG sketch")
        try:
            image = imaging.decode_bytes(data, "request", max_pixels=self.max_pixels)
        except imaging.ImageTooLarge as exc:
            raise RequestError(413, str(exc).replace("request: ", "image is too large: ")) from None
        except imaging.ImageDecodeError:
            raise RequestError(400, "the body is not a readable PNG or JPEG image") from None
        return imaging.sketch_to_array(image, self.encoder.size)

    def embed(self, sketches: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.encoder.embed_sketches(torch.from_numpy(sketches)).numpy()

    def rank(self, queries: np.ndarray, k: int | None = None) -> list[list[dict]]:
        """The top-k gallery items of each query embedding; with the model's query_expansion e > 0, of the mean
        of the query and its e nearest items (a first, e-item search), as evaluate ranks."""
        k = min(k or self.top_k, len(self.ids))
        expand = min(self.encoder.cfg.query_expansion, len(self.ids))
        if expand > 0:
            queries = expand_queries(queries, self.vectors_at(self.nearest(queries, expand)[0]))
        idx, scores = self.nearest(queries, k)
        return [[{"image": self.ids[i], "class": self.classes[i], "score": float(sc)}
                 for i, sc in zip(row_idx, row_sc)] for row_idx, row_sc in zip(idx, scores)]

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (Q, k) of the k nearest gallery items and their scores exp(-distance)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ann is not None:
            return self.ann.search(queries, k, self.nprobe, self.rerank * k, self.vectors)
        # one query is a matrix-vector product: NumPy's multi-threaded BLAS only adds overhead there (measured
        # 4x slower on 2 cores), and the worker's cores belong to torch anyway
        with self._blas.limit(limits=1, user_api="blas") if self._blas else _nothing():
            return top_k(queries, self.vectors, k, self.sq_norms)

    def vectors_at(self, idx: np.ndarray) -> np.ndarray:
        """The served vectors of gallery items `idx` (any shape), float32."""
        return np.asarray(self.vectors[idx], dtype=np.float32)

    def search(self, bodies: list, k: int | None = None) -> list:
        """One answer per body: a ranked list, or a RequestError for that body alone (the others still answer)."""
        answers: list = [None] * len(bodies)
        good, arrays = [], []
        for i, body in enumerate(bodies):
            try:
                arrays.append(self.preprocess(body))
                good.append(i)
            except RequestError as exc:
                answers[i] = exc
        if good:
            for i, ranked in zip(good, self.rank(self.embed(np.stack(arrays)), k)):
                answers[i] = ranked
        return answers


def _blas_controller():
    try:  # optional: a serving host may not have threadpoolctl
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _nothing():
    return contextlib.nullcontext()


def check_faiss(manifest: dict) -> None:
    """ModuleNotFoundError (no faiss) or GalleryError (another faiss) unless this Python has the faiss release
    the manifest's index was built with: one line naming the version to install."""
    entry = manifest["index"]
    built_with = str(entry.get("faiss_version", ""))
    require_faiss(built_with)
    if built_with != faiss_version():
        raise GalleryError(f"gallery index {entry['file']} was built with faiss {built_with or '(unknown)'}, but "
                           f"this Python has faiss {faiss_version()}: install faiss-cpu=={built_with} here, or "
                           "rebuild the gallery with this faiss (`dvc repro gallery`)")


def load_ann_index(gallery_dir: Path, manifest: dict, shape: tuple[int, int],
                   blob_store: str | Path | None) -> AnnIndex | None:
    """The gallery's approximate index when its manifest names one (a large gallery), checked against the
    manifest's sha256 and built with this faiss for exactly these shards and neighbours; None for a gallery
    searched exactly."""
    entry = manifest.get("index")
    if not entry:
        return None
    check_faiss(manifest)
    label = f"gallery index {entry['file']}"
    path = verified_path(gallery_dir / entry["file"], entry["sha256"], blob_store, label)
    try:
        return AnnIndex.load(path, vectors_digest(manifest), shape)
    except IndexMismatch as exc:
        raise GalleryError(f"{label}: {exc}") from None
