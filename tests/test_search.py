"""SketchSearch in-process: ranked answers, a batch answered request by request, and a gallery with an
approximate (IVF) index.

The serving tests' tiny model, its gallery and its .mar (conftest.py's `built`) are built once a session (tiny
CNN, 32-px arrays, a few iterations; the stages run in-process).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import png_bytes
from sempcyc.runtime.ann import AnnIndex, IndexParams
from sempcyc.runtime.gallery_shards import GalleryError, load_gallery, read_manifest
from sempcyc.runtime.search import RequestError, SketchSearch
from sempcyc.runtime.served_vectors import ShardVectors
from serving_helpers import GALLERY_SIZE, Built, assert_ranked, same_answer, sketch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------- 1. SketchSearch (unit)

def test_search_returns_k_ranked_items(offline: SketchSearch, built: Built):
    k = min(30, GALLERY_SIZE)  # the README's serve.top_k
    [answer] = offline.search([sketch(1)])
    assert_ranked(answer, k)
    # the scores are exp(-distance) to the gallery embeddings, nearest first
    _, emb, index = load_gallery(built.gallery)
    arr = offline.preprocess(sketch(1))
    query = offline.embed(arr[None])[0]
    dist = np.sqrt(((emb - query) ** 2).sum(1))
    ids = [e["id"] for e in index]
    assert answer[0]["image"] == ids[int(np.argmin(dist))]
    assert answer[0]["score"] == pytest.approx(float(np.exp(-dist.min())), rel=1e-4)


def test_search_top_k(built: Built, offline: SketchSearch):
    five = SketchSearch.load(built.model, built.gallery, top_k=5, max_pixels=16_000_000)
    [answer] = five.search([sketch(2)])
    assert_ranked(answer, 5)
    assert [r["image"] for r in answer] == [r["image"] for r in offline.search([sketch(2)])[0][:5]]
    assert len(five.search([sketch(2)], k=3)[0]) == 3
    assert len(five.search([sketch(2)], k=10_000)[0]) == GALLERY_SIZE  # never more than the gallery holds


def test_search_answers_each_request_of_a_batch_alone(offline: SketchSearch, big_png: bytes):
    good = sketch(3)
    answers = offline.search([good, b"", b"not an image at all", big_png, "a str", {"json": 1}])
    assert len(answers) == 6
    assert_ranked(answers[0], min(30, GALLERY_SIZE))
    assert answers[0] == offline.search([good])[0]  # the bad neighbours change nothing
    errors = answers[1:]
    assert all(isinstance(e, RequestError) for e in errors), errors
    assert [e.status for e in errors] == [400, 400, 413, 415, 415]
    assert all(e.message and str(e) == e.message for e in errors)
    assert "empty" in errors[0].message
    assert "too large" in errors[2].message
    # bytearray / memoryview bodies are bytes too (batched inference: equal up to float noise)
    for answer in offline.search([bytearray(good), memoryview(good)]):
        assert same_answer(answer, answers[0])
    # a batch of only bad requests never reaches the model
    assert [e.status for e in offline.search([b"", "x"])] == [400, 415]


# --------------------------------------------------------------------- 7b. a gallery with an approximate index

def test_search_with_the_index_scanning_every_list_finds_the_exact_answers(ann_built: Built, offline: SketchSearch):
    search = SketchSearch.load(ann_built.model, ann_built.gallery, top_k=30, max_pixels=16_000_000, nprobe=4,
                               rerank=GALLERY_SIZE)
    assert search.ann is not None and isinstance(search.vectors, ShardVectors)  # read from the shard files
    sketches = [png_bytes(seed=i) for i in range(4)]
    for got, want in zip(search.search(sketches), offline.search(sketches)):
        assert same_answer(got, want)  # the short list holds everything, ranked exactly: exact search's answer


def test_search_refuses_an_index_built_for_another_gallery(ann_built: Built, tmp_path: Path):
    gallery = tmp_path / "gallery"
    shutil.copytree(ann_built.gallery, gallery)
    _, embeddings, _ = load_gallery(gallery)
    # an intact index file (its sha256 in the manifest) built for other vectors: serving it would answer wrongly
    AnnIndex.build(embeddings[::-1].copy(), "another gallery", IndexParams(4, 3, 0, 2, 8)).save(gallery / "ivf.npz")
    manifest = read_manifest(gallery)
    manifest["index"]["sha256"] = hashlib.sha256((gallery / "ivf.npz").read_bytes()).hexdigest()
    (gallery / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(GalleryError, match=r"gallery index ivf\.npz: .*another gallery.*dvc repro gallery"):
        SketchSearch.load(ann_built.model, gallery, top_k=5, max_pixels=16_000_000, nprobe=4, rerank=2)
