"""A fold as training sees it: loaded from the graph store, re-checked for leakage before any
training, its validation slides chosen, and, for a fold with one training slide, a spatial band of
that slide held out for early stopping."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.splits import isolates_patients
from ..errors import InputError
from ..graph.fold import BankGraphs
from ..graph.record import SlideGraph, relation

log = logging.getLogger(__name__)


def load_folds(graphs_path: str | Path, folds: Sequence[str] | None = None) -> list[BankGraphs]:
    """Every (or the named) fold of a graph store written by ``hgc build-graph``: a bank and its targets."""
    from ..graph import store

    path = Path(graphs_path)
    if not path.is_file():
        raise InputError(f"graph store {path} does not exist; build it with `hgc build-graph`")
    names = [f.name for f in store.read_fold_info(path)]
    if folds is not None:
        unknown = sorted(set(folds) - set(names))
        if unknown:
            raise InputError(f"folds {unknown} are not in graph store {path}; it has {names}")
        names = [n for n in names if n in set(folds)]
    return [fold for name in names for fold in store.read_graph_set(path, fold=name).folds]


def check_leakage(fold: BankGraphs) -> None:
    """Raise :class:`InputError` if test data can reach training or the reference bank.

    Checked: the bank holds training slides only; every training target is a training slide of
    the fold; no target references itself (except a fold's only training slide, whose training
    graph references only itself); no training target and no reference of any graph (training or
    test) is a test slide; under ``patient-kfold`` the same for every spot of a test patient.
    Under ``slide-loso`` other sections of a test slide's patient are references by design (the
    published protocol); that is logged, not refused.
    """
    info, bank = fold.info, fold.whole.slides
    test, train = set(info.test), set(info.train)
    patient = {s: d.patient for s, d in fold.slides.items()}
    test_patients = {patient[s] for s in test if s in patient}
    patient_level = isolates_patients(info.protocol)
    where = f"graph store fold '{fold.name}' ({info.protocol})"
    outside = sorted(set(bank) - train)
    if outside:
        raise InputError(f"{where}: the reference bank holds slides {outside}, which are not training slides")
    for t in fold.targets:
        if t.role == "train" and (t.target in test or t.target not in train):
            raise InputError(f"{where}: training graph targets slide '{t.target}', which is not a training slide")
        if t.role == "train" and patient_level and patient[t.target] in test_patients:
            raise InputError(f"{where}: training target '{t.target}' belongs to test patient '{patient[t.target]}'")
        refs = set(fold.references(t).slides)
        own_only = t.role == "train" and t.target in info.self_referenced and refs == {t.target}
        if t.target in refs and not own_only:
            raise InputError(f"{where}: the {t.role} graph of slide '{t.target}' has the slide itself among its references")
        leaked = sorted(refs & test)
        if leaked:
            raise InputError(f"{where}: the {t.role} graph of slide '{t.target}' has test slides {leaked} among its references")
        if patient_level:
            leaked = sorted({patient[s] for s in refs} & test_patients)
            if leaked:
                raise InputError(
                    f"{where}: the {t.role} graph of slide '{t.target}' has spots of test patients {leaked} among its references"
                )
    if not patient_level:
        shared = sum(len(fold.slides[s].barcodes) for s in bank if patient[s] in test_patients)
        if shared:
            log.info("fold %s: %d reference spots share a patient with a test slide (slide-level protocol)", fold.name, shared)


def choose_validation(fold: BankGraphs, chosen: Sequence[str] | None = None) -> list[str]:
    """``chosen`` validation slides, else the store's choice (always recorded by the builder);
    always training slides, never test slides."""
    val = list(chosen) if chosen is not None else list(fold.info.val)
    bad = sorted(set(val) - set(fold.info.train))
    if bad:
        raise InputError(f"fold '{fold.name}': validation slides {bad} are not training slides")
    return val


#: A lone training slide stops early on one of this many spatial bands of its own tissue.
BLOCK_BANDS = 5


@dataclass
class Block:
    """Spots of a lone training slide held out for early stopping: one spatial band of it."""

    slide: str
    band: int
    rows: np.ndarray  # (n_spot,) bool

    def describe(self) -> dict[str, Any]:
        return {"slide": self.slide, "band": self.band, "n_bands": BLOCK_BANDS, "n_spots": int(self.rows.sum())}


def hold_out_block(graph: SlideGraph, seed: int) -> tuple[SlideGraph, Block] | None:
    """A self-referenced training graph (a fold's lone training slide) with one spatial band of
    its spots held out: the graph without every edge that would carry the band's expression
    (edges with a band spot at a reference end: ``refer`` from it, ``close`` touching it), and the
    band. None when the graph's references are not its own spots in order (then nothing is held out)."""
    from .baselines import spatial_bands

    if graph.n_ref != graph.n_spot or not np.array_equal(graph.ref_x, graph.spot_x) or graph.spot_y is None:
        return None
    band = seed % BLOCK_BANDS
    rows = spatial_bands(graph.spot_coords, BLOCK_BANDS) == band
    edges, weights = dict(graph.edges), dict(graph.edge_weight)
    for name, e in graph.edges.items():  # every edge with a band spot at a reference end goes
        rel = relation(name)
        ref_ends = [row for row, t in ((0, rel.src), (1, rel.dst)) if t == "ref"]
        if ref_ends:
            keep = ~np.any([rows[e[row]] for row in ref_ends], axis=0)
            edges[name] = e[:, keep]
            if name in weights:
                weights[name] = weights[name][keep]
    return replace(graph, edges=edges, edge_weight=weights), Block(graph.target, band, rows)
