"""The approximate index (sempcyc.runtime.ann, faiss's IVF with 4-bit product-quantised codes): exact answers when
its short list holds everything, high recall with few lists on clustered data, answers ranked and scored as exact
search ranks them, a deterministic build, and an index file that round-trips and refuses a gallery or a faiss it
was not built for."""
from __future__ import annotations

import zipfile

import faiss
import numpy as np
import pytest

from sempcyc.runtime import ann
from sempcyc.runtime.ann import AnnIndex, IndexMismatch, IndexParams
from sempcyc.runtime.retrieval import expanded_distances, top_k
from sempcyc.runtime.search import SketchSearch

PARAMS = IndexParams(nlist=16, code_dims=4, seed=0, iterations=5, sample_per_list=64)


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
def small() -> tuple[np.ndarray, np.ndarray, AnnIndex]:
    gallery, queries = clustered(3000, 32, 40, seed=0)
    return gallery, queries, AnnIndex.build(gallery, "digest-a", PARAMS)


def test_a_short_list_of_the_whole_gallery_gives_exact_search(small):
    gallery, queries, index = small
    idx, scores = index.search(queries, 30, nprobe=index.nlist, shortlist=len(gallery), vectors=gallery)
    expected, expected_scores = top_k(queries, gallery, 30)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
    assert idx.dtype == np.int64 and np.all(np.diff(scores, axis=1) <= 0)


