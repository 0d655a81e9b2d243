"""Build SpaHGC's heterogeneous graphs: a target slide joined to a reference bank.

A fold (:class:`BankGraphs`) is the bank of its training slides with its slides as targets; a
trained model's bank takes new slides as targets (:func:`target_graph`). Per fold, in this order,
using the fold's training slides only for anything fitted:

1. the gene panel (:func:`hgc.data.genes.resolve_panel`) and the expression normaliser;
2. for every target (each training slide, then each test slide) its reference pool, from the one
   function that decides pools, :func:`reference_pool`, which raises on any leakage;
3. edges (relation names from :data:`hgc.graph.record.RELATIONS`):

   - ``near`` (spot -> spot): ``grid`` = legacy-ST 8-neighbourhood on the array grid, keeping
     the ``near_max`` (5) nearest by pixel distance; ``hex`` = Visium ring (row, col +- 2),
     (row +- 1, col +- 1); ``radius`` = all spots within ``near_radius_um`` (default 1.5 x the
     platform's spot pitch). ``auto`` picks grid / hex by platform when array coordinates
     exist, else radius. Weight 1.
   - ``refer`` (ref -> spot): each target spot's ``k_refer`` (7) nearest references by image
     embedding (``metric``, L1 by default), one batched search over the whole pool.
   - ``close`` (ref -> ref): each reference's ``k_close`` (3) nearest other references of its
     pool on [embedding, normalised expression]. Both blocks are z-scored per column over the
     fold's training spots, then each block is divided by its mean row norm in the search
     metric, so neither the 1,280-d embedding nor the 250-gene expression dominates the
     distance by its size. One search per fold serves every pool (see :func:`close_edges`).

   ``refer`` / ``close`` weights are similarities: cosine itself, or ``exp(-d / median d)`` over
   the relation's edges of that graph for distances (scale-free, in (0, 1]).

The result keeps each slide's embedding once and each fold's normalised expression once per
slide; a fold's bank and its :class:`SlideGraph` records are assembled on demand (by
:func:`joined_graph`, see :mod:`hgc.graph.store`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data.genes import check_panel_overlap, panel_coverage, resolve_panel
from ..data.normalize import make_normalizer
from ..data.slide import SPOT_PITCH_UM, Slide
from ..data.splits import PROTOCOLS, Fold, make_folds, validation_slides
from ..errors import InputError
from . import knn
from .bank import ReferenceBank
from .record import SlideGraph

log = logging.getLogger(__name__)

NEAR_MODES = ("auto", "grid", "hex", "radius")
_GRID_OFFSETS = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy])
_HEX_OFFSETS = np.array([(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)])


@dataclass
class GraphConfig:
    """Every setting of graph construction; stored as JSON with the graphs (SpaHGC defaults)."""

    genes: str = "top-mean:250"
    normalize: str = "log1p"
    near: str = "auto"
    near_max: int = 5
    near_radius_um: float | None = None
    k_refer: int = 7
    k_close: int = 3
    metric: str = "l1"
    knn_backend: str = "auto"
    device: str = "cpu"
    #: Training targets: drop references from the target's own patient. ``None`` (auto): under
    #: patient-kfold drop them when another patient remains (test targets never see their own
    #: patient there); under slide-loso / split-file keep them, as published.
    exclude_same_patient: bool | None = None
    n_val: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.near not in NEAR_MODES:
            raise InputError(f"unknown near mode '{self.near}'; expected one of {list(NEAR_MODES)}")
        if self.metric not in knn.METRICS:
            raise InputError(f"unknown metric '{self.metric}'; expected one of {list(knn.METRICS)}")
        if self.knn_backend not in knn.BACKENDS:
            raise InputError(f"unknown kNN backend '{self.knn_backend}'; expected one of {list(knn.BACKENDS)}")
        for name in ("near_max", "k_refer", "k_close"):
            if getattr(self, name) < 1:
                raise InputError(f"graph setting {name} must be at least 1, got {getattr(self, name)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class SlideData:
    """What a slide contributes to every fold: embeddings and positions (stored once)."""

    id: str
    patient: str
    x: np.ndarray  # (n, d) float32, in barcode order
    barcodes: np.ndarray
    coords: np.ndarray
    image: str = ""  # the H&E file (absolute path), so predictions can be drawn over it
    image_scale: float = 1.0  # as SlideImage.scale
    platform: str = "unknown"  # st / visium: the spot geometry, which new slides' virtual spots follow
    microns_per_pixel: float = float("nan")  # per coordinate pixel; NaN: unknown (stores before hgc 0.2)

    @property
    def image_mpp(self) -> float:
        """µm per pixel of the image file itself (a downscaled copy is coarser than its coordinates)."""
        return self.microns_per_pixel / self.image_scale


@dataclass
class FoldInfo:
    """The fold-level facts a run needs to reproduce or apply the fold's preprocessing."""

    name: str
    protocol: str
    train: list[str]
    val: list[str]
    test: list[str]
    genes: list[str]
    panel: str
    normaliser: dict  # Normalizer.to_dict() of the fitted transform
    missing_genes: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # training target -> why it has no graph
    # a fold's only training slide: its training graph references its own slide (self_refer_edges)
    self_referenced: list[str] = field(default_factory=list)
    manifest: str = ""


