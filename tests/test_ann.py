"""The IVF index (sempcyc.runtime.ann): exact when it scans every list, high recall with few lists on clustered
data, a deterministic build, an index file that round-trips and refuses a gallery it was not built for."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from sempcyc.runtime import ann
from sempcyc.runtime.ann import IndexMismatch, IVFIndex
from sempcyc.runtime.retrieval import expanded_distances, top_k
from sempcyc.runtime.search import SketchSearch

BUILD = {"seed": 0, "iterations": 5, "sample_per_list": 64}


def clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `clusters` centres (item at cosine ~0.7 to its centre) and fresh queries from them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n), draw(50)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray, IVFIndex]:
    gallery, queries = clustered(3000, 32, 40, seed=0)
    return gallery, queries, IVFIndex.build(gallery, 16, "digest-a", **BUILD)


def test_scanning_every_list_is_exact_search_over_the_float16_stored_vectors(small):
    gallery, queries, index = small
    rounded = gallery.astype(np.float16).astype(np.float32)
    idx, dist = index.search(queries, 30, nprobe=index.nlist)
    expected, _ = top_k(queries, rounded, 30)
    np.testing.assert_array_equal(idx, expected)
    direct = ((rounded[idx] - queries[:, None, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(dist, direct, rtol=1e-5, atol=1e-6)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and np.all(np.diff(dist, axis=1) >= 0)


def test_ties_are_broken_by_gallery_index_not_list_order():
    # eight items at distance 1 from the query, each alone in a list, the lists in reverse gallery order
    gallery = np.concatenate([np.eye(4), -np.eye(4)]).astype(np.float32)
    index = IVFIndex(gallery, gallery[::-1] * 2, np.arange(8)[::-1])
    idx, dist = index.search(np.zeros((1, 4), dtype=np.float32), 3, nprobe=8)
    assert idx.tolist() == [[0, 1, 2]] and dist.tolist() == [[1.0, 1.0, 1.0]]


def test_few_lists_find_most_neighbours_on_clustered_data():
    gallery, queries = clustered(20_000, 32, 100, seed=1)
    index = IVFIndex.build(gallery, ann.default_nlist(len(gallery)), "d", **BUILD)
    truth, _ = top_k(queries, gallery, 30)
    assert index.nlist == 512
    assert recall(index.search(queries, 30, nprobe=16)[0], truth) >= 0.97  # 3% of the lists (measured 0.98)
    assert recall(index.search(queries, 30, nprobe=1)[0], truth) < 0.95  # approximate: one list is not enough


def test_the_build_is_deterministic_for_a_seed(small):
    gallery, _, index = small
    again = IVFIndex.build(gallery, 16, "digest-a", **BUILD)
    np.testing.assert_array_equal(again.centroids, index.centroids)
    np.testing.assert_array_equal(again.assignment, index.assignment)
    other = IVFIndex.build(gallery, 16, "digest-a", **{**BUILD, "seed": 1})
    assert not np.array_equal(other.centroids, index.centroids)


def test_emptied_lists_are_reseeded():
    # 90 copies of one point: most starting centroids coincide, and all but one of those would stay empty
    rng = np.random.default_rng(0)
    gallery = np.concatenate([np.ones((90, 8)), rng.standard_normal((10, 8)) * 5]).astype(np.float32)
    index = IVFIndex.build(gallery, 8, "d", **BUILD)
    assert np.all(np.bincount(index.assignment, minlength=8) > 0)
    assert len(np.unique(index.centroids, axis=0)) == 8


def test_lists_holding_fewer_than_k_items_are_widened():
    gallery, queries = clustered(200, 16, 10, seed=2)
    index = IVFIndex.build(gallery, 32, "d", **BUILD)  # ~6 items a list
    idx, dist = index.search(queries, 20, nprobe=1)
    assert idx.shape == (50, 20) and all(len(set(row)) == 20 for row in idx)
    assert np.all(np.diff(dist, axis=1) >= 0)
    everything, _ = index.search(queries[:1], 500, nprobe=1)  # k above the gallery: all of it, nearest first
    assert sorted(everything[0]) == list(range(200))


def test_save_load_round_trip(small, tmp_path):
    gallery, queries, index = small
    path = tmp_path / "index" / "ivf.npz"
    index.save(path)
    loaded = IVFIndex.load(path, gallery, "digest-a")
    for got, want in zip(loaded.search(queries, 10, nprobe=3), index.search(queries, 10, nprobe=3)):
        np.testing.assert_array_equal(got, want)
    with np.load(path) as saved:  # centroids and lists, never the vectors
        assert set(saved.files) == {"format", "gallery_digest", "nlist", "dim", "items", "centroids", "assignment"}
    first = path.read_bytes()
    loaded.save(path)
    assert path.read_bytes() == first  # equal content, equal bytes (a DVC output): no save-time timestamps
    with zipfile.ZipFile(path) as archive:
        assert {member.date_time for member in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert [p.name for p in path.parent.iterdir()] == ["ivf.npz"]


def test_a_failed_save_keeps_the_old_index(small, tmp_path, monkeypatch):
    gallery, _, index = small
    path = tmp_path / "ivf.npz"
    index.save(path)
    monkeypatch.setattr(np.lib.format, "write_array", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ivf.npz"]
    IVFIndex.load(path, gallery, "digest-a")


def test_load_refuses_an_index_built_for_another_gallery(small, tmp_path):
    gallery, _, index = small
    path = tmp_path / "ivf.npz"
    index.save(path)
    with pytest.raises(IndexMismatch) as info:
        IVFIndex.load(path, gallery, "digest-b")
    message = str(info.value)
    assert str(path) in message and "'digest-a'" in message and "'digest-b'" in message
    assert "dvc repro gallery" in message and isinstance(info.value, ValueError)


@pytest.mark.parametrize("cut", [np.s_[:-1], np.s_[:, :-1]], ids=["items", "dim"])
def test_load_refuses_vectors_of_another_shape(small, tmp_path, cut):
    gallery, _, index = small
    path = tmp_path / "ivf.npz"
    index.save(path)
    with pytest.raises(IndexMismatch, match=r"indexes 3000 items of dimension 32, but the gallery's vectors are "
                                            r"\(\d+, \d+\); rebuild the gallery and its index with `dvc repro"):
        IVFIndex.load(path, gallery[cut], "digest-a")


def test_bad_queries_and_arguments_are_refused(small):
    _, queries, index = small
    with pytest.raises(ValueError, match=r"queries must be \(n, 32\)"):
        index.search(queries[:, :16], 5, nprobe=2)
    with pytest.raises(ValueError, match="at least 1"):
        index.search(queries, 0, nprobe=2)
    with pytest.raises(ValueError, match="assignment holds lists outside"):
        IVFIndex(np.zeros((3, 2)), np.zeros((2, 2)), [0, 1, 2])


@pytest.mark.parametrize("n, lists", [(1, 1), (10, 8), (1000, 128), (100_000, 1024), (1_000_000, 4096)])
def test_default_nlist(n, lists):
    assert ann.default_nlist(n) == lists


def test_vectors_at_gives_the_stored_vectors_of_gallery_items(small):
    gallery, _, index = small
    idx = np.array([[0, 2999], [17, 5]])
    got = index.vectors_at(idx)
    assert got.shape == (2, 2, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, gallery[idx].astype(np.float16).astype(np.float32))


class _Encoder:
    """What SketchSearch.rank reads of an encoder: its config's query_expansion."""

    def __init__(self, expand: int):
        self.cfg = type("Cfg", (), {"query_expansion": expand})()

    def freeze_sketch_path(self):
        return self


@pytest.mark.parametrize("expand", [0, 1, 3])
def test_served_ranking_expands_queries_as_evaluate_does_exactly_or_through_the_index(small, expand):
    gallery, queries, index = small
    items = [{"id": f"img{i}", "class": str(i % 40)} for i in range(len(gallery))]
    half = gallery.astype(np.float16).astype(np.float32)  # what the index stores
    exact = SketchSearch(_Encoder(expand), half, items, top_k=10, max_pixels=1)
    approx = SketchSearch(_Encoder(expand), None, items, top_k=10, max_pixels=1, ann=index, nprobe=index.nlist)
    want = np.argsort(expanded_distances(queries, half, expand), axis=1, kind="stable")[:, :10]
    for search in (exact, approx):
        got = [[int(hit["image"][3:]) for hit in row] for row in search.rank(queries)]
        assert got == want.tolist()
