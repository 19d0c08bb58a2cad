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
from .encoder import Encoder
from .gallery_shards import GalleryError, load_gallery, verified_path
from .retrieval import top_k

# Above this many gallery items an installed faiss index is used for the search (exact, flat L2).
FAISS_MIN_ITEMS = 200_000


class RequestError(Exception):
    """A bad request: `status` is the HTTP status to answer with, the message says what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class SketchSearch:
    def __init__(self, encoder: Encoder, embeddings: np.ndarray, index: list[dict], *, top_k: int,
                 max_pixels: int):
        """top_k and max_pixels: serve.top_k and serve.max_pixels (the archive's serving.json)."""
        if len(embeddings) != len(index):
            raise ValueError(f"gallery has {len(embeddings)} embeddings but {len(index)} index entries")
        self.encoder = encoder.freeze_sketch_path()
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.sq_norms = np.einsum("gd,gd->g", self.embeddings, self.embeddings)
        self.ids = [item["id"] for item in index]
        self.classes = [item["class"] for item in index]
        self.top_k = top_k
        self.max_pixels = max_pixels
        self.faiss_index = _faiss_index(self.embeddings) if len(self.embeddings) >= FAISS_MIN_ITEMS else None
        self._blas = _blas_controller()

    @classmethod
    def load(cls, model_path: str | Path, gallery_dir: str | Path, *, blob_store: str | Path | None = None,
             **kwargs) -> SketchSearch:
        """The model and the gallery (manifest.json + shards), each file verified against the manifest's sha256;
        a file missing from `model_path` / `gallery_dir` is taken from `blob_store` by its sha256 (a deployed slim
        archive). GalleryError names a missing or damaged file: nothing is served from a partial gallery."""
        manifest, embeddings, index = load_gallery(gallery_dir, blob_store)
        if not isinstance(manifest.get("model_sha256"), str):
            raise GalleryError(f"{Path(gallery_dir) / 'manifest.json'}: no model_sha256; run `dvc repro gallery`")
        model = verified_path(Path(model_path), manifest["model_sha256"], blob_store, "model sem_pcyc.pt",
                              "Either the gallery was built with another model (rerun `dvc repro gallery`) or "
                              "the file is damaged (deploy again, or rebuild the archive)")
        return cls(Encoder.load(model), embeddings, index, **kwargs)

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
        k = min(k or self.top_k, len(self.ids))
        if self.faiss_index is not None:
            dist2, idx = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            scores = np.exp(-np.sqrt(np.maximum(dist2, 0)))
        else:
            # one query is a matrix-vector product: NumPy's multi-threaded BLAS only adds overhead there (measured
            # 4x slower on 2 cores), and the worker's cores belong to torch anyway
            with self._blas.limit(limits=1, user_api="blas") if self._blas else _nothing():
                idx, scores = top_k(queries, self.embeddings, k, self.sq_norms)
        return [[{"image": self.ids[i], "class": self.classes[i], "score": float(sc)}
                 for i, sc in zip(row_idx, row_sc)] for row_idx, row_sc in zip(idx, scores)]

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


def _faiss_index(embeddings: np.ndarray):
    try:
        import faiss  # optional
    except ImportError:
        return None
    index = faiss.IndexFlatL2(embeddings.shape[1])
    index.add(embeddings)
    return index
