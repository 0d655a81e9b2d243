"""Similarity search: backends agree, ties follow one rule, padding and bad input are defined."""
from __future__ import annotations

import numpy as np
import pytest

from hgc.errors import InputError
from hgc.graph import knn
from her2st_graph_data import load_colour_embeddings

METRICS = ["l1", "l2", "cosine"]


def _assert_same_up_to_ties(a, b, metric, tol=1e-4):
    """Same neighbours, except where scores are within ``tol`` of each other (float rounding)."""
    (ia, sa), (ib, sb) = a, b
    np.testing.assert_allclose(sa, sb, rtol=tol, atol=tol)
    differ = ia != ib
    if differ.any():
        rows = np.flatnonzero(differ.any(axis=1))
        for r in rows:  # a swapped pair must have (nearly) equal scores
            cols = np.flatnonzero(differ[r])
            assert np.ptp(sa[r, cols]) <= tol * max(1.0, abs(sa[r, cols]).max()), (metric, r, ia[r], ib[r], sa[r])
    assert differ.mean() < 0.01


@pytest.mark.parametrize("metric", METRICS)
def test_faiss_and_torch_agree_on_random(metric):
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(2000, 48)).astype(np.float32)
    queries = rng.normal(size=(300, 48)).astype(np.float32)
    a = knn.search(queries, refs, 7, metric, backend="faiss")
    b = knn.search(queries, refs, 7, metric, backend="torch", chunk_size=64, ref_chunk_size=333)
    _assert_same_up_to_ties(a, b, metric)
    order = 1 if metric == "cosine" else -1  # scores sorted best first
    assert (np.diff(a[1], axis=1) * order <= 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_faiss_and_torch_agree_on_real_embeddings(her2st_manifest, metric):
    emb = load_colour_embeddings(her2st_manifest)
    refs = np.concatenate([emb[s] for s in ("C2", "C3", "C4", "C5", "C6")])
    a = knn.search(emb["B4"], refs, 7, metric, backend="faiss")
    b = knn.search(emb["B4"], refs, 7, metric, backend="torch", ref_chunk_size=250)
    _assert_same_up_to_ties(a, b, metric)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lowest_reference_index(backend, metric):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(5, 6)).astype(np.float32)
    refs = np.concatenate([base, base, base, base])  # every vector four times: 5, 10, 15 tie with 0
    queries = base + 0.01 * rng.normal(size=base.shape).astype(np.float32)
    expected = np.arange(5)[:, None] + np.array([0, 5, 10])[None, :]
    for chunk in (7, 16384):  # ties across reference chunks and within one chunk
        idx, _ = knn.search(queries, refs, 3, metric, backend=backend, ref_chunk_size=chunk)
        np.testing.assert_array_equal(idx, expected)
    if metric == "l1":  # exact zero distances: an exact query ties with all four copies
        idx, d = knn.search(base[:1], refs, 4, metric, backend=backend)
        assert idx.tolist() == [[0, 5, 10, 15]] and (d == 0).all()


@pytest.mark.parametrize("chunk", [64, 16384])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_integer_features_tie_rule_identical_across_backends(metric, backend, chunk):
    rng = np.random.default_rng(3)
    refs = rng.integers(0, 3, size=(400, 4)).astype(np.float32)  # many exact ties, exact arithmetic
    queries = rng.integers(0, 3, size=(50, 4)).astype(np.float32)
    idx, d = knn.search(queries, refs, 9, metric, backend=backend, ref_chunk_size=chunk)
    diff = queries[:, None] - refs[None]
    full = np.abs(diff).sum(-1) if metric == "l1" else np.sqrt((diff ** 2).sum(-1))
    ref_idx = np.lexsort((np.broadcast_to(np.arange(400), full.shape), full), axis=-1)[:, :9]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(d, np.take_along_axis(full, ref_idx, 1), rtol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_k_larger_than_pool_pads(backend):
    refs = np.eye(3, dtype=np.float32)
    idx, d = knn.search(refs[:2], refs, 5, "l2", backend=backend)
    assert idx.shape == (2, 5) and (idx[:, 3:] == -1).all() and np.isinf(d[:, 3:]).all()
    assert (idx[:, 0] == [0, 1]).all() and d[0, 0] == 0
    _, s = knn.search(refs[:2], refs, 5, "cosine", backend=backend)
    assert (s[:, 3:] == -np.inf).all() and s[0, 0] == pytest.approx(1.0)


def test_bad_input_is_named():
    refs = np.ones((4, 3), np.float32)
    with pytest.raises(InputError, match="empty"):
        knn.search(refs, refs[:0], 2)
    bad = refs.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match=r"queries rows \[2\]"):
        knn.search(bad, refs, 2)
    with pytest.raises(InputError, match=r"references rows \[2\]"):
        knn.search(refs, bad, 2)
    with pytest.raises(InputError, match="all-zero"):
        knn.search(np.zeros((1, 3), np.float32), refs, 2, "cosine")
    with pytest.raises(InputError, match="features"):
        knn.search(np.ones((1, 2), np.float32), refs, 2)
    with pytest.raises(InputError, match="metric"):
        knn.search(refs, refs, 2, "hamming")
    assert knn.search(refs[:0], refs, 2)[0].shape == (0, 2)


@pytest.mark.parametrize("metric", METRICS)
def test_ivf_recall_is_measured(metric):
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(20, 16)) * 5
    refs = (centres[rng.integers(0, 20, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 20, 200)] + rng.normal(size=(200, 16))).astype(np.float32)
    exact, _ = knn.search(queries, refs, 7, metric, backend="faiss")
    approx, _ = knn.search(queries, refs, 7, metric, backend="faiss-ivf", nprobe=8)
    assert knn.recall_at_k(exact, exact) == 1.0
    assert knn.recall_at_k(approx, exact) > 0.8
