"""The edge builders, one per relation of the table (:data:`hgc.graph.record.RELATIONS`): ``near``
from spot positions, ``refer`` and ``close`` from similarity search (see :mod:`hgc.graph.build` for
what each relation means and how weights are made). A new relation's builder goes here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.slide import SPOT_PITCH_UM, Slide
from ..errors import InputError
from . import knn
from .fold import GraphConfig

_GRID_OFFSETS = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy])
_HEX_OFFSETS = np.array([(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)])


def near_edges(slide: Slide, config: GraphConfig) -> tuple[np.ndarray, np.ndarray]:
    """Spatial ``near`` edges (2, E) [neighbour, spot] and unit weights."""
    mode = config.near
    if mode == "auto":
        known = slide.array_coords is not None
        mode = "grid" if known and slide.platform == "st" else "hex" if known and slide.platform == "visium" else "radius"
    if mode == "radius":
        src, dst = _radius_pairs(slide, config.near_radius_um)
    else:
        if slide.array_coords is None:
            raise InputError(f"slide {slide.id}: near mode '{mode}' needs array (grid) coordinates")
        offsets, cap = (_GRID_OFFSETS, config.near_max) if mode == "grid" else (_HEX_OFFSETS, len(_HEX_OFFSETS))
        src, dst = _grid_pairs(slide, offsets, cap)
    edges = np.stack([src, dst]).astype(np.int64)
    return edges, np.ones(edges.shape[1], np.float32)


def _grid_pairs(slide: Slide, offsets: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours at ``offsets`` on the array grid, the ``cap`` nearest in pixels per spot."""
    ac = np.asarray(slide.array_coords, dtype=np.int64)
    ac = ac - ac.min(axis=0) + 2  # room for offsets of +-2 without negative keys
    width = int(ac[:, 1].max()) + 3
    key = ac[:, 0] * width + ac[:, 1]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    if np.any(sorted_key[1:] == sorted_key[:-1]):
        raise InputError(f"slide {slide.id}: two spots share the same array (grid) coordinates")
    nkey = (ac[:, None, 0] + offsets[None, :, 0]) * width + ac[:, None, 1] + offsets[None, :, 1]
    pos = np.clip(np.searchsorted(sorted_key, nkey), 0, len(key) - 1)
    nbr = np.where(sorted_key[pos] == nkey, order[pos], -1)
    dist = np.linalg.norm(slide.coords[np.maximum(nbr, 0)] - slide.coords[:, None, :], axis=2)
    dist = np.where(nbr >= 0, dist, np.inf)
    rank = np.lexsort((np.where(nbr >= 0, nbr, len(key)), dist), axis=-1)[:, :cap]
    nbr = np.take_along_axis(nbr, rank, 1)
    spot = np.broadcast_to(np.arange(len(key))[:, None], nbr.shape)
    keep = nbr >= 0
    return nbr[keep], spot[keep]


def _radius_pairs(slide: Slide, radius_um: float | None) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    if radius_um is None:
        if slide.platform not in SPOT_PITCH_UM:
            raise InputError(f"slide {slide.id}: platform '{slide.platform}' has no known spot pitch; "
                             "set near_radius_um (--near-radius-um)")
        radius_um = 1.5 * SPOT_PITCH_UM[slide.platform]
    if not np.isfinite(slide.microns_per_pixel) or slide.microns_per_pixel <= 0:
        raise InputError(f"slide {slide.id}: radius neighbours need microns per pixel")
    pairs = cKDTree(slide.coords * slide.microns_per_pixel).query_pairs(radius_um, output_type="ndarray")
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((src, dst))
    return src[order], dst[order]


