"""Retrieval metrics, ranking and ITQ hashing (sempcyc.retrieval) against hand-worked cases, scikit-learn and SciPy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import average_precision_score

from sempcyc.runtime import retrieval
from sempcyc.stages import evaluate


def ranked(relevance: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query whose gallery is already in rank order: distance = rank, label 1 = relevant, 0 = not."""
    rel = np.asarray(relevance)
    distances = np.arange(1, len(rel) + 1, dtype=np.float64)[None, :]
    return distances, np.array([1]), rel


# ------------------------------------------------------------------------------------------ average precision

@pytest.mark.parametrize("relevance, expected", [
    ([1, 0, 1, 0], (1 / 1 + 2 / 3) / 2),          # relevant at ranks 1 and 3 of 4
    ([0, 1, 0, 1], (1 / 2 + 2 / 4) / 2),          # ranks 2 and 4 -> 0.5
    ([0, 0, 1, 0, 0], 1 / 3),                     # a single relevant item at rank 3
    ([1, 1, 1], 1.0),                             # everything relevant
    ([1, 1, 0, 0], 1.0),                          # perfect ranking
    ([0, 0, 1, 1], (1 / 3 + 2 / 4) / 2),          # worst ranking of 2 in 4
    ([1, 0, 0, 1, 1], (1 / 1 + 2 / 4 + 3 / 5) / 3),
])
def test_average_precision_hand_cases(relevance, expected):
    d, q, g = ranked(relevance)
    ap = retrieval.average_precisions(d, q, g)
    assert ap.shape == (1,)
    assert ap[0] == pytest.approx(expected, abs=1e-12)


def test_average_precision_ranks_by_distance_not_gallery_order():
    # gallery order: [rel, irr, rel, irr]; distances put them in rank order irr(0.1), rel(0.2), irr(0.3), rel(0.9)
    d = np.array([[0.2, 0.1, 0.9, 0.3]])
    ap = retrieval.average_precisions(d, np.array([7]), np.array([7, 3, 7, 3]))
    assert ap[0] == pytest.approx((1 / 2 + 2 / 4) / 2)   # relevant at ranks 2 and 4


def test_average_precision_several_queries_at_once():
    g = np.array([0, 0, 1, 1])
    d = np.array([[1.0, 2.0, 3.0, 4.0],      # label 0: ranks 1, 2           -> 1
                  [1.0, 2.0, 3.0, 4.0],      # label 1: ranks 3, 4           -> (1/3 + 2/4)/2
                  [4.0, 1.0, 3.0, 2.0],      # label 1: order 1,3,2,0 = labels 0,1,1,0 -> ranks 2, 3
                  [4.0, 3.0, 1.0, 2.0]])     # label 1: order 2,3,1,0 = labels 1,1,0,0 -> ranks 1, 2 -> 1
    ap = retrieval.average_precisions(d, np.array([0, 1, 1, 1]), g)
    np.testing.assert_allclose(ap, [1.0, (1 / 3 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2, 1.0])


def test_average_precision_equals_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    n_q, n_g, n_cls = 60, 150, 6
    q_lab = rng.integers(0, n_cls, n_q)
    g_lab = np.concatenate([np.arange(n_cls), rng.integers(0, n_cls, n_g - n_cls)])  # every class present
    d = rng.random((n_q, n_g))                                                     # continuous: no ties
    assert all(len(np.unique(row)) == n_g for row in d)
    ap = retrieval.average_precisions(d, q_lab, g_lab)
    expected = [average_precision_score(g_lab == q_lab[i], -d[i]) for i in range(n_q)]
    np.testing.assert_allclose(ap, expected, rtol=1e-10, atol=1e-12)
    # and on embeddings, through the module's own distances
    qe, ge = rng.standard_normal((20, 8)), rng.standard_normal((n_g, 8))
    d2 = retrieval.squared_distances(qe, ge)
    ap2 = retrieval.average_precisions(d2, q_lab[:20], g_lab)
    np.testing.assert_allclose(ap2, [average_precision_score(g_lab == q_lab[i], -d2[i]) for i in range(20)],
                               rtol=1e-6)


def test_average_precision_is_nan_without_relevant_items():
    d = np.array([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]])
    ap = retrieval.average_precisions(d, np.array([9, 1]), np.array([1, 2, 1]))
    assert math.isnan(ap[0])
    assert ap[1] == pytest.approx((1 / 2 + 2 / 3) / 2)   # order 1,2,0: labels 2,1,1 -> ranks 2 and 3
    # callers average with nanmean, so such a query drops out of the mean
    m = retrieval.retrieval_metrics(d, np.array([9, 1]), np.array([1, 2, 1]))
    assert m["map_all"] == pytest.approx(ap[1])