@dataclass
class Pool:
    """The references of training targets: some of the bank's slides (in bank order) and the
    ``close`` edges among them."""

    slides: list[str]
    close: np.ndarray  # (2, E) int64
    close_weight: np.ndarray  # (E,) float32


#: The pool key of a target whose references are the whole bank (test targets, new slides).
BANK = "bank"


@dataclass
class TargetEdges:
    target: str
    role: str
    pool: str  # BANK, or a key into BankGraphs.pools
    near: np.ndarray
    near_weight: np.ndarray
    refer: np.ndarray
    refer_weight: np.ndarray


@dataclass(eq=False)
class BankGraphs:
    """A reference bank and the graphs of the target slides joined to it.

    A cross-validation fold is the bank of its training slides with its slides as targets: each
    test slide predicted from the whole bank, each training slide trained against the bank's other
    slides (its pool, decided by :func:`reference_pool`). A trained model's bank with new slides is
    the same thing with test targets only (:func:`target_graph`). The bank and the graphs are
    assembled from the slides' stored embeddings on first use, so a store of many folds holds each
    embedding once.
    """

    info: FoldInfo
    slides: Mapping[str, SlideData]  # every target's and reference's spots (shared by the folds of a store)
    targets: list[TargetEdges]
    config: GraphConfig
    whole: Pool  # the bank: the fold's training slides, in order, and the close edges among all their spots
    expression: dict[str, np.ndarray]  # normalised expression of the fold's slides that have counts
    pools: dict[str, Pool] = field(default_factory=dict)  # training targets' references (some of the bank's slides)
    encoder: dict = field(default_factory=dict)  # what made the embeddings (see :func:`encoder_of`)

    @property
    def name(self) -> str:
        return self.info.name

    @cached_property
    def bank(self) -> ReferenceBank:
        """The fold's reference bank (its embeddings a copy of the training slides', made once)."""
        return make_bank([self.slides[s] for s in self.whole.slides], self.expression, self.info.genes,
                         self.info.normaliser, self.whole.close, self.whole.close_weight, self.encoder)

    def references(self, t: TargetEdges) -> Pool:
        """The slides ``t`` references, with their close edges."""
        if t.pool == BANK:
            return self.whole
        if t.pool not in self.pools:
            raise InputError(f"fold '{self.name}': the graph of '{t.target}' names reference pool '{t.pool}', "
                             f"which the fold does not have")
        return self.pools[t.pool]

    @property
    def image_mpp(self) -> float | None:
        """The coarsest image resolution (µm/px) among the training slides; None if none is known."""
        known = [v for s in self.info.train if s in self.slides and np.isfinite(v := self.slides[s].image_mpp)]
        return max(known) if known else None

    @property
    def platform(self) -> str:
        """The training slides' spot geometry (st, visium; "mixed"), which virtual spots follow."""
        kinds = {self.slides[s].platform for s in self.info.train if s in self.slides}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def graphs(self, role: str | None = None) -> list[SlideGraph]:
        return [self.graph(t) for t in self.targets if role is None or t.role == role]

    def graph(self, t: TargetEdges) -> SlideGraph:
        """The :class:`SlideGraph` of target ``t``: its spots joined to its references."""
        pool = self.references(t)
        rows = slice(None) if t.pool == BANK else self.bank.rows(pool.slides)
        return joined_graph(self.slides[t.target], self.bank, rows, self.name, t.role,
                            {"near": t.near, "refer": t.refer, "close": pool.close},
                            {"near": t.near_weight, "refer": t.refer_weight, "close": pool.close_weight},
                            self.expression.get(t.target))


