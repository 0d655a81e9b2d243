"""Exact (and optionally approximate) k-nearest-neighbour search between embedding sets.

One entry point, :func:`search`, with interchangeable backends that return the same neighbours:

- ``faiss``: exact flat indices (``IndexFlat`` with ``METRIC_L1`` / ``METRIC_L2`` /
  ``METRIC_INNER_PRODUCT`` on L2-normalised vectors for cosine), on GPU when the installed faiss
  has GPU support and ``device`` is CUDA;
- ``faiss-ivf``: an approximate inverted-file index for pools of millions of spots; measure its
  recall against exact search with :func:`recall_at_k` before trusting it;
- ``torch``: exact, chunked over queries and references so memory stays bounded, CPU or CUDA.
  It is the reference implementation and the fallback when faiss is not installed;
- ``auto``: faiss when importable (and, for a CUDA ``device``, built with GPU support), else torch.

Conventions every backend follows:

- scores are distances for ``l1`` / ``l2`` (ascending; ``l2`` is the Euclidean distance, not its
  square) and cosine similarities for ``cosine`` (descending);
- ties: among equal scores the lower reference index comes first. Faiss does not promise this,
  so its results are re-sorted, and rows where a tie straddles the k-th place are recomputed
  with the exact torch search;
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
BACKENDS = ("auto", "faiss", "faiss-ivf", "torch")


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
    nprobe: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest ``refs`` of each query row: (indices (q, k) int64, scores (q, k) float32).

    ``chunk_size`` x ``ref_chunk_size`` bounds the torch backend's score matrix (64 MiB by
    default). ``nlist`` / ``nprobe`` configure ``faiss-ivf`` (defaults: about 4 sqrt(pool) lists).
    """
    if metric not in METRICS:
        raise InputError(f"unknown similarity metric '{metric}'; expected one of {list(METRICS)}")
    if backend not in BACKENDS:
        raise InputError(f"unknown kNN backend '{backend}'; expected one of {list(BACKENDS)}")
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
        idx, key = np.zeros((0, kk), np.int64), np.zeros((0, kk), np.float32)
    else:
        backend = resolve_backend(backend, device)
        if backend == "torch":
            idx, key = _torch_search(q, r, kk, metric, device, chunk_size, ref_chunk_size)
        else:
            idx, key = _faiss_search(q, r, kk, metric, device, backend == "faiss-ivf", nlist, nprobe,
                                     chunk_size, ref_chunk_size)
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