# -------------------------------------------------------------------------------------------- precision@k

@pytest.mark.parametrize("relevance, k, expected", [
    ([1, 0, 1, 0], 1, 1.0),
    ([1, 0, 1, 0], 2, 0.5),
    ([1, 0, 1, 0], 3, 2 / 3),
    ([0, 0, 1, 1, 1], 2, 0.0),
    ([0, 0, 1, 1, 1], 4, 0.5),
    ([1, 1, 1, 0], 3, 1.0),
])
def test_precision_at_hand_cases(relevance, k, expected):
    d, q, g = ranked(relevance)
    assert retrieval.precision_at(d, q, g, k)[0] == pytest.approx(expected)


def test_precision_at_k_larger_than_gallery_is_capped():
    d, q, g = ranked([1, 0, 1, 0, 0])
    # k capped at the gallery size: 2 relevant of 5, not 2 of 100
    assert retrieval.precision_at(d, q, g, 100)[0] == pytest.approx(2 / 5)
    assert retrieval.precision_at(d, q, g, 5)[0] == pytest.approx(2 / 5)


def test_precision_at_per_query():
    g = np.array([0, 1, 0, 1])
    d = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(retrieval.precision_at(d, np.array([0, 1]), g, 2), [0.5, 0.5])
    np.testing.assert_allclose(retrieval.precision_at(d, np.array([0, 1]), g, 1), [1.0, 0.0])


# ------------------------------------------------------------------------------------------- distances, top-k

def test_squared_distances_match_scipy():
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((13, 10)), rng.standard_normal((40, 10))
    d2 = retrieval.squared_distances(q, g)
    assert d2.shape == (13, 40)
    np.testing.assert_allclose(d2, cdist(q, g, "sqeuclidean"), rtol=1e-4, atol=1e-4)
    # precomputed gallery norms give the same answer
    norms = np.einsum("gd,gd->g", g.astype(np.float32), g.astype(np.float32))
    np.testing.assert_allclose(retrieval.squared_distances(q, g, norms), d2, rtol=1e-6, atol=1e-6)


def test_squared_distances_never_negative():
    rng = np.random.default_rng(2)
    # large norms and identical rows: q^2 + g^2 - 2qg cancels catastrophically and could round below zero
    g = (rng.standard_normal((50, 32)) * 100 + 1000).astype(np.float32)
    q = np.concatenate([g[:20], g[:20] + 1e-3])
    d2 = retrieval.squared_distances(q, g)
    assert (d2 >= 0).all()
    assert np.isfinite(d2).all()
    np.testing.assert_allclose(d2, cdist(q.astype(np.float64), g.astype(np.float64), "sqeuclidean"),
                               rtol=1e-3, atol=50.0)  # float32 cancellation at |x|^2 ~ 3e7