def joined_graph(spot: SlideData, bank: ReferenceBank, rows, fold: str, role: str, edges: dict[str, np.ndarray],
                 weights: dict[str, np.ndarray], expression: np.ndarray | None) -> SlideGraph:
    """A target's spots joined to the bank's references ``rows``: the one place graphs are assembled."""
    return SlideGraph(
        fold=fold, target=spot.id, role=role, patient=spot.patient,
        spot_x=spot.x, spot_coords=spot.coords, spot_barcodes=spot.barcodes,
        ref_x=bank.x[rows], ref_y=bank.y[rows], ref_slide=bank.slide[rows], ref_patient=bank.patient[rows],
        edges=edges, edge_weight=weights, spot_y=expression, image=spot.image, image_scale=spot.image_scale,
    )


@dataclass
class GraphSet:
    """All graphs of a run, fold by fold: assemble :class:`SlideGraph` records with :meth:`graphs`."""

    config: GraphConfig
    protocol: str
    slides: dict[str, SlideData]
    folds: list[BankGraphs]
    encoder: dict = field(default_factory=dict)  # what made the embeddings (see :func:`encoder_of`)

    def graphs(self, fold: str | None = None, role: str | None = None) -> list[SlideGraph]:
        return [g for f in self.folds if fold is None or f.name == fold for g in f.graphs(role)]


def make_bank(slides: Sequence[SlideData], expression: Mapping[str, np.ndarray], genes: Sequence[str],
              normaliser: Mapping[str, object], close: np.ndarray, close_weight: np.ndarray,
              encoder: Mapping[str, object]) -> ReferenceBank:
    """The bank of ``slides`` (rows grouped by slide, in that order)."""
    return ReferenceBank(
        x=np.concatenate([r.x for r in slides]),
        y=np.concatenate([expression[r.id] for r in slides]),
        slide=np.concatenate([np.full(len(r.barcodes), r.id, dtype=object) for r in slides]),
        patient=np.concatenate([np.full(len(r.barcodes), r.patient, dtype=object) for r in slides]),
        barcode=np.concatenate([np.asarray(r.barcodes, dtype=object) for r in slides]),
        genes=list(genes), normaliser=dict(normaliser), close=close, close_weight=close_weight, encoder=dict(encoder),
        coords=np.concatenate([np.asarray(r.coords, np.float64) for r in slides]),
    )


# --- the leakage guard ----------------------------------------------------------------------

def reference_pool(
    target: str,
    role: str,
    fold: Fold,
    patients: Mapping[str, str],
    protocol: str,
    exclude_same_patient: bool | None = None,
) -> list[str]:
    """Reference slides of ``target`` in ``fold``: the only place pools are decided.

    Test targets get every training slide; training targets the other training slides (minus
    their own patient's, see :attr:`GraphConfig.exclude_same_patient`). Raises
    :class:`InputError` if the pool would contain the target, a test slide, a slide outside the
    fold's training set, or (patient-kfold) any slide of a test patient. An empty list means a
    training target has no possible reference.
    """
    if role not in ("train", "test"):
        raise InputError(f"role must be 'train' or 'test', got '{role}'")
    members = fold.train if role == "train" else fold.test
    if target not in members:
        raise InputError(f"slide '{target}' is not a {role} slide of fold '{fold.name}'")
    if role == "test":
        pool = list(fold.train)
    else:
        pool = [s for s in fold.train if s != target]
        same = [s for s in pool if patients[s] == patients[target]]
        exclude = exclude_same_patient
        if exclude is None:
            exclude = protocol == "patient-kfold" and len(same) < len(pool)
            if protocol == "patient-kfold" and same and not exclude:
                log.warning("fold %s: training target %s keeps references of its own patient %s "
                            "(no other patient among the training slides)", fold.name, target, patients[target])
        if exclude:
            pool = [s for s in pool if s not in same]
    test_patients = {patients[s] for s in fold.test}
    leaks = sorted({s for s in pool if s in fold.test or s == target or s not in fold.train})
    if protocol == "patient-kfold":
        leaks += sorted({s for s in pool if patients[s] in test_patients} - set(leaks))
    if leaks:
        raise InputError(
            f"reference leakage in fold '{fold.name}': target '{target}' ({role}) would use slides "
            f"{leaks} as references, which are test slides, the target itself, not training slides "
            f"or (patient-kfold) from a test patient {sorted(test_patients)}"
        )
    return pool