def _similarity(scores: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine" or scores.size == 0:
        return scores.astype(np.float32)
    scale = float(np.median(scores))
    return np.exp(-scores / (scale if scale > 0 else 1.0)).astype(np.float32)


def _knn_edges(idx: np.ndarray, scores: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """kNN result (q, k) -> edges (2, E) [neighbour, query] without padding, and weights."""
    dst = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    keep = idx >= 0
    return np.stack([idx[keep], dst[keep]]).astype(np.int64), _similarity(scores[keep], metric)


def refer_edges(spot_x: np.ndarray, ref_x: np.ndarray, config: GraphConfig) -> tuple[np.ndarray, np.ndarray]:
    """``refer`` edges: each spot's ``k_refer`` most similar references, one batched search.

    Parameters
    ----------
    spot_x : (n_spot, d) array
        The target's spot embeddings (queries).
    ref_x : (n_ref, d) array
        The pool's reference embeddings.
    config : GraphConfig
        ``k_refer``, ``metric`` and the search engine and device.

    Returns
    -------
    edges : (2, n_spot * k_refer) int64 array
        Rows [reference, spot], grouped by spot, nearest first.
    weights : (n_spot * k_refer,) float32 array
        Similarities in (0, 1] (cosine itself, else ``exp(-d / median d)``).

    Examples
    --------
    >>> import numpy as np
    >>> from hgc.graph import GraphConfig
    >>> spots = np.array([[0.0, 0.0], [10.0, 10.0]], np.float32)
    >>> refs = np.array([[9.0, 9.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    >>> edges, weights = refer_edges(spots, refs, GraphConfig(k_refer=2, knn_backend="torch"))
    >>> edges.tolist()
    [[1, 2, 0, 2], [0, 0, 1, 1]]
    >>> bool((weights > 0).all() and (weights <= 1).all())
    True
    """
    idx, scores = knn.search(spot_x, ref_x, config.k_refer, config.metric, config.knn_backend, config.device)
    return _knn_edges(idx, scores, config.metric)


def self_refer_edges(spot_x: np.ndarray, near: np.ndarray, config: GraphConfig) -> tuple[np.ndarray, np.ndarray]:
    """``refer`` edges from a slide to itself: each spot's ``k_refer`` most similar other spots,
    leaving out the spot and its ``near`` neighbours, so that retrieval cannot simply return the
    tissue next door (the situation a cross-slide reference is in)."""
    n = len(spot_x)
    banned = np.concatenate([np.arange(n) * (n + 1), near[1] * n + near[0]])  # query * n + candidate
    per_query = np.bincount(near[1], minlength=n).max(initial=0) + 1
    idx, scores = knn.search(spot_x, spot_x, min(n, config.k_refer + per_query), config.metric,
                             config.knn_backend, config.device)
    ok = (idx >= 0) & ~np.isin(np.arange(n)[:, None] * n + idx, banned)
    rank = np.cumsum(ok, axis=1)
    take = ok & (rank <= config.k_refer)
    nbr = np.full((n, config.k_refer), -1, np.int64)
    score = np.zeros((n, config.k_refer), np.float32)
    r, c = np.nonzero(take)
    nbr[r, rank[r, c] - 1] = idx[r, c]
    score[r, rank[r, c] - 1] = scores[r, c]
    return _knn_edges(nbr, score, config.metric)


def close_features(ref_x: np.ndarray, ref_y: np.ndarray, metric: str) -> np.ndarray:
    """[embedding, expression], each block z-scored per column then scaled to mean row norm 1."""
    blocks = []
    for block in (ref_x, ref_y):
        block = np.asarray(block, dtype=np.float64)
        std = block.std(axis=0)
        z = (block - block.mean(axis=0)) / np.where(std > 0, std, 1.0)
        norm = np.abs(z).sum(axis=1) if metric == "l1" else np.linalg.norm(z, axis=1)
        blocks.append(z / (norm.mean() if norm.mean() > 0 else 1.0))
    return np.hstack(blocks).astype(np.float32)


def _search_others(queries: np.ndarray, refs: np.ndarray, self_idx: np.ndarray, config: GraphConfig):
    """``k_close`` nearest ``refs`` of each query, leaving out the query itself (row ``self_idx``)."""
    idx, scores = knn.search(queries, refs, config.k_close + 1, config.metric, config.knn_backend, config.device)
    self_hit = idx == self_idx[:, None]
    self_hit[~self_hit.any(axis=1), -1] = True  # self lost a tie to lower-index duplicates: drop the last
    k = idx.shape[1] - 1
    return idx[~self_hit].reshape(-1, k), scores[~self_hit].reshape(-1, k)


def close_edges(feats: np.ndarray, owner: np.ndarray, pools: Sequence[Sequence[str]], config: GraphConfig,
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``close`` edges (2, E) [neighbour, reference] and weights of each pool, from one search.

    ``feats`` are the close features of all the fold's training references, ``owner`` each row's
    slide; a pool is a set of slides whose rows keep their relative order. One search over all
    rows returns a few extra candidates; a pool keeps each row's first ``k_close`` candidates of
    its own rows, and rows left short (their neighbours were on excluded slides) are searched
    again exactly within the pool. The result equals a separate search per pool, tie rule included.
    """
    k = config.k_close
    n_cand = min(len(feats), 4 * (k + 1))
    cand, cand_score = knn.search(feats, feats, n_cand, config.metric, config.knn_backend, config.device)
    out = []
    for slides in pools:
        rows = np.flatnonzero(np.isin(owner, list(slides)))
        local = np.full(len(feats) + 1, -1)  # index -1 (padding) maps to the last entry: -1
        local[rows] = np.arange(len(rows))
        c = cand[rows]
        ok = (local[c] >= 0) & (c != rows[:, None])
        rank = np.cumsum(ok, axis=1)
        take = ok & (rank <= k)
        nbr = np.full((len(rows), k), -1, np.int64)
        score = np.zeros((len(rows), k), np.float32)
        r, col = np.nonzero(take)
        nbr[r, rank[r, col] - 1] = local[c[r, col]]
        score[r, rank[r, col] - 1] = cand_score[rows][r, col]
        short = np.flatnonzero(take.sum(axis=1) < min(k, len(rows) - 1))
        if short.size:
            nbr[short], score[short] = _search_others(feats[rows[short]], feats[rows], short, config)
        out.append(_knn_edges(nbr, score, config.metric))
    return out


# --- the pipeline ------------------------------------------------------------------------------