def test_the_short_list_is_ranked_exactly_against_the_vectors_handed_in(small):
    """Whatever the codes' approximate order, the answer is ordered and scored by exact float32 distances."""
    gallery, queries, index = small
    idx, scores = index.search(queries, 10, nprobe=2, shortlist=40, vectors=gallery)
    exact = np.exp(-np.linalg.norm(gallery[idx] - queries[:, None, :], axis=2))
    np.testing.assert_allclose(scores, exact, rtol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ties_are_broken_by_gallery_index(small):
    # eight items at distance 1 from the query, each once, in reverse order of their coordinates
    gallery = np.concatenate([np.eye(4), -np.eye(4)] * 4).astype(np.float32)
    index = AnnIndex.build(gallery, "d", IndexParams(nlist=2, code_dims=2, seed=0, iterations=5, sample_per_list=64))
    idx, scores = index.search(np.zeros((1, 4), dtype=np.float32), 5, nprobe=2, shortlist=32, vectors=gallery)
    assert idx.tolist() == [[0, 1, 2, 3, 4]]
    np.testing.assert_allclose(scores, np.exp(-1.0), rtol=1e-6)


def test_few_lists_and_a_short_list_find_most_neighbours_on_clustered_data():
    gallery, queries = clustered(20_000, 32, 100, seed=1)
    index = AnnIndex.build(gallery, "d", IndexParams(ann.default_nlist(len(gallery)), 4, 0, 10, 64))
    truth, _ = top_k(queries, gallery, 30)
    assert index.nlist == 64

    def found(nprobe: int, shortlist: int) -> float:
        return recall(index.search(queries, 30, nprobe, shortlist, gallery)[0], truth)

    assert found(8, 240) >= 0.95  # 1/8 of the lists, 8 candidates a result (measured 0.977)
    assert found(1, 30) < 0.95  # approximate: one list and no room to re-rank is not enough


def test_the_build_is_deterministic_for_a_seed(small, tmp_path):
    gallery, _, index = small
    index.save(tmp_path / "a.npz")
    AnnIndex.build(gallery, "digest-a", PARAMS).save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    AnnIndex.build(gallery, "digest-a", IndexParams(**{**PARAMS.__dict__, "seed": 1})).save(tmp_path / "c.npz")
    assert (tmp_path / "c.npz").read_bytes() != (tmp_path / "a.npz").read_bytes()


def test_the_index_is_faiss_fast_scan_ivf_built_on_one_thread(small):
    _, _, index = small
    assert isinstance(index.index, faiss.IndexIVFPQFastScan) and index.index.nlist == 16
    assert index.index.pq.M == 8 and index.index.pq.nbits == 4  # 32 wide, 4 dimensions a code
    assert faiss.omp_get_max_threads() >= 1
    before = faiss.omp_get_max_threads()
    with ann.one_thread():
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before


def test_a_width_that_the_codes_do_not_divide_is_padded(small):
    gallery, queries, _ = small
    cut, q = np.ascontiguousarray(gallery[:, :30]), np.ascontiguousarray(queries[:, :30])
    index = AnnIndex.build(cut, "d", IndexParams(16, 4, 0, 5, 64))  # 30 -> 32 wide, zeros added
    assert index.dim == 30 and index.index.d == 32
    idx, _ = index.search(q, 10, nprobe=16, shortlist=len(cut), vectors=cut)
    np.testing.assert_array_equal(idx, top_k(q, cut, 10)[0])


def test_lists_holding_fewer_than_k_items_scan_every_list():
    gallery, queries = clustered(200, 16, 10, seed=2)
    index = AnnIndex.build(gallery, "d", IndexParams(nlist=32, code_dims=4, seed=0, iterations=5,
                                                     sample_per_list=64))  # ~6 items a list
    idx, scores = index.search(queries, 20, nprobe=1, shortlist=20, vectors=gallery)
    assert idx.shape == (50, 20) and np.all(idx >= 0) and all(len(set(row)) == 20 for row in idx)
    assert np.all(np.diff(scores, axis=1) <= 0)
    everything, _ = index.search(queries[:1], 500, nprobe=1, shortlist=500, vectors=gallery)
    assert sorted(everything[0]) == list(range(200))  # k above the gallery: all of it, nearest first


@pytest.mark.parametrize("items, nlist, ok", [(16, 16, True), (15, 1, False), (100, 101, False), (100, 64, True)])
def test_which_galleries_can_have_an_index(items, nlist, ok):
    assert ann.indexable(items, nlist) is ok


def test_save_load_round_trip(small, tmp_path):
    gallery, queries, index = small
    path = tmp_path / "index" / "ivf.npz"
    index.save(path)
    loaded = AnnIndex.load(path, "digest-a", gallery.shape)
    assert loaded.params == PARAMS and loaded.nlist == 16
    for got, want in zip(loaded.search(queries, 10, 3, 40, gallery), index.search(queries, 10, 3, 40, gallery)):
        np.testing.assert_array_equal(got, want)
    with np.load(path) as saved:  # faiss's bytes (codes and ids, never the vectors) and what they were built for
        assert set(saved.files) == {"format", "faiss_version", "gallery_digest", "items", "dim", "nlist", "code_dims",
                                    "seed", "iterations", "sample_per_list", "index"}
        assert str(saved["faiss_version"]) == faiss.__version__
        assert saved["index"].nbytes < gallery.nbytes / 4
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
    AnnIndex.load(path, "digest-a", gallery.shape)


def test_load_refuses_an_index_built_for_another_gallery(small, tmp_path):
    gallery, _, index = small
    path = tmp_path / "ivf.npz"
    index.save(path)
    with pytest.raises(IndexMismatch) as info:
        AnnIndex.load(path, "digest-b", gallery.shape)
    message = str(info.value)
    assert str(path) in message and "'digest-a'" in message and "'digest-b'" in message
    assert "dvc repro gallery" in message and "\n" not in message and isinstance(info.value, ValueError)


@pytest.mark.parametrize("shape", [(2999, 32), (3000, 31)], ids=["items", "dim"])
def test_load_refuses_vectors_of_another_shape(small, tmp_path, shape):
    _, _, index = small
    path = tmp_path / "ivf.npz"
    index.save(path)
    with pytest.raises(IndexMismatch, match=r"indexes 3000 items of dimension 32, but the gallery's vectors are "
                                            r"\(\d+, \d+\); rebuild the gallery and its index with `dvc repro"):
        AnnIndex.load(path, "digest-a", shape)


def test_load_refuses_an_index_written_by_another_faiss(small, tmp_path, monkeypatch):
    gallery, _, index = small
    path = tmp_path / "ivf.npz"
    monkeypatch.setattr(faiss, "__version__", "1.7.4")
    index.save(path)  # as an older faiss would label it
    monkeypatch.undo()
    with pytest.raises(IndexMismatch) as info:
        AnnIndex.load(path, "digest-a", gallery.shape)
    message = str(info.value)
    assert f"built with faiss 1.7.4, but this Python has faiss {faiss.__version__}" in message
    assert "faiss-cpu==1.7.4" in message and "dvc repro gallery" in message and "\n" not in message


def test_without_faiss_every_entry_point_names_the_package(small, tmp_path, monkeypatch):
    gallery, _, index = small
    index.save(tmp_path / "ivf.npz")
    monkeypatch.setattr(ann, "faiss", None)
    for call in (lambda: ann.require_faiss("1.15.1"), lambda: AnnIndex.load(tmp_path / "ivf.npz", "digest-a", (1, 1)),
                 lambda: AnnIndex.build(gallery, "d", PARAMS)):
        with pytest.raises(ModuleNotFoundError) as info:
            call()
        message = str(info.value)
        assert "cannot import faiss" in message and "pip install faiss-cpu" in message and "\n" not in message
        assert info.value.name == "faiss"
    with pytest.raises(ModuleNotFoundError, match=r"pip install faiss-cpu==1\.15\.1\)"):
        ann.require_faiss("1.15.1")


def test_bad_queries_and_arguments_are_refused(small):
    gallery, queries, index = small
    with pytest.raises(ValueError, match=r"queries must be \(n, 32\)"):
        index.search(queries[:, :16], 5, 2, 20, gallery)
    with pytest.raises(ValueError, match="at least 1"):
        index.search(queries, 0, 2, 20, gallery)
    with pytest.raises(ValueError, match="cannot train 16 lists"):
        AnnIndex.build(gallery[:10], "d", PARAMS)


@pytest.mark.parametrize("n, lists", [(1, 1), (10, 2), (1000, 16), (100_000, 128), (1_000_000, 512)])
def test_default_nlist(n, lists):
    assert ann.default_nlist(n) == lists


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
    exact = SketchSearch(_Encoder(expand), gallery, items, top_k=10, max_pixels=1)
    approx = SketchSearch(_Encoder(expand), gallery, items, top_k=10, max_pixels=1, ann=index, nprobe=index.nlist,
                          rerank=len(gallery))
    want = np.argsort(expanded_distances(queries, gallery, expand), axis=1, kind="stable")[:, :10]
    for search in (exact, approx):
        got = [[int(hit["image"][3:]) for hit in row] for row in search.rank(queries)]
        assert got == want.tolist()