def check_new_target(slide: str, patient: str, bank: ReferenceBank) -> None:
    """Refuse to predict a slide from a bank that holds it (its own expression would be retrieved);
    a slide of a patient who has other slides in the bank is allowed, with a warning."""
    if slide in bank.slides:
        raise InputError(f"slide '{slide}' is one of the model's reference slides ({', '.join(bank.slides)}): "
                         "predicting it would retrieve its own expression; use a model trained without it")
    if patient in bank.patients:
        log.warning("slide %s: patient %s has other slides in the model's reference bank (a slide-level, "
                    "not a patient-level, prediction)", slide, patient)


def target_graph(slide: Slide, embeddings: np.ndarray, bank: ReferenceBank, config: GraphConfig, fold: str,
                 expression: np.ndarray | None = None) -> SlideGraph:
    """The graph of a new slide against a saved bank, by the rules that built the bank's own graphs:
    ``near`` edges among its spots, ``refer`` edges from the bank's spots, the bank's ``close`` edges.
    It equals the test graph of a cross-validation fold whose training slides are the bank's."""
    check_new_target(slide.id, slide.patient, bank)
    data = _slide_data(slide, embeddings)
    if data.x.shape[1] != bank.x.shape[1]:
        raise InputError(f"slide {slide.id}: its embeddings have {data.x.shape[1]} features, the model's reference "
                         f"bank {bank.x.shape[1]}; embed it with the model's encoder")
    near, near_w = near_edges(slide, config)
    refer, refer_w = refer_edges(data.x, bank.x, config)
    return joined_graph(data, bank, slice(None), fold, "test", {"near": near, "refer": refer, "close": bank.close},
                        {"near": near_w, "refer": refer_w, "close": bank.close_weight}, expression)


# --- edges -------------------------------------------------------------------------------------

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
    """``refer`` edges (2, E) [reference, spot]: each spot's ``k_refer`` most similar references."""
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

def align_embeddings(slide: Slide, barcodes: np.ndarray, emb: np.ndarray, source: str) -> np.ndarray:
    """Embeddings reordered to ``slide.barcodes``; any barcode mismatch is an InputError."""
    import pandas as pd

    barcodes = np.asarray(barcodes).astype(str)
    if emb.ndim != 2 or emb.shape[0] != barcodes.shape[0]:
        raise InputError(f"slide {slide.id}: {source} holds {emb.shape} embeddings for {len(barcodes)} barcodes")
    pos = pd.Index(barcodes).get_indexer(slide.barcodes.astype(str)) if pd.Index(barcodes).is_unique else None
    if pos is None or len(barcodes) != slide.n_spots or (pos < 0).any():
        missing = [] if pos is None else list(slide.barcodes[pos < 0][:5])
        raise InputError(
            f"slide {slide.id}: the barcodes in {source} ({len(barcodes)}) do not match the manifest's "
            f"{slide.n_spots} spots{f'; missing e.g. {missing}' if missing else ''}; "
            "re-run `hgc embed` on this manifest"
        )
    return np.ascontiguousarray(emb[pos], dtype=np.float32)


def load_embeddings(path: str | Path, slides: Sequence[Slide]) -> dict[str, np.ndarray]:
    """Embeddings of ``slides`` from an embedding HDF5 (``hgc embed``), in each slide's spot order."""
    from ..embed import read_embeddings

    return {s.id: align_embeddings(s, *read_embeddings(path, s.id), str(path)) for s in slides}