@pytest.mark.parametrize("k", [1, 5, 17, 60, 61, 200])
def test_top_k_equals_stable_full_sort(k):
    rng = np.random.default_rng(k)
    n_g = 61
    q, g = rng.standard_normal((9, 6)), rng.standard_normal((n_g, 6))
    idx, scores = retrieval.top_k(q, g, k)
    k_eff = min(k, n_g)
    assert idx.shape == scores.shape == (9, k_eff)
    d2 = retrieval.squared_distances(q, g)
    np.testing.assert_array_equal(idx, np.argsort(d2, axis=1, kind="stable")[:, :k_eff])
    # also the float64 reference ordering (random data: no near-ties at float32 resolution)
    np.testing.assert_array_equal(idx, np.argsort(cdist(q, g), axis=1, kind="stable")[:, :k_eff])
    # scores are exp(-euclidean distance), so non-increasing along each row
    np.testing.assert_allclose(scores, np.exp(-np.take_along_axis(cdist(q, g), idx, axis=1)), rtol=1e-4, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert ((scores > 0) & (scores <= 1)).all()


def test_top_k_with_precomputed_norms():
    rng = np.random.default_rng(3)
    q, g = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((30, 5)).astype(np.float32)
    idx_a, s_a = retrieval.top_k(q, g, 7)
    idx_b, s_b = retrieval.top_k(q, g, 7, gallery_sq_norms=(g * g).sum(1))
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_allclose(s_a, s_b, rtol=1e-6)


# Integer coordinates: every distance is exact in float32, so ties are exact ties.
TIE_GALLERY = np.array([[1, 0], [0, 1], [-1, 0], [0, -1],   # 0-3: distance 1 from the origin
                        [0, 0],                            # 4: distance 0
                        [1, 0], [0, 1], [-1, 0],           # 5-7: distance 1 again (duplicates of 0-2)
                        [2, 0], [0, 2]], dtype=np.float32)  # 8, 9: distance 2
TIE_ORDER = [4, 0, 1, 2, 3, 5, 6, 7, 8, 9]                 # by distance, then gallery index


@pytest.mark.parametrize("k", [1, 2, 6, 8, 9, 10, 15])
def test_top_k_ties_broken_by_gallery_index_when_whole_tie_group_fits(k):
    idx, scores = retrieval.top_k(np.zeros((1, 2), np.float32), TIE_GALLERY, k)
    assert idx[0].tolist() == TIE_ORDER[:k]
    np.testing.assert_allclose(scores[0], np.exp(-np.array([0, 1, 1, 1, 1, 1, 1, 1, 2, 2][:k])), rtol=1e-6)


@pytest.mark.parametrize("k", [3, 4, 5, 7])
def test_top_k_ties_broken_by_gallery_index_when_k_cuts_a_tie_group(k):
    """k falls inside the group of eight items at distance 1: the lowest gallery indices must win, as in a full
    stable sort (the docstring promises ties broken by gallery index)."""
    queries = np.zeros((3, 2), np.float32)
    idx, _ = retrieval.top_k(queries, TIE_GALLERY, k)
    for row in idx:
        assert row.tolist() == TIE_ORDER[:k]


def test_top_k_ties_random_integer_data():
    rng = np.random.default_rng(4)
    g = rng.integers(0, 3, (40, 2)).astype(np.float32)   # 9 distinct points: many exact ties
    q = rng.integers(0, 3, (6, 2)).astype(np.float32)
    d2 = retrieval.squared_distances(q, g)
    full = np.argsort(d2, axis=1, kind="stable")
    for k in (1, 7, 13, 20, 39, 40):
        idx, _ = retrieval.top_k(q, g, k)
        np.testing.assert_array_equal(idx, full[:, :k], err_msg=f"k={k}")


# ----------------------------------------------------------------------------------------------------- ITQ

def clustered(n_per: int = 60, n_clusters: int = 8, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 4
    return np.concatenate([c + rng.standard_normal((n_per, dim)) for c in centres])


def hypercube_clusters(n_per: int = 30, n_clusters: int = 16, bits: int = 8, dim: int = 16, seed: int = 0
                       ) -> np.ndarray:
    """Tight clusters at vertices of a {-1, 1}^bits cube, randomly rotated in `dim` dims: a rotation exists
    that makes the quantisation error tiny, and a random start is far from it."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_clusters, dim))
    centres[:, :bits] = rng.choice([-1.0, 1.0], (n_clusters, bits))
    x = np.concatenate([c + 0.1 * rng.standard_normal((n_per, dim)) for c in centres])
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return x @ rot


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_itq_quantisation_loss_decreases(seed):
    x = hypercube_clusters(seed=seed)
    itq = retrieval.ITQ(bits=8, iterations=50, seed=seed).fit(x)
    losses = np.array(itq.losses)
    assert len(losses) == 51            # one per iteration, plus the final rotation's
    assert np.isfinite(losses).all()
    # alternating exact minimisation (B = sign(VR), then Procrustes for R): never increases
    assert (np.diff(losses) <= 1e-9 * losses[0]).all(), losses
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])   # measured 0.32-0.47


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_itq_loss_non_increasing_other_seeds(seed):
    itq = retrieval.ITQ(bits=12, iterations=30, seed=seed).fit(clustered(seed=seed, dim=24))
    losses = np.array(itq.losses)
    assert (np.diff(losses) <= 1e-9 * losses[0]).all()
    assert losses[-1] < losses[0]


def test_itq_rotation_orthogonal_and_codes_boolean():
    x = clustered()
    itq = retrieval.ITQ(bits=8, iterations=20).fit(x)
    r = itq.rotation
    assert r.shape == (8, 8)
    np.testing.assert_allclose(r.T @ r, np.eye(8), atol=1e-10)
    np.testing.assert_allclose(r @ r.T, np.eye(8), atol=1e-10)
    codes = itq.encode(x[:25])
    assert codes.dtype == np.bool_
    assert codes.shape == (25, 8)
    # codes are the signs of the rotated, centred projection: the learned loss is the loss of these codes
    z = (x - itq.mean) @ itq.projection @ itq.rotation
    b = np.where(z >= 0, 1.0, -1.0)
    assert ((b - z) ** 2).sum() == pytest.approx(itq.losses[-1], rel=1e-9)
    np.testing.assert_array_equal(itq.encode(x), z >= 0)
    # encoding is a fixed function: a negligible perturbation gives the same codes
    np.testing.assert_array_equal(itq.encode(x[:5]), itq.encode(x[:5] + 1e-9))


def test_itq_is_deterministic_for_a_seed():
    x = clustered(seed=5)
    a = retrieval.ITQ(bits=8, iterations=10, seed=3).fit(x)
    b = retrieval.ITQ(bits=8, iterations=10, seed=3).fit(x)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))


def test_itq_64_bits_on_64_dims():
    x = clustered(n_per=40, n_clusters=10, dim=64, seed=6)
    itq = retrieval.ITQ(bits=64, iterations=10).fit(x)
    codes = itq.encode(x)
    assert codes.shape == (400, 64) and codes.dtype == np.bool_
    np.testing.assert_allclose(itq.rotation.T @ itq.rotation, np.eye(64), atol=1e-9)
    assert (np.diff(itq.losses) <= 1e-9 * itq.losses[0]).all()


def test_itq_more_bits_than_dims():
    x = clustered(dim=16, seed=7)
    itq = retrieval.ITQ(bits=32, iterations=10).fit(x)
    codes = itq.encode(x[:10])
    assert codes.shape == (10, 32) and codes.dtype == np.bool_
    np.testing.assert_allclose(itq.rotation.T @ itq.rotation, np.eye(32), atol=1e-9)
    assert np.isfinite(itq.losses).all()
    assert (np.diff(itq.losses) <= 1e-9 * itq.losses[0]).all()
    # the extra bits are not constant: they carry information
    assert 0 < itq.encode(x).mean() < 1


def test_itq_codes_keep_neighbours_close():
    """Hamming ranking with ITQ codes beats chance on well-separated clusters."""
    x = clustered(n_per=30, n_clusters=6, dim=16, seed=8)
    labels = np.repeat(np.arange(6), 30)
    itq = retrieval.ITQ(bits=16, iterations=30).fit(x)
    codes = itq.encode(x)
    d = retrieval.hamming_distances(codes, codes)
    m = retrieval.retrieval_metrics(d, labels, labels)
    assert m["map_all"] > 0.6        # chance is ~1/6


# ------------------------------------------------------------------------------------------------ Hamming

def test_hamming_distances_brute_force():
    rng = np.random.default_rng(9)
    q = rng.random((11, 64)) < 0.5
    g = rng.random((23, 64)) < 0.3
    d = retrieval.hamming_distances(q, g)
    brute = np.array([[int(np.count_nonzero(qi != gj)) for gj in g] for qi in q])
    np.testing.assert_array_equal(d, brute)
    assert retrieval.hamming_distances(q[:1], q[:1])[0, 0] == 0
    assert retrieval.hamming_distances(q[:1], ~q[:1])[0, 0] == 64


# --------------------------------------------------------------------------------------- precision / recall

def test_precision_recall_curve_levels_and_perfect_ranking():
    g = np.array([0, 0, 0, 1, 1, 2])
    q = np.array([0, 1, 2])
    # perfect: every relevant item ranked before every irrelevant one
    d = np.where(g[None, :] == q[:, None], 0.0, 1.0) + np.arange(6)[None, :] * 1e-3
    levels, precision = retrieval.precision_recall_curve(d, q, g)
    assert levels.shape == precision.shape == (11,)
    np.testing.assert_allclose(levels, np.linspace(0, 1, 11))
    np.testing.assert_allclose(precision, 1.0)


def test_precision_recall_curve_hand_case():
    # 10 relevant: ranks 1-3, then 10 irrelevant, then 7 relevant (ranks 14-20).
    # Interpolated precision P(r) = max precision at any rank with recall >= r:
    #   r <= 0.3: rank 3 has recall 3/10 and precision 3/3 = 1
    #   r >= 0.4: best is at rank 20, 10/20 = 0.5 (ranks 14..19 give 4/14 .. 9/19, all below 0.5)
    d, q, g = ranked([1, 1, 1] + [0] * 10 + [1] * 7)
    levels, precision = retrieval.precision_recall_curve(d, q, g)
    np.testing.assert_allclose(precision, [1, 1, 1, 1] + [0.5] * 7)


def test_precision_recall_curve_monotone_on_random_data():
    rng = np.random.default_rng(10)
    q_lab, g_lab = rng.integers(0, 5, 40), rng.integers(0, 5, 120)
    d = rng.random((40, 120))
    levels, precision = retrieval.precision_recall_curve(d, q_lab, g_lab)
    assert precision.shape == (11,)
    assert (np.diff(precision) <= 1e-12).all()
    assert ((precision >= 0) & (precision <= 1)).all()
    assert precision[0] >= precision[-1]
    # at recall 1 it is at least the fraction of relevant items (the precision of the whole gallery)
    assert precision[-1] >= np.mean([(g_lab == c).mean() for c in q_lab]) - 1e-12


# ---------------------------------------------------------------------------------------- retrieval_metrics

def test_retrieval_metrics_keys_and_perfect_ranking():
    rng = np.random.default_rng(11)
    g_lab = np.repeat(np.arange(4), 60)            # 240 items
    q_lab = rng.integers(0, 4, 10)
    d = np.where(g_lab[None, :] == q_lab[:, None], 0.0, 1.0) + rng.random((10, 240)) * 1e-3
    m = retrieval.retrieval_metrics(d, q_lab, g_lab)
    assert set(m) == {"map_all", "p_at_10", "p_at_100", "p_at_200"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["map_all"] == pytest.approx(1.0)
    assert m["p_at_10"] == pytest.approx(1.0)
    assert m["p_at_100"] == pytest.approx(60 / 100)   # only 60 relevant per class
    assert m["p_at_200"] == pytest.approx(60 / 200)


def test_retrieval_metrics_custom_ks_and_random_baseline():
    rng = np.random.default_rng(12)
    g_lab = np.repeat(np.arange(5), 40)
    q_lab = rng.integers(0, 5, 200)
    m = retrieval.retrieval_metrics(rng.random((200, 200)), q_lab, g_lab, ks=(5, 50))
    assert set(m) == {"map_all", "p_at_5", "p_at_50"}
    assert 0.15 < m["map_all"] < 0.3        # random ranking: about the base rate 1/5
    assert 0.1 < m["p_at_50"] < 0.3


# ------------------------------------------------------------------------------- evaluate's baselines, H

def offset_domains(seed: int = 0):
    """Four classes, each a direction; every sketch carries one big offset and every image another, as a sketch
    CNN's features differ from a photo's: raw distances are dominated by it, centred ones are not. Classes 0-1
    are seen (they have held-out sketch queries "s"), 2-3 unseen (queries "q")."""
    rng = np.random.default_rng(seed)
    classes = np.eye(4, 16) * 3
    off_sk, off_im = rng.normal(0, 5, 16), rng.normal(0, 5, 16)

    def items(labels, off):
        return classes[labels] + off + rng.normal(0, 0.3, (len(labels), 16))
    labels = {"q": np.repeat([2, 3], 5), "s": np.repeat([0, 1], 5), "g": np.repeat([0, 1, 2, 3], 6)}
    raw = {"q": items(labels["q"], off_sk), "s": items(labels["s"], off_sk), "g": items(labels["g"], off_im),
           "ge": items(labels["g"], off_sk)}  # the photos' edge maps: drawn like sketches
    return raw, labels


def test_centred_baseline_removes_the_domain_offset_on_a_hand_case():
    raw, labels = offset_domains()
    metrics, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0)
    zs = metrics["zero_shot"]
    assert zs["pretrained_centred"]["map_all"] == pytest.approx(1.0)
    assert zs["pretrained"]["map_all"] < 0.9
    assert zs["best_baseline"] == "pretrained_centred"
    assert metrics["diagnostics"]["unseen_centroid_hit_rate"]["pretrained_centred"] == 1.0
    # the centring means come from seen-class items only: moving the unseen queries does not change them
    shifted = {**raw, "q": raw["q"] + 100.0}
    assert np.allclose(evaluate.centre(raw, np.isin(labels["g"], [0, 1]))["g"],
                       evaluate.centre(shifted, np.isin(labels["g"], [0, 1]))["g"])


def test_photo_edge_baseline_reads_each_photo_as_the_mean_of_it_and_its_edge_map():
    """Photos whose colour features barely show their class, edge maps that show it clearly: only the baseline
    that reads both (the mean, then centred) finds the classes, and it is the one to beat."""
    raw, labels = offset_domains()
    raw["g"] = raw["g"] + np.random.default_rng(1).normal(0, 6, raw["g"].shape)  # colour: mostly noise
    raw["ge"] = raw["ge"] - raw["g"] + raw["g"].mean(axis=0)  # the mean of the two: class + offset + small noise
    metrics, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0)
    zs = metrics["zero_shot"]
    assert zs["pretrained_centred_edges"]["map_all"] == pytest.approx(1.0)
    assert zs["pretrained_centred"]["map_all"] < 0.9
    assert zs["best_baseline"] == metrics["generalised"]["best_baseline"] == "pretrained_centred_edges"


def test_model_input_baseline_scores_the_features_as_the_model_normalises_them():
    """The model's own input normalisation (centring and whitening fitted on the training classes) is a
    no-training baseline too: given, it is scored like the others and can be the one to beat; not given (the
    model's extractors are fine-tuned), it repeats the photo-edge baseline."""
    raw, labels = offset_domains()
    raw["g"] = raw["g"] + np.random.default_rng(1).normal(0, 6, raw["g"].shape)  # every centred baseline fails
    rng = np.random.default_rng(2)
    model_input = {k: np.eye(4)[labels[k]] + rng.normal(0, 0.05, (len(labels[k]), 4)) for k in ("q", "s", "g")}
    metrics, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0, model_input=model_input)
    for setting in ("zero_shot", "generalised", "seen_generalised"):
        assert metrics[setting]["pretrained_model_input"]["map_all"] == pytest.approx(1.0)
        assert metrics[setting]["pretrained_centred_edges"]["map_all"] < 0.9
        assert metrics[setting]["best_baseline"] == "pretrained_model_input"
    assert metrics["harmonic"]["pretrained_model_input"] == pytest.approx(1.0)
    fallback, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0)
    for setting in ("zero_shot", "generalised", "seen_generalised"):
        assert fallback[setting]["pretrained_model_input"] == fallback[setting]["pretrained_centred_edges"]


def test_harmonic_mean_needs_both_sides():
    raw, labels = offset_domains()
    metrics, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0)
    for method, h in metrics["harmonic"].items():
        u, s = metrics["generalised"][method]["map_all"], metrics["seen_generalised"][method]["map_all"]
        assert h == pytest.approx(2 * u * s / (u + s))
    assert evaluate.harmonic(0.9, 0.0) == 0.0 and evaluate.harmonic(0.5, 0.5) == 0.5