def _finish(idx: np.ndarray, key: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn internal keys (smaller is better) into scores and pad to ``k`` columns."""
    if metric == "cosine":
        scores = -key
    elif metric == "l2":
        scores = np.sqrt(np.maximum(key, 0))
    else:
        scores = key
    scores = scores.astype(np.float32)
    pad_score = -np.inf if metric == "cosine" else np.inf
    scores[idx < 0] = pad_score
    if idx.shape[1] < k:
        extra = k - idx.shape[1]
        idx = np.concatenate([idx, np.full((idx.shape[0], extra), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((scores.shape[0], extra), pad_score, np.float32)], axis=1)
    return idx.astype(np.int64), scores


# --- torch: the exact reference -------------------------------------------------------------

def _torch_device(device: str):
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available")
    return dev


def _torch_key(q, r, r_sq, metric: str):
    """(q, r) matrix where smaller is better: L1, squared L2 (GEMM form, like faiss) or -cosine."""
    import torch

    if metric == "l1":
        return torch.cdist(q, r, p=1)
    if metric == "l2":
        return ((q * q).sum(1, keepdim=True) + r_sq[None, :] - 2.0 * (q @ r.T)).clamp_min_(0)
    return -(q @ r.T)


def _lexsort_topk(key, idx, k: int):
    """First ``k`` of each row ordered by (key, index): the tie rule, via two stable sorts."""
    import torch

    order = torch.argsort(idx, dim=1, stable=True)
    key, idx = key.gather(1, order), idx.gather(1, order)
    order = torch.argsort(key, dim=1, stable=True)[:, :k]
    return key.gather(1, order), idx.gather(1, order)


def _topk_ties_low(key, k: int):
    """``topk`` of each row (smallest), where ties at the k-th place go to the lowest column."""
    import torch

    val, col = torch.topk(key, k, dim=1, largest=False, sorted=True)
    kth = val[:, -1:]
    rows = torch.nonzero((key == kth).sum(1) > (val == kth).sum(1)).ravel()
    if rows.numel():  # a tie straddles place k: take the lowest columns among the tied values
        sub, t = key[rows], kth[rows]
        cols = torch.arange(key.shape[1], device=key.device).expand_as(sub)
        big = torch.full_like(cols, key.shape[1])
        tie_col = torch.topk(torch.where(sub == t, cols, big), k, dim=1, largest=False).values
        inf = torch.full_like(val[rows], math.inf)
        tie_key = torch.where(tie_col < key.shape[1], t.expand_as(inf), inf)
        better = val[rows] < t
        cand_key = torch.cat([torch.where(better, val[rows], inf), tie_key], dim=1)
        cand_col = torch.cat([col[rows], tie_col.clamp_max(key.shape[1] - 1)], dim=1)
        val[rows], col[rows] = _lexsort_topk(cand_key, cand_col, k)
    return val, col


def _torch_search(q, r, k, metric, device, chunk_size, ref_chunk_size):
    import torch

    dev = _torch_device(device)
    with torch.no_grad():
        refs = torch.from_numpy(r).to(dev)
        r_sq = (refs * refs).sum(1) if metric == "l2" else None
        out_key, out_idx = [], []
        for q0 in range(0, q.shape[0], chunk_size):
            qc = torch.from_numpy(q[q0:q0 + chunk_size]).to(dev)
            best_key = best_idx = None
            for r0 in range(0, refs.shape[0], ref_chunk_size):
                rc = refs[r0:r0 + ref_chunk_size]
                key = _torch_key(qc, rc, r_sq[r0:r0 + ref_chunk_size] if r_sq is not None else None, metric)
                val, col = _topk_ties_low(key, min(k, rc.shape[0]))
                col = col + r0
                if best_key is None:
                    best_key, best_idx = val, col
                else:  # earlier chunks hold lower indices: lexsort keeps the tie rule across chunks
                    best_key, best_idx = _lexsort_topk(torch.cat([best_key, val], 1),
                                                       torch.cat([best_idx, col], 1), k)
            best_key, best_idx = _lexsort_topk(best_key, best_idx, k)  # topk's order among ties is arbitrary
            out_key.append(best_key.cpu().numpy())
            out_idx.append(best_idx.cpu().numpy())
    return np.concatenate(out_idx).astype(np.int64), np.concatenate(out_key).astype(np.float32)


# --- faiss ----------------------------------------------------------------------------------

def _faiss_index(faiss, r: np.ndarray, metric: str, ivf: bool, nlist: int | None, nprobe: int):
    d = r.shape[1]
    mt = {"l1": faiss.METRIC_L1, "l2": faiss.METRIC_L2, "cosine": faiss.METRIC_INNER_PRODUCT}[metric]
    if not ivf:
        return faiss.IndexFlat(d, mt)
    # faiss IVF scans only L2 / inner product (L1 aborts the process); l1 is served by L2
    # candidates re-ranked exactly, see _faiss_search.
    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    m = r.shape[0]
    nlist = nlist or max(1, min(int(4 * math.sqrt(m)), m // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlat(d, mt), d, nlist, mt)  # wrapper keeps the quantizer alive
    sample = r if m <= 256 * nlist else r[np.sort(np.random.default_rng(0).choice(m, 256 * nlist, replace=False))]
    index.cp.seed = 0
    index.train(sample)
    index.nprobe = min(nprobe, nlist)
    return index


def _l1_rerank(q: np.ndarray, r: np.ndarray, cand: np.ndarray, k: int, chunk_size: int):
    """Exact L1 among each query's candidate references (``-1`` = none), best ``k`` by the tie rule."""
    key = np.full(cand.shape, np.inf, np.float32)
    for q0 in range(0, q.shape[0], chunk_size):
        c = cand[q0:q0 + chunk_size]
        diff = np.abs(q[q0:q0 + chunk_size, None, :] - r[np.maximum(c, 0)])
        key[q0:q0 + chunk_size] = np.where(c >= 0, diff.sum(axis=2), np.inf)
    order = np.lexsort((np.where(cand >= 0, cand, np.iinfo(np.int64).max), key), axis=-1)[:, :k]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(key, order, 1)


def _faiss_search(q, r, k, metric, device, ivf, nlist, nprobe, chunk_size, ref_chunk_size):
    faiss = require("faiss", "similarity search with the faiss backend")
    index = _faiss_index(faiss, r, metric, ivf, nlist, nprobe)
    if str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
        dev_id = int(str(device).partition(":")[2] or 0)
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev_id, index)
    index.add(r)
    if ivf and metric == "l1":
        _, cand = index.search(q, min(r.shape[0], max(4 * k, 32)))
        return _l1_rerank(q, r, cand, k, chunk_size)
    extra = 0 if ivf else int(k < r.shape[0])  # one more column reveals a tie at place k
    dist, idx = index.search(q, k + extra)
    key = (-dist if metric == "cosine" else dist).astype(np.float32)
    key[idx < 0] = np.inf
    if not ivf:
        if extra:
            ties = np.flatnonzero(key[:, k - 1] == key[:, k])
            key, idx = key[:, :k], idx[:, :k]
            if ties.size:
                log.debug("faiss: %d queries tie at place %d; recomputing them exactly", ties.size, k)
                idx[ties], key[ties] = _torch_search(q[ties], r, k, metric, "cpu", chunk_size, ref_chunk_size)
        order = np.lexsort((idx, key), axis=-1)
        idx, key = np.take_along_axis(idx, order, 1), np.take_along_axis(key, order, 1)
    return idx.astype(np.int64), key