def build_graphs(
    slides: Mapping[str, Slide],
    embeddings: Mapping[str, np.ndarray],
    folds: Sequence[Fold],
    protocol: str,
    config: GraphConfig,
    data_root: str | Path | None = None,
    manifest: str = "",
    encoder: Mapping[str, object] | None = None,
) -> GraphSet:
    """Graphs of every target of every fold. ``embeddings[s]`` rows follow ``slides[s].barcodes``;
    ``encoder`` records what made them (:func:`encoder_of`), so a trained model can embed new slides alike."""
    from .._progress import progress

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol '{protocol}'; expected one of {list(PROTOCOLS)}")
    used = list(dict.fromkeys(s for f in folds for s in (*f.train, *f.test)))
    unknown = [s for s in used if s not in slides]
    if unknown:
        raise InputError(f"folds name slides that were not loaded: {unknown}")
    absent = [s for s in used if s not in embeddings]
    if absent:
        raise InputError(f"no embeddings for slides {absent}")
    data = {s: _slide_data(slides[s], embeddings[s]) for s in used}
    dims = {s: d.x.shape[1] for s, d in data.items()}
    if len(set(dims.values())) > 1:
        raise InputError(f"embeddings have different feature sizes across slides: {dims}")
    patients = {s: slides[s].patient for s in used}
    near = {s: near_edges(slides[s], config) for s in used}
    encoder = dict(encoder or {})
    out = [_build_fold(fold, slides, data, near, patients, protocol, config, data_root, manifest, encoder)
           for fold in progress(folds, desc="folds", unit="fold", leave=False)]
    return GraphSet(config, protocol, data, out, encoder)


#: Embedding attributes that say how a slide was embedded; a model predicts new slides only from
#: embeddings made the same way (the patch width is patch_um, or patch_box_px in native-pixel mode).
ENCODER_KEYS = ("encoder", "weights_sha256", "patch_mode", "patch_um", "patch_box_px", "patch_px", "patch_mpp", "resample")


def encoder_of(attrs: Mapping[str, Mapping[str, object]], slides: Sequence[str], source: str) -> dict[str, object]:
    """The encoder settings shared by ``slides`` in an embedding file's attributes (see ``read_attrs``).

    Slides embedded with different encoders, weights or patch sizes cannot share one reference
    bank: that is an InputError. The patch width is compared in the unit it was asked in: µm, or
    full-resolution pixels for native-pixel patches (whose width in µm differs by slide).
    """
    def value(v):
        v = v.decode() if isinstance(v, bytes) else v
        return v.item() if isinstance(v, np.generic) else v

    seen: dict[str, dict[str, object]] = {}
    for s in slides:
        a = attrs[s]
        native = value(a.get("patch_mode")) == "native-px"
        keys = [k for k in ENCODER_KEYS if k in a and k != ("patch_um" if native else "patch_box_px")]
        seen[s] = {k: value(a[k]) for k in keys}
    distinct = {json.dumps(v, sort_keys=True) for v in seen.values()}
    if len(distinct) > 1:
        first, other = slides[0], next(s for s in slides if seen[s] != seen[slides[0]])
        raise InputError(f"{source}: slides were embedded differently ({first}: {seen[first]}; {other}: "
                         f"{seen[other]}); embed all of them with one encoder and patch size")
    return next(iter(seen.values()), {})


def _slide_data(slide: Slide, emb: np.ndarray) -> SlideData:
    emb = np.ascontiguousarray(emb, np.float32)
    if emb.ndim != 2 or emb.shape[0] != slide.n_spots:
        raise InputError(f"slide {slide.id}: embeddings of shape {emb.shape} for {slide.n_spots} spots")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise InputError(f"slide {slide.id}: embeddings of {bad.size} spots contain NaN or infinity "
                         f"(e.g. {list(slide.barcodes[bad[:5]])}); re-run `hgc embed`")
    image = slide.image
    return SlideData(slide.id, slide.patient, emb, np.asarray(slide.barcodes, dtype=object),
                     np.asarray(slide.coords, np.float64), str(image.path.resolve()) if image else "",
                     float(image.scale) if image else 1.0, slide.platform, float(slide.microns_per_pixel))


