"""A fold's graphs as data: the graph settings, the slides' embeddings, the pools of references,
each target's edges, and their assembly into :class:`~hgc.graph.record.SlideGraph` records
(:func:`joined_graph`, the one place graphs are assembled). Built by :mod:`hgc.graph.build`,
stored by :mod:`hgc.graph.store`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np

from .._devices import check_device
from .._options import option
from .._records import ConfigRecord
from ..data.normalize import NORMALISERS
from ..errors import InputError
from . import knn
from .bank import ReferenceBank
from .record import SlideGraph

log = logging.getLogger(__name__)

NEAR_MODES = ("auto", "grid", "hex", "radius")


@dataclass
class GraphConfig(ConfigRecord):
    """Every setting of graph construction; stored as JSON with the graphs (SpaHGC defaults)."""

    genes: str = field(default="top-mean:250", metadata=option(
        "Gene panel: hist2st-her2st, hist2st-cscc, top-mean:N, hvg:N or a file of symbols."))
    normalize: str = field(default="log1p", metadata=option(
        "Expression transform (log10-minmax is SpaHGC's, fitted on training slides).", choices=NORMALISERS))
    near: str = field(default="auto", metadata=option(
        "Spatial neighbours: ST grid, Visium hexagon, or a radius in µm.", choices=NEAR_MODES))
    near_max: int = field(default=5, metadata=option("Most spatial neighbours per spot on an ST grid.", minimum=1))
    near_radius_um: float | None = field(default=None, metadata=option(
        "Radius for --near radius (default 1.5 x spot pitch).", minimum=0))
    k_refer: int = field(default=7, metadata=option("References per target spot.", minimum=1))
    k_close: int = field(default=3, metadata=option("Neighbours per reference.", minimum=1))
    metric: str = field(default="l1", metadata=option("Image-feature distance of the similarity search.",
                                                      choices=knn.METRICS))
    knn_backend: str = field(default="auto", metadata=option(
        "Similarity search engine (faiss-ivf is approximate).", choices=knn.KNN_BACKENDS))
    device: str = field(default="cpu", metadata=option("Device for the similarity search: ", device=True))
    #: Training targets: drop references from the target's own patient. ``None`` (auto): under
    #: patient-kfold drop them when another patient remains (test targets never see their own
    #: patient there); under slide-loso / split-file keep them, as published.
    exclude_same_patient: bool | None = field(default=None, metadata=option(
        "For training targets, drop references from the target's own patient (default: drop under "
        "patient-kfold when another patient remains).", flag="--exclude-same-patient/--keep-same-patient"))
    n_val: int = field(default=1, metadata=option(
        "Validation slides per fold (early stopping), taken from the training slides.", minimum=0))
    seed: int = field(default=0, metadata=option("Seed of the validation slides' choice."))

    def __post_init__(self) -> None:
        if self.near not in NEAR_MODES:
            raise InputError(f"unknown near mode '{self.near}'; expected one of {list(NEAR_MODES)}")
        if self.metric not in knn.METRICS:
            raise InputError(f"unknown metric '{self.metric}'; expected one of {list(knn.METRICS)}")
        if self.knn_backend not in knn.KNN_BACKENDS:
            raise InputError(f"unknown kNN backend '{self.knn_backend}'; expected one of {list(knn.KNN_BACKENDS)}")
        if self.normalize not in NORMALISERS:
            raise InputError(f"unknown normalisation '{self.normalize}'; expected one of {list(NORMALISERS)}")
        for name in ("near_max", "k_refer", "k_close"):
            if getattr(self, name) < 1:
                raise InputError(f"graph setting {name} must be at least 1, got {getattr(self, name)}")
        if self.n_val < 0:
            raise InputError(f"graph setting n_val must be >= 0, got {self.n_val}")
        self.device = check_device(self.device)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


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
    normaliser: dict  # Normaliser.to_dict() of the fitted transform
    missing_genes: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # training target -> why it has no graph
    # a fold's only training slide: its training graph references its own slide (self_refer_edges)
    self_referenced: list[str] = field(default_factory=list)
    manifest: str = ""


@dataclass
class Pool:
    """The references of training targets: some of the bank's slides (in bank order) and the edges
    of the relations among them (``close``)."""

    slides: list[str]
    edges: dict[str, np.ndarray]  # relation -> (2, E) int64 [source, destination]
    edge_weight: dict[str, np.ndarray]  # relation -> (E,) float32


#: The pool key of a target whose references are the whole bank (test targets, new slides).
BANK = "bank"


@dataclass
class TargetEdges:
    """A target's own relations (``near`` among its spots, ``refer`` from its references) and its pool."""

    target: str
    role: str
    pool: str  # BANK, or a key into BankGraphs.pools
    edges: dict[str, np.ndarray]  # relation -> (2, E) int64 [source, destination]
    edge_weight: dict[str, np.ndarray]  # relation -> (E,) float32


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
                         self.info.normaliser, self.whole, self.encoder)

    def references(self, t: TargetEdges) -> Pool:
        """The slides ``t`` references, with the edges among them."""
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
                            {**t.edges, **pool.edges}, {**t.edge_weight, **pool.edge_weight},
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
              normaliser: Mapping[str, object], pool: Pool, encoder: Mapping[str, object]) -> ReferenceBank:
    """The bank of ``slides`` (rows grouped by slide, in that order), with ``pool``'s edges."""
    return ReferenceBank(
        x=np.concatenate([r.x for r in slides]),
        y=np.concatenate([expression[r.id] for r in slides]),
        slide=np.concatenate([np.full(len(r.barcodes), r.id, dtype=object) for r in slides]),
        patient=np.concatenate([np.full(len(r.barcodes), r.patient, dtype=object) for r in slides]),
        barcode=np.concatenate([np.asarray(r.barcodes, dtype=object) for r in slides]),
        genes=list(genes), normaliser=dict(normaliser), edges=dict(pool.edges), edge_weight=dict(pool.edge_weight),
        encoder=dict(encoder),
        coords=np.concatenate([np.asarray(r.coords, np.float64) for r in slides]),
    )


# --- the leakage guard ----------------------------------------------------------------------
