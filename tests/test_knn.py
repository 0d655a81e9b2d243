"""Similarity search: backends agree, ties follow one rule, padding and bad input are defined."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from her2st_graph_data import load_colour_embeddings
from hgc.errors import InputError
from hgc.graph import knn

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


class _NoisyKernels:
    """Fast kernels that round differently, as another CPU's BLAS would: every float32 key the
    faiss index or the torch kernel computes is multiplied by (1 + u), |u| <= 8 float32 epsilons."""

    def __init__(self, monkeypatch, seed: int):
        import torch

        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        real_key, real_index = knn._torch_key, knn._flat_index
        eps = float(np.finfo(np.float32).eps)

        def noisy_key(*args):
            key = real_key(*args)
            return key * (1 + 8 * eps * (2 * torch.rand(key.shape, generator=self.gen) - 1))

        class NoisyIndex:
            def __init__(self, index):
                self.index = index

            def add(self, r):
                self.n = len(r)
                self.index.add(r)

            def search(inner, q, m):
                dist, idx = inner.index.search(q, min(inner.n, 2 * m))
                dist = dist * (1 + 8 * eps * self.rng.uniform(-1, 1, dist.shape)).astype(np.float32)
                order = np.argsort(dist if inner.index.metric_type != 0 else -dist, axis=1, kind="stable")[:, :m]
                return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

        monkeypatch.setattr(knn, "_torch_key", noisy_key)
        monkeypatch.setattr(knn, "_flat_index", lambda *a: NoisyIndex(real_index(*a)))


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lowest_reference_index(backend, metric, noisy, monkeypatch):
    """Copies of a vector tie and go to the lower index whatever rounding the fast kernel does
    (its matrix products round differently on other CPUs), within and across reference chunks."""
    if noisy:
        _NoisyKernels(monkeypatch, seed=5)
    rng = np.random.default_rng(2)
    base = rng.normal(size=(5, 6)).astype(np.float32)
    refs = np.concatenate([base, base, base, base])  # every vector four times: 5, 10, 15 tie with 0
    queries = base + 0.01 * rng.normal(size=base.shape).astype(np.float32)
    expected = np.arange(5)[:, None] + np.array([0, 5, 10])[None, :]
    for chunk in (7, 16384):  # ties across reference chunks and within one chunk
        idx, score = knn.search(queries, refs, 3, metric, backend=backend, ref_chunk_size=chunk)
        np.testing.assert_array_equal(idx, expected)
        assert (score == score[:, :1]).all()  # the copies' scores are equal, not merely close
    idx, d = knn.search(base[:1], refs, 4, metric, backend=backend)  # a query equal to the vector itself
    assert idx.tolist() == [[0, 5, 10, 15]]
    if metric != "cosine":
        assert (d == 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_results_do_not_depend_on_the_fast_kernels_rounding(metric, monkeypatch):
    """On real-valued data with near ties, faiss, torch and both with perturbed kernels return
    the same neighbours and scores: the candidates they propose are re-scored by one exact rule."""
    rng = np.random.default_rng(7)
    refs = rng.normal(size=(600, 24)).astype(np.float32)
    refs[300:400] = refs[:100]  # duplicates across the pool
    refs[400:500] = refs[:100] + 1e-7 * rng.normal(size=(100, 24)).astype(np.float32)  # near duplicates
    queries = (refs[rng.integers(0, 600, 80)] + 0.05 * rng.normal(size=(80, 24))).astype(np.float32)
    want = knn.search(queries, refs, 9, metric, backend="torch", ref_chunk_size=128)
    pairs = [(r, list(row).index(a), list(row).index(a + 300)) for r, row in enumerate(want[0])
             for a in row if a < 100 and a + 300 in row]
    assert len(pairs) > 20  # exact duplicates rank together...
    assert all(i < j and want[1][r, i] == want[1][r, j] for r, i, j in pairs)  # ...the lower index first
    got = [knn.search(queries, refs, 9, metric, backend="faiss")]
    _NoisyKernels(monkeypatch, seed=11)
    got += [knn.search(queries, refs, 9, metric, backend=b, ref_chunk_size=97) for b in ("faiss", "torch")]
    for idx, score in got:
        np.testing.assert_array_equal(idx, want[0])
        np.testing.assert_array_equal(score, want[1])
    order = np.lexsort((want[0], -want[1] if metric == "cosine" else want[1]), axis=-1)
    np.testing.assert_array_equal(order, np.broadcast_to(np.arange(9), order.shape))  # (score, index) order


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
def test_ivf_scans_as_many_lists_as_the_target_recall_needs(metric, caplog):
    """With ``nprobe`` left to it, an IVF search raises the lists it scans until its sample of
    queries (here all of them) reaches the target recall; a fixed single list falls short."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(40, 16)) * 5
    refs = (centres[rng.integers(0, 40, 20000)] + rng.normal(size=(20000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 40, 100)] + rng.normal(size=(100, 16))).astype(np.float32)
    exact, _ = knn.search(queries, refs, 7, metric, backend="faiss")
    one_list, _ = knn.search(queries, refs, 7, metric, backend="faiss-ivf", nprobe=1)
    with caplog.at_level(logging.INFO, logger="hgc.graph.knn"):
        approx, _ = knn.search(queries, refs, 7, metric, backend="faiss-ivf")
    assert knn.recall_at_k(exact, exact) == 1.0
    assert knn.recall_at_k(one_list, exact) < knn.IVF_TARGET_RECALL
    assert knn.recall_at_k(approx, exact) >= knn.IVF_TARGET_RECALL
    # how many lists that takes depends on the k-means lists (BLAS rounding): at least the first 16
    assert " of 141 lists scanned per query" in caplog.text and "100 queries searched exactly too" in caplog.text
    assert "which is done instead" not in caplog.text