def _build_fold(fold, slides, data, near, patients, protocol, config, data_root, manifest, encoder) -> BankGraphs:
    train = [slides[s] for s in fold.train]
    for s in train:
        s.require_expression(f"training slide of fold '{fold.name}'")
    panel = resolve_panel(config.genes, data_root, train)
    genes = list(panel.genes)
    normalizer = make_normalizer(config.normalize).fit(train, genes)
    members = [*fold.train, *fold.test]
    check_panel_overlap(panel, [slides[s] for s in members])
    info = FoldInfo(
        name=fold.name, protocol=protocol, train=list(fold.train),
        val=validation_slides(fold, patients, config.n_val, config.seed), test=list(fold.test),
        genes=genes, panel=panel.name, normaliser=normalizer.to_dict(),
        missing_genes=panel_coverage(panel, [slides[s] for s in members]), manifest=manifest,
    )
    expression = {s: normalizer.transform(slides[s], genes) for s in members if slides[s].has_expression}
    chosen = []
    for role, names in (("train", fold.train), ("test", fold.test)):
        for t in names:
            pool = reference_pool(t, role, fold, patients, protocol, config.exclude_same_patient)
            if not pool and fold.train == [t]:  # the only training slide still trains, on its own spots
                pool = [t]
                info.self_referenced.append(t)
                log.warning("fold %s: %s is the only training slide; its training graph references its own "
                            "spots, never a spot itself or its spatial neighbours", fold.name, t)
            if pool:
                chosen.append((t, role, tuple(pool)))
            else:
                info.skipped[t] = "every other training slide is of its own patient (exclude_same_patient)"
                log.warning("fold %s: training slide %s has no reference slide; no training graph for it", fold.name, t)
    # the bank (every training slide) is the test targets' references; a training target's pool is
    # some of its slides, and identical pools are stored once
    whole = tuple(fold.train)
    keys = {pool: f"pool{i}" for i, pool in enumerate(dict.fromkeys(p for _, _, p in chosen if p != whole))}
    keys[whole] = BANK
    feats = close_features(np.concatenate([data[s].x for s in fold.train]),
                           np.concatenate([expression[s] for s in fold.train]), config.metric)
    owner = np.concatenate([np.full(len(data[s].x), s, dtype=object) for s in fold.train])
    pools = {key: Pool(list(pool), *edges)
             for (pool, key), edges in zip(keys.items(), close_edges(feats, owner, list(keys), config))}
    whole_pool = pools.pop(BANK)
    targets = []
    for t, role, pool in chosen:
        if pool == (t,):
            refer, refer_w = self_refer_edges(data[t].x, near[t][0], config)
        else:
            refer, refer_w = refer_edges(data[t].x, np.concatenate([data[s].x for s in pool]), config)
        targets.append(TargetEdges(t, role, keys[pool], *near[t], refer, refer_w))
    return BankGraphs(info, data, targets, config, whole_pool, expression, pools, encoder)


def build_from_manifest(
    manifest: str | Path,
    embeddings: str | Path,
    protocol: str,
    out: str | Path,
    config: GraphConfig | None = None,
    split_file: str | Path | None = None,
    data_root: str | Path | None = None,
) -> Path:
    """Read ``manifest`` and ``embeddings``, build every fold's graphs and write them to ``out``.

    Everything is checked and built before the store is written; on any error nothing is written.
    """
    from ..data import data_root as resolve_root
    from ..data import read_manifest
    from ..embed import read_attrs
    from .store import write_graphs

    from .._outputs import check_writable

    config = config or GraphConfig()
    check_writable(out)
    m = read_manifest(manifest, data_root)
    folds = make_folds(m.patients, protocol, split_file)
    used = list(dict.fromkeys(s for f in folds for s in (*f.train, *f.test)))
    stored = read_attrs(embeddings)
    absent = [s for s in used if s not in stored]  # fail before reading any slide
    if absent:
        raise InputError(f"embedding file {embeddings} has no complete embeddings for slides {absent}; "
                         f"run `hgc embed {manifest}` first")
    encoder = encoder_of(stored, used, f"embedding file {embeddings}")
    slides = {s: m.load(s) for s in used}
    emb = load_embeddings(embeddings, list(slides.values()))
    graphs = build_graphs(slides, emb, folds, protocol, config, resolve_root(data_root), str(m.path), encoder)
    return write_graphs(graphs, out)