# -------------------------------------------------------------------------------------------- query expansion

def test_expanded_query_is_the_mean_of_the_query_and_its_nearest_items():
    q = np.array([[0.0, 0.0]], dtype=np.float32)
    g = np.array([[1.0, 0.0], [5.0, 5.0], [0.0, 3.0]], dtype=np.float32)
    idx, _ = retrieval.top_k(q, g, 2)
    assert idx.tolist() == [[0, 2]]
    np.testing.assert_allclose(retrieval.expand_queries(q, g[idx]), [[1 / 3, 1.0]])
    np.testing.assert_allclose(retrieval.expanded_distances(q, g, 2), retrieval.squared_distances([[1 / 3, 1.0]], g),
                               rtol=1e-6)
    assert np.array_equal(retrieval.expanded_distances(q, g, 0), retrieval.squared_distances(q, g))  # 0: none
    assert retrieval.expanded_distances(q, g, 10).shape == (1, 3)  # k above the gallery's size: all of it


def test_query_expansion_pulls_up_the_neighbours_of_the_best_match():
    """A query whose best match sits in a tight class cluster: after expansion, that cluster's other members
    outrank an item of another class that was nearer the query at first."""
    q = np.array([[0.0, 0.0]], dtype=np.float32)
    g = np.array([[1.0, 0.0], [1.6, 0.0], [1.6, 0.1], [-1.2, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1])
    before = retrieval.average_precisions(retrieval.squared_distances(q, g), np.array([0]), labels)
    after = retrieval.average_precisions(retrieval.expanded_distances(q, g, 1), np.array([0]), labels)
    assert before[0] < 1.0 and after[0] == pytest.approx(1.0)


def test_evaluate_expands_every_method_alike():
    raw, labels = offset_domains()
    plain, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0)
    expanded, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0, expand=2)
    for method in ("sem_pcyc", "pretrained"):
        d = retrieval.expanded_distances(raw["q"], raw["g"], 2)
        want = retrieval.retrieval_metrics(d, labels["q"], labels["g"], evaluate.KS)["map_all"]
        assert expanded["generalised"][method]["map_all"] == pytest.approx(want)
    assert expanded["generalised"]["pretrained"]["map_all"] != plain["generalised"]["pretrained"]["map_all"]
    assert expanded["generalised"]["random"] == plain["generalised"]["random"]  # a random ranking is not expanded


