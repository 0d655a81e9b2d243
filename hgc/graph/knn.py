"""Exact (and optionally approximate) k-nearest-neighbour search between embedding sets.

One entry point, :func:`search`, with interchangeable backends that return the same neighbours:

- ``faiss``: exact flat indices (``IndexFlat`` with ``METRIC_L1`` / ``METRIC_L2`` /
  ``METRIC_INNER_PRODUCT`` on L2-normalised vectors for cosine), on GPU when the installed faiss
  has GPU support and ``device`` is CUDA;
- ``faiss-ivf``: an approximate inverted-file index for pools of millions of spots. Each search
  checks itself: a sample of its queries is also searched exactly, and the number of lists
  scanned (``nprobe``) is doubled until the sample's recall@k reaches :data:`IVF_TARGET_RECALL`;
  where that would scan more than a quarter of the lists, the search is exact instead. The
  recall reached is logged. :func:`recall_at_k` measures it against exact search on any set of
  queries;
- ``torch``: exact, chunked over queries and references so memory stays bounded, CPU or CUDA.
  It is the reference implementation and the fallback when faiss is not installed;
- ``auto``: faiss when importable (and, for a CUDA ``device``, built with GPU support), else torch.

Conventions every backend follows:

- scores are distances for ``l1`` / ``l2`` (ascending; ``l2`` is the Euclidean distance, not its
  square) and cosine similarities for ``cosine`` (descending);
- **one ranking rule on every machine.** The fast float32 kernels (faiss, torch, matrix products
  whose last bit depends on the BLAS kernel a CPU picks) only *propose* candidates. Every
  candidate is re-scored in float64 directly from the coordinate differences (no matrix-product
  form), the score is rounded to float32 (the value returned), and neighbours are ordered by
  (returned score, reference index): equal scores -- identical vectors always -- go to the lower
  reference index. A query whose fast candidates might miss a neighbour because of float32
  rounding (its k-th score is too close to the last candidate's) is searched again with more
  candidates, and at worst exactly over the whole pool;
- ``k`` larger than the pool: all pool items, then padding with index ``-1`` and the worst
  possible score (``inf`` for distances, ``-inf`` for cosine), so sorted order still holds;
- an empty pool, non-finite embeddings (rows named) or all-zero vectors under cosine are an
  :class:`~hgc.errors.InputError`.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .._optional import available, require
from ..errors import InputError

log = logging.getLogger(__name__)

METRICS = ("l1", "l2", "cosine")
KNN_BACKENDS = ("auto", "faiss", "faiss-ivf", "torch")


#: float32 machine epsilon: the fast kernels' unit of rounding.
_EPS32 = float(np.finfo(np.float32).eps)
#: Relative width of two float32 roundings: the margin around the k-th score of a complete row.
_REL_ROUND = 2.0 * _EPS32
#: Candidates per query beyond k that the fast kernel proposes at first (x4 per retry).
_EXTRA_CANDIDATES = 8
#: Retries with more candidates stop here; rows still undecided are searched exactly.
_MAX_CANDIDATES = 1024
#: float64 elements per block of exact re-scoring (32 MiB).
_RESCORE_BLOCK = 1 << 22
#: ``faiss-ivf``: the recall@k each search reaches on its sample of queries searched exactly too.
IVF_TARGET_RECALL = 0.95
#: ``faiss-ivf``: lists scanned per query at first (doubled until the sample's recall is reached).
IVF_FIRST_NPROBE = 16
#: ``faiss-ivf``: queries per search that are also searched exactly, to measure the recall.
_IVF_CHECK_QUERIES = 128
#: ``faiss-ivf``: k-means training points per list (faiss warns under 39).
_IVF_TRAIN_PER_LIST = 64
#: ``faiss-ivf``: queries searched and ranked at once (bounds the (queries x candidates) arrays).
_IVF_QUERY_CHUNK = 65536


def search(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int,
    metric: str = "l1",
    backend: str = "auto",
    device: str = "cpu",
    chunk_size: int = 1024,
    ref_chunk_size: int = 16384,
    nlist: int | None = None,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest ``refs`` of each query row: (indices (q, k) int64, scores (q, k) float32).

    ``chunk_size`` x ``ref_chunk_size`` bounds the torch backend's score matrix (64 MiB by
    default). ``nlist`` / ``nprobe`` configure ``faiss-ivf``: about sqrt(pool) lists by default,
    and ``nprobe`` None scans as many as the target recall needs (a number fixes it; the recall
    reached is logged either way).
    """
    if metric not in METRICS:
        raise InputError(f"unknown similarity metric '{metric}'; expected one of {list(METRICS)}")
    if backend not in KNN_BACKENDS:
        raise InputError(f"unknown kNN backend '{backend}'; expected one of {list(KNN_BACKENDS)}")
    if int(k) < 1:
        raise InputError(f"k must be at least 1, got {k}")
    k = int(k)
    q = _as_matrix(queries, "queries", metric)
    r = _as_matrix(refs, "references", metric)
    if r.shape[0] == 0:
        raise InputError("the reference pool is empty: nothing to search")
    if q.shape[1] != r.shape[1]:
        raise InputError(f"queries have {q.shape[1]} features but references have {r.shape[1]}")
    kk = min(k, r.shape[0])
    if q.shape[0] == 0:
        idx, key = np.zeros((0, kk), np.int64), np.zeros((0, kk), np.float64)
    else:
        backend = resolve_backend(backend, device)
        if backend == "faiss-ivf":
            idx, key = _ivf_search(q, r, kk, metric, device, nlist, nprobe)
        else:
            def candidates(rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
                if backend == "torch":
                    return _torch_candidates(q[rows], r, m, metric, device, chunk_size, ref_chunk_size)
                return _faiss_candidates(q[rows], r, m, metric, device)

            idx, key = _exact_search(q, r, kk, metric, candidates)
    return _finish(idx, key, k, metric)


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """The backend ``auto`` stands for on this machine and ``device``."""
    if backend != "auto":
        if backend.startswith("faiss"):
            require("faiss", "similarity search with the faiss backend")
        return backend
    if not available("faiss"):
        return "torch"
    if str(device).startswith("cuda"):
        import faiss

        return "faiss" if hasattr(faiss, "StandardGpuResources") else "torch"
    return "faiss"


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact neighbours (ignoring ``-1`` padding) that ``approx`` found."""
    if approx.shape[0] != exact.shape[0]:
        raise InputError(f"recall needs the same queries: {approx.shape[0]} vs {exact.shape[0]} rows")
    if exact.size == 0:
        return 1.0
    hits = (exact[:, :, None] == approx[:, None, :]).any(axis=2) & (exact >= 0)
    wanted = (exact >= 0).sum(axis=1)
    return float(np.mean(hits.sum(axis=1) / np.maximum(wanted, 1)))


def _as_matrix(x: np.ndarray, what: str, metric: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{what} must be a 2-D matrix (rows x features), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"{what} rows {bad[:10].tolist()}{' ...' if bad.size > 10 else ''} "
                         f"({bad.size} in all) contain NaN or infinite values")
    if metric == "cosine" and x.shape[0]:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        zero = np.flatnonzero(norm[:, 0] == 0)
        if zero.size:
            raise InputError(f"{what} rows {zero[:10].tolist()} are all-zero vectors: "
                             "cosine similarity is undefined for them")
        x = x / norm
    return x


def _scores(key: np.ndarray, metric: str) -> np.ndarray:
    """Returned float32 scores of internal float64 keys (smaller key is better)."""
    if metric == "cosine":
        return (-key).astype(np.float32)
    if metric == "l2":
        return np.sqrt(np.maximum(key, 0)).astype(np.float32)
    return key.astype(np.float32)


def _finish(idx: np.ndarray, key: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn internal keys into scores and pad to ``k`` columns."""
    scores = _scores(key, metric)
    pad_score = -np.inf if metric == "cosine" else np.inf
    scores[idx < 0] = pad_score
    if idx.shape[1] < k:
        extra = k - idx.shape[1]
        idx = np.concatenate([idx, np.full((idx.shape[0], extra), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((scores.shape[0], extra), pad_score, np.float32)], axis=1)
    return idx.astype(np.int64), scores


# --- the ranking rule: exact float64 re-scoring, float32 scores, ties to the lower index -------------

def exact_keys(q: np.ndarray, r: np.ndarray, cand: np.ndarray, metric: str) -> np.ndarray:
    """float64 keys (smaller is better) of each query against its candidate rows of ``r``.

    L1 and squared L2 come from the coordinate differences and cosine from the elementwise
    products, summed by NumPy in a fixed order, never from a matrix product: the result for a
    (query, reference) pair does not depend on the other candidates, the BLAS library or the CPU.
    ``cand`` entries of ``-1`` get ``inf``.
    """
    cand = np.asarray(cand, dtype=np.int64)
    out = np.full(cand.shape, np.inf)
    width = max(1, cand.shape[1] * q.shape[1])
    step = max(1, _RESCORE_BLOCK // width)
    for q0 in range(0, cand.shape[0], step):
        c = cand[q0:q0 + step]
        qq = q[q0:q0 + step, None, :].astype(np.float64)
        rr = r[np.maximum(c, 0)].astype(np.float64)
        if metric == "l1":
            key = np.abs(qq - rr).sum(axis=2)
        elif metric == "l2":
            diff = qq - rr
            key = (diff * diff).sum(axis=2)
        else:
            key = -(qq * rr).sum(axis=2)
        out[q0:q0 + step] = np.where(c >= 0, key, np.inf)
    return out


def rank_candidates(q: np.ndarray, r: np.ndarray, cand: np.ndarray, k: int, metric: str,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` candidates of each query by the ranking rule: (indices, float64 keys).

    Candidates are ordered by their returned (float32) score, then by reference index; ``-1``
    entries (no candidate) sort last.
    """
    key = exact_keys(q, r, cand, metric)
    score = _scores(key, metric).astype(np.float64)
    order_key = -score if metric == "cosine" else score
    order_key[cand < 0] = np.inf
    index_key = np.where(cand >= 0, cand, np.iinfo(np.int64).max)
    order = np.lexsort((index_key, order_key), axis=-1)[:, :k]
    return np.take_along_axis(cand, order, 1).astype(np.int64), np.take_along_axis(key, order, 1)


def _fast_error(q: np.ndarray, r: np.ndarray, fast_last: np.ndarray, metric: str) -> np.ndarray:
    """A bound on the float32 kernels' rounding error of a key near ``fast_last``, per query.

    Summing ``d`` terms in float32 errs by at most about ``d`` units of rounding of the terms'
    total magnitude: the distance itself for L1, ``|q|^2 + |r|^2`` for squared L2 in its matrix
    product form, the unit vectors' norms for cosine. The bound is doubled for safety.
    """
    d = q.shape[1] + 2
    if metric == "l1":
        magnitude = np.abs(fast_last)
    elif metric == "l2":
        magnitude = (q.astype(np.float64) ** 2).sum(1) + float((r.astype(np.float64) ** 2).sum(1).max())
    else:
        magnitude = np.full(len(q), 2.0)
    return 2.0 * d * _EPS32 * magnitude


def _margin(kth_key: np.ndarray, metric: str) -> np.ndarray:
    """How far above the k-th exact key a reference could still round to the k-th returned score.

    Squared L2 keys need twice the relative width: the returned score is their square root.
    """
    width = (2 if metric == "l2" else 1) * _REL_ROUND
    return width * np.maximum(np.abs(kth_key), 1.0 if metric == "cosine" else 0.0)


def _complete(q, r, cand_fast_last, kth_key, metric) -> np.ndarray:
    """Rows whose candidates provably hold every reference that could rank in the top k.

    A reference the fast kernel did not propose has a fast key >= the last candidate's, so an
    exact key of at least ``fast_last - error``; if that exceeds the k-th exact key by more than
    the rounding of the returned score, it cannot tie with or beat the k-th neighbour.
    """
    err = _fast_error(q, r, cand_fast_last, metric)
    return cand_fast_last - err > kth_key + _margin(kth_key, metric)


def _exact_search(q, r, k, metric, candidates) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of every query by the ranking rule, from fast candidates completed where needed."""
    n = r.shape[0]
    idx = np.empty((len(q), k), np.int64)
    key = np.empty((len(q), k), np.float64)
    rows = np.arange(len(q))
    m = min(n, k + max(_EXTRA_CANDIDATES, k))
    while rows.size:
        cand, fast_last = candidates(rows, m)
        ci, ck = rank_candidates(q[rows], r, cand, k, metric)
        done = np.ones(len(rows), bool) if m >= n else _complete(q[rows], r, fast_last, ck[:, -1], metric)
        idx[rows[done]], key[rows[done]] = ci[done], ck[done]
        rows = rows[~done]
        if rows.size and 4 * m > _MAX_CANDIDATES and m < n:
            log.debug("knn: %d queries with near ties at place %d; searching them exactly", rows.size, k)
            undecided = ~done
            idx[rows], key[rows] = _exhaustive(q[rows], r, k, metric, ck[undecided, -1])
            break
        if rows.size:
            log.debug("knn: %d queries need more than %d candidates", rows.size, m)
            m = min(n, 4 * m)
    return idx, key


def _exhaustive(q: np.ndarray, r: np.ndarray, k: int, metric: str, kth_key: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ranking rule for queries whose top k the fast candidates could not decide (many ties).

    ``kth_key`` is each query's k-th exact key among candidates already ranked: the true k-th is
    no larger, so every reference that can rank in the top k has a fast key below ``kth_key`` plus
    the rounding margin and the fast kernel's error bound. One fast pass over the pool keeps those
    (however many tie) and only they are re-scored exactly.
    """
    import torch

    bound = kth_key + _margin(kth_key, metric)
    bound = bound + _fast_error(q, r, bound, metric)
    keep: list[list[np.ndarray]] = [[] for _ in range(len(q))]
    with torch.no_grad():
        qt = torch.from_numpy(q)
        for r0 in range(0, r.shape[0], 16384):
            rc = torch.from_numpy(r[r0:r0 + 16384])
            r_sq = (rc * rc).sum(1) if metric == "l2" else None
            fast = _torch_key(qt, rc, r_sq, metric).double().numpy()
            rows, cols = np.nonzero(fast <= bound[:, None])
            for i in np.unique(rows):
                keep[i].append(cols[rows == i] + r0)
    width = max(k, max((sum(len(c) for c in cs) for cs in keep), default=k))
    cand = np.full((len(q), width), -1, np.int64)
    for i, cs in enumerate(keep):
        found = np.concatenate(cs) if cs else np.zeros(0, np.int64)
        cand[i, :len(found)] = found
    return rank_candidates(q, r, cand, k, metric)


# --- torch: fast candidates on any device ------------------------------------------------------

def _torch_key(q, r, r_sq, metric: str):
    """(q, r) matrix where smaller is better: L1, squared L2 (GEMM form, like faiss) or -cosine."""
    import torch

    if metric == "l1":
        return torch.cdist(q, r, p=1)
    if metric == "l2":
        return ((q * q).sum(1, keepdim=True) + r_sq[None, :] - 2.0 * (q @ r.T)).clamp_min_(0)
    return -(q @ r.T)


def _torch_candidates(q, r, m, metric, device, chunk_size, ref_chunk_size):
    """The ``m`` smallest float32 keys of each query: (reference indices, the largest key kept)."""
    import torch

    from .._devices import resolve_device

    dev = resolve_device(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 rounding is what the error bound assumes
    try:
        with torch.no_grad():
            refs = torch.from_numpy(r).to(dev)
            r_sq = (refs * refs).sum(1) if metric == "l2" else None
            out_idx, out_last = [], []
            for q0 in range(0, q.shape[0], chunk_size):
                qc = torch.from_numpy(q[q0:q0 + chunk_size]).to(dev)
                best_key = best_idx = None
                for r0 in range(0, refs.shape[0], ref_chunk_size):
                    rc = refs[r0:r0 + ref_chunk_size]
                    key = _torch_key(qc, rc, r_sq[r0:r0 + ref_chunk_size] if r_sq is not None else None, metric)
                    val, col = torch.topk(key, min(m, rc.shape[0]), dim=1, largest=False)
                    col = col + r0
                    if best_key is not None:
                        val, col = torch.cat([best_key, val], 1), torch.cat([best_idx, col], 1)
                        val, pick = torch.topk(val, min(m, val.shape[1]), dim=1, largest=False)
                        col = col.gather(1, pick)
                    best_key, best_idx = val, col
                out_idx.append(best_idx.cpu().numpy())
                out_last.append(best_key.max(dim=1).values.double().cpu().numpy())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return np.concatenate(out_idx).astype(np.int64), np.concatenate(out_last)


# --- faiss ----------------------------------------------------------------------------------

def _faiss_metric(faiss, metric: str, ivf: bool):
    if metric == "cosine":
        return faiss.METRIC_INNER_PRODUCT
    # faiss IVF scans only L2 / inner product (L1 aborts the process): l1 is served by L2
    # candidates, which the ranking rule then scores exactly.
    return faiss.METRIC_L2 if ivf or metric == "l2" else faiss.METRIC_L1


def _on_device(faiss, index, device: str):
    """``index`` moved to the CUDA ``device`` when faiss has GPU support, else itself."""
    if str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
        dev_id = int(str(device).partition(":")[2] or 0)
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev_id, index)
    return index


def _keys(dist: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """faiss's float32 scores as keys (smaller is better); missing results are ``-inf``."""
    key = (-dist if metric == "cosine" else dist).astype(np.float64)
    key[idx < 0] = -np.inf
    return key


def _flat_index(faiss, r: np.ndarray, metric: str):
    """An exact (brute-force) index for ``r``'s dimension and ``metric``, still empty."""
    return faiss.IndexFlat(r.shape[1], _faiss_metric(faiss, metric, False))


def _faiss_candidates(q, r, m, metric, device):
    """An exact flat index's ``m`` best references of each query: (indices, the largest float32 key kept)."""
    faiss = require("faiss", "similarity search with the faiss backend")
    index = _on_device(faiss, _flat_index(faiss, r, metric), device)
    index.add(r)
    dist, idx = index.search(q, m)
    return idx.astype(np.int64), _keys(dist, idx, metric).max(axis=1)


def _ivf_index(faiss, r: np.ndarray, metric: str, nlist: int | None):
    """An inverted-file index over ``r``, trained (k-means, seeded) on a sample of 64 points per list.

    The default of about sqrt(pool) lists keeps k-means affordable on a CPU (1M references: 1,000
    lists trained on 64,000 points in about a minute on one core, where faiss's rule of thumb of
    4 sqrt(pool) lists on all points would take hours); the recall check then sets how many lists
    a query scans.
    """
    d, n = r.shape[1], r.shape[0]
    mt = _faiss_metric(faiss, metric, True)
    nlist = nlist or max(1, min(round(math.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlat(d, mt), d, nlist, mt)  # wrapper keeps the quantizer alive
    size = _IVF_TRAIN_PER_LIST * nlist
    sample = r if n <= size else r[np.sort(np.random.default_rng(0).choice(n, size, replace=False))]
    index.cp.seed = 0
    index.train(sample)
    return index


def _ivf_search(q, r, k, metric, device, nlist, nprobe) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top ``k`` (ranking rule over IVF candidates), checked on a seeded sample of the
    queries that is also searched exactly.

    With ``nprobe`` unset, the lists scanned double (and, for L1, whose candidates come from L2
    distances, the candidates kept too) until the sample reaches :data:`IVF_TARGET_RECALL`; a
    search that would have to scan more than a quarter of the lists to get there costs about as
    much as exact search, which is then done instead (logged as a warning).
    """
    faiss = require("faiss", "similarity search with the faiss backend")
    ivf = _ivf_index(faiss, r, metric, nlist)
    ivf.add(r)
    index = _on_device(faiss, ivf, device)
    space = faiss.ParameterSpace() if index is ivf else faiss.GpuParameterSpace()
    n = r.shape[0]

    def ranked(qs: np.ndarray, probes: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        space.set_index_parameter(index, "nprobe", probes)
        parts = []
        for q0 in range(0, len(qs), _IVF_QUERY_CHUNK):
            chunk = qs[q0:q0 + _IVF_QUERY_CHUNK]
            _, cand = index.search(chunk, m)
            parts.append(rank_candidates(chunk, r, cand.astype(np.int64), k, metric))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def exact(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _exact_search(qs, r, k, metric, lambda rows, mm: _faiss_candidates(qs[rows], r, mm, metric, device))

    sample = q
    if len(q) > _IVF_CHECK_QUERIES:
        sample = q[np.sort(np.random.default_rng(0).choice(len(q), _IVF_CHECK_QUERIES, replace=False))]
    truth = exact(sample)[0]
    probes, m = min(ivf.nlist, nprobe or IVF_FIRST_NPROBE), min(n, max(4 * k, 32))
    while True:
        recall = recall_at_k(ranked(sample, probes, m)[0], truth)
        if nprobe or recall >= IVF_TARGET_RECALL:
            break
        if 2 * probes > ivf.nlist / 4:
            log.warning("knn: faiss-ivf over %d references reached recall@%d %.3f with %d of %d lists scanned "
                        "per query (%d candidates); a higher recall costs about what exact search does, which "
                        "is done instead%s", n, k, recall, probes, ivf.nlist, m,
                        " (cosine, searched natively by the index, needs fewer lists: --metric cosine)"
                        if metric == "l1" else "")
            return exact(q)
        probes = 2 * probes
        m = max(m, min(n, _MAX_CANDIDATES, 2 * m)) if metric == "l1" else m
    log.info("knn: faiss-ivf over %d references, %d of %d lists scanned per query (%d candidates): recall@%d %.3f "
             "on %d queries searched exactly too", n, probes, ivf.nlist, m, k, recall, len(sample))
    return ranked(q, probes, m)