@pytest.mark.parametrize("metric", METRICS)
def test_ivf_that_cannot_reach_the_recall_cheaply_searches_exactly(metric, caplog):
    """Unclustered data (no structure for the lists to follow) would need most lists scanned: the
    search says so and returns the exact neighbours instead."""
    rng = np.random.default_rng(5)
    refs, queries = rng.normal(size=(20000, 64)).astype(np.float32), rng.normal(size=(50, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="hgc.graph.knn"):
        approx = knn.search(queries, refs, 7, metric, backend="faiss-ivf")
    exact = knn.search(queries, refs, 7, metric, backend="faiss")
    np.testing.assert_array_equal(approx[0], exact[0])
    np.testing.assert_array_equal(approx[1], exact[1])
    assert "which is done instead" in caplog.text


@pytest.mark.parametrize("metric", ["l1", "cosine"])
def test_ivf_doubles_the_lists_it_scans_on_a_sample_of_its_queries(metric, monkeypatch, caplog):
    """Starting from one list, the search doubles the lists scanned (for L1 also the L2 candidates it
    re-ranks) until its sample of 128 of the 300 queries reaches the target recall; a fixed
    ``nprobe`` is kept as given and its recall still logged."""
    monkeypatch.setattr(knn, "IVF_FIRST_NPROBE", 1)
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(40, 16)) * 5
    refs = (centres[rng.integers(0, 40, 20000)] + rng.normal(size=(20000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 40, 300)] + rng.normal(size=(300, 16))).astype(np.float32)
    exact, _ = knn.search(queries, refs, 7, metric, backend="faiss")
    with caplog.at_level(logging.INFO, logger="hgc.graph.knn"):
        approx, _ = knn.search(queries, refs, 7, metric, backend="faiss-ivf")
    line = next(x for x in caplog.text.splitlines() if "lists scanned per query" in x)
    scanned = int(line.split(" of 141 lists")[0].rsplit(" ", 1)[1])
    assert scanned in (2, 4, 8, 16, 32) and "on 128 queries searched exactly too" in line
    assert float(line.split("recall@7 ")[1].split(" ")[0]) >= knn.IVF_TARGET_RECALL
    assert f"({32 * scanned if metric == 'l1' else 32} candidates)" in line  # L1's grow with the lists
    assert knn.recall_at_k(approx, exact) > 0.9  # the queries outside the sample alike
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc.graph.knn"):
        knn.search(queries, refs, 7, metric, backend="faiss-ivf", nprobe=3)
    assert "3 of 141 lists scanned per query (32 candidates)" in caplog.text