# ------------------------------------------------------------------------------------------ gallery expansion

def test_gallery_neighbours_leave_each_item_itself_out_but_keep_its_duplicates():
    g = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=np.float32)
    assert retrieval.gallery_neighbours(g, 2).tolist() == [[3, 1], [0, 3], [0, 3], [0, 1]]
    assert retrieval.gallery_neighbours(g, 9).shape == (4, 3)  # k above the others' count: all of them
    assert retrieval.gallery_neighbours(g, 1, chunk=1).tolist() == retrieval.gallery_neighbours(g, 1).tolist()
    assert retrieval.gallery_neighbours(g, 2).dtype == np.int32
    assert retrieval.gallery_neighbours(g[:1], 2).shape == (1, 0) and retrieval.gallery_neighbours(g, 0).shape == (4, 0)


def test_an_expanded_item_is_a_rank_weighted_mean_of_itself_and_its_neighbours():
    g = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=np.float32)
    neighbours = retrieval.gallery_neighbours(g, 2)
    expanded = retrieval.expand_gallery(g, neighbours)
    np.testing.assert_allclose(expanded[1], (3 * g[1] + 2 * g[0] + 1 * g[3]) / 6)
    np.testing.assert_allclose(expanded[2], (3 * g[2] + 2 * g[0] + 1 * g[3]) / 6)
    assert np.array_equal(retrieval.expand_gallery(g, np.zeros((4, 0), np.int32)), g)  # k 0: as it is


def test_gallery_expansion_lets_a_sketch_that_finds_one_photo_of_a_class_find_the_rest():
    """The query's class has photos 0-2, spread out; a photo of another class (3) lies nearer the query than two
    of them. Expanded, each photo moves towards its own class's others: the query's class ranks first."""
    q = np.array([[0.0, 0.0]], dtype=np.float32)
    g = np.array([[0.5, 0.0], [2.0, 0.0], [2.0, 0.5], [-1.5, 0.0], [-2.5, 0.0], [-2.5, 0.5]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    before = retrieval.average_precisions(retrieval.squared_distances(q, g), np.array([0]), labels)
    expanded = retrieval.expand_gallery(g, retrieval.gallery_neighbours(g, 2))
    after = retrieval.average_precisions(retrieval.squared_distances(q, expanded), np.array([0]), labels)
    assert before[0] < 1.0 and after[0] == pytest.approx(1.0)


def test_evaluate_expands_every_methods_gallery_alike_before_keeping_its_unseen_part():
    raw, labels = offset_domains()
    expanded, _ = evaluate.evaluate_all(raw, raw, labels, np.array([2, 3]), seed=0, gallery_expand=2)
    g = retrieval.expand_gallery(raw["g"], retrieval.gallery_neighbours(raw["g"], 2))
    unseen = np.isin(labels["g"], [2, 3])
    for method in ("sem_pcyc", "pretrained"):
        want = retrieval.retrieval_metrics(retrieval.squared_distances(raw["q"], g[unseen]), labels["q"],
                                           labels["g"][unseen], evaluate.KS)["map_all"]
        assert expanded["zero_shot"][method]["map_all"] == pytest.approx(want)
