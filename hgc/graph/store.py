"""The graph store: one HDF5 file holding every fold's graphs, readable by DGL and PyG runs alike.

Layout (group names are percent-encoded slide / fold ids)::

    /                         attrs: format="hgc-graphs", format_version, hgc_version, protocol,
                                     config (GraphConfig JSON), folds (JSON list, in order),
                                     encoder (JSON: encoder, weights and patch settings of the embeddings)
    /slides/<slide>           x (n, d) f32, barcodes (n,) str, coords (n, 2) f64; attrs: id, patient,
                                     image (H&E path, "" if none), image_scale, platform
    /folds/<fold>             attrs: info (FoldInfo JSON: protocol, train/val/test, genes, panel,
                                     normaliser, missing_genes, skipped, self_referenced, manifest), targets (JSON),
                                     bank ("bank": the pool of all training slides, which test slides are predicted from)
    /folds/<fold>/genes       (G,) str
    /folds/<fold>/expression/<slide>   (n, G) f32, the fold's normalised expression of the slide
    /folds/<fold>/pools/<key>          per relation among references (close): <name> (2, E) i64 and
                                       <name>_weight (E,) f32; attrs: slides (JSON)
    /folds/<fold>/graphs/<target>      per relation of the target (near, refer): <name> (2, E) i64 and
                                       <name>_weight (E,) f32; attrs: role, pool

A fold is read back as a :class:`~hgc.graph.build.BankGraphs`: its reference bank (the pool
``bank``: the training slides' embeddings from ``/slides``, their expression, the pool's ``close``
edges), the training targets' pools and every target's edges. Each slide's embedding is stored
once for all folds and each normalised expression once per fold; a graph stores only its edges and
the name of its reference pool, so the test targets of a fold share the bank (and its ``close``
edges). The price is a concatenation when a fold is read.
The file is written to a temporary name and renamed, so a failed build leaves no file. Readers
check ``format`` and ``format_version`` and turn a damaged or foreign file into one line that says
how to rebuild it.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from .. import __version__
from .._outputs import atomic_h5, command_line, output_lock, safe_name
from .._records import open_h5, record_from_dict
from ..errors import InputError
from .fold import BANK, BankGraphs, FoldInfo, GraphConfig, GraphSet, Pool, SlideData, TargetEdges
from .record import SlideGraph, read_edges, relation, relation_names, write_edges

FORMAT = "hgc-graphs"
FORMAT_VERSION = 1
_REBUILD = "rebuild it with `hgc build-graph`"


def _nbytes(graphs: GraphSet) -> int:
    """Bytes of the arrays a store of ``graphs`` holds (for the free-space check)."""
    total = sum(s.x.nbytes + s.coords.nbytes + 16 * len(s.barcodes) for s in graphs.slides.values())
    for fg in graphs.folds:
        total += sum(y.nbytes for y in fg.expression.values())
        parts: list[Pool | TargetEdges] = [fg.whole, *fg.pools.values(), *fg.targets]
        total += sum(a.nbytes for e in parts for a in [*e.edges.values(), *e.edge_weight.values()])
    return total


def write_graphs(graphs: GraphSet, out: str | Path) -> Path:
    """Write ``graphs`` to ``out`` atomically (under the output's lock); returns the path."""
    import h5py

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    strings = h5py.string_dtype()
    with output_lock(out, command_line()), atomic_h5(out, _nbytes(graphs)) as f:
        f.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "hgc_version": __version__,
            "protocol": graphs.protocol, "config": graphs.config.to_json(),
            "folds": json.dumps([fg.info.name for fg in graphs.folds]), "encoder": json.dumps(graphs.encoder),
        })
        for s in graphs.slides.values():
            g = f.create_group(f"slides/{safe_name(s.id)}")
            g.create_dataset("x", data=s.x)
            g.create_dataset("barcodes", data=s.barcodes.astype(str).astype(object), dtype=strings)
            g.create_dataset("coords", data=s.coords)
            g.attrs.update({"id": s.id, "patient": s.patient, "image": s.image, "image_scale": s.image_scale,
                            "platform": s.platform, "microns_per_pixel": s.microns_per_pixel})
        for fg in graphs.folds:
            g = f.create_group(f"folds/{safe_name(fg.info.name)}")
            g.attrs["info"] = json.dumps(asdict(fg.info))
            g.attrs["targets"] = json.dumps([[t.target, t.role] for t in fg.targets])
            g.attrs["bank"] = BANK
            g.create_dataset("genes", data=np.asarray(fg.info.genes, dtype=object), dtype=strings)
            for slide, y in fg.expression.items():
                g.create_dataset(f"expression/{safe_name(slide)}", data=y)
            for key, pool in {BANK: fg.whole, **fg.pools}.items():
                p = g.create_group(f"pools/{key}")
                p.attrs["slides"] = json.dumps(pool.slides)
                write_edges(p, pool.edges, pool.edge_weight)
            for t in fg.targets:
                tg = g.create_group(f"graphs/{safe_name(t.target)}")
                tg.attrs.update({"target": t.target, "role": t.role, "pool": t.pool})
                write_edges(tg, t.edges, t.edge_weight)
    return out


def _open(path: str | Path):
    """A graph store opened for reading (see :func:`hgc._records.open_h5`)."""
    return open_h5(path, "graph file", FORMAT, FORMAT_VERSION, _REBUILD, "create it with `hgc build-graph`")


def _fold_names(f, path, fold: str | None) -> list[str]:
    names = json.loads(f.attrs["folds"])
    if fold is None:
        return names
    if fold not in names:
        raise InputError(f"fold '{fold}' is not in graph file {path}; folds there: {names}")
    return [fold]


def _fold_info(f, path, name: str) -> FoldInfo:
    raw = json.loads(f[f"folds/{safe_name(name)}"].attrs["info"])
    return record_from_dict(FoldInfo, raw, f"graph file {path}, fold '{name}'", _REBUILD)


def _config(f, path) -> GraphConfig:
    return record_from_dict(GraphConfig, json.loads(f.attrs["config"]), f"graph file {path}, its settings", _REBUILD)


def read_graph_set(path: str | Path, fold: str | None = None) -> GraphSet:
    """The stored :class:`GraphSet` (all folds, or one)."""
    def where(name: str) -> str:
        return f"graph file {path}, fold '{name}'"

    with _open(path) as f:
        config, encoder = _config(f, path), json.loads(f.attrs.get("encoder", "{}"))
        slides = {}
        for g in f["slides"].values():
            slides[g.attrs["id"]] = SlideData(
                g.attrs["id"], g.attrs["patient"], g["x"][()],
                g["barcodes"].asstr()[()].astype(object), g["coords"][()],
                str(g.attrs.get("image", "")), float(g.attrs.get("image_scale", 1.0)),
                str(g.attrs.get("platform", "unknown")), float(g.attrs.get("microns_per_pixel", np.nan)),
            )
        folds = []
        for name in _fold_names(f, path, fold):
            g = f[f"folds/{safe_name(name)}"]
            info = _fold_info(f, path, name)
            expression = {unquote(k): v[()] for k, v in g["expression"].items()}
            pools = {k: Pool(json.loads(p.attrs["slides"]), *read_edges(p, of_references=True))
                     for k, p in g.get("pools", {}).items()}
            targets = []
            for target, role in json.loads(g.attrs["targets"]):
                t = g[f"graphs/{safe_name(target)}"]
                targets.append(TargetEdges(target, role, t.attrs["pool"], *read_edges(t, of_references=False)))
            key = str(g.attrs.get("bank", "")) or next(  # stores before banks: the pool of all training slides
                (k for k, p in pools.items() if p.slides == list(info.train)), "")
            folds.append(_bank_graphs(info, slides, expression, pools, targets, key, config, encoder, where(name)))
        graphs = GraphSet(config, str(f.attrs["protocol"]), slides, folds, encoder)
    return graphs


def _bank_graphs(info: FoldInfo, slides: dict[str, SlideData], expression: dict[str, np.ndarray],
                 pools: dict[str, Pool], targets: list[TargetEdges], key: str, config: GraphConfig,
                 encoder: dict, where: str) -> BankGraphs:
    """A stored fold as its bank and targets; a store whose names or edges do not fit is refused."""
    whole = pools.pop(key, None)
    if whole is None:
        raise InputError(f"{where}: it records no reference bank (no pool of its training slides {info.train}); "
                         f"{_REBUILD}")
    if whole.slides != list(info.train):
        raise InputError(f"{where}: its reference bank holds slides {whole.slides}, not the fold's training slides "
                         f"{info.train}; {_REBUILD}")
    absent = [s for s in info.train if s not in slides or s not in expression]
    if absent:
        raise InputError(f"{where}: its reference bank lacks the embeddings or expression of {absent}; {_REBUILD}")
    for t in targets:
        if t.pool == key:
            t.pool = BANK
    fold = BankGraphs(info, slides, targets, config, whole, expression, pools, encoder)
    _check_consistent(fold, where)
    return fold


def _check_consistent(fold: BankGraphs, where: str) -> None:
    """Every name a fold refers to exists, pools are slides of the bank in its order, and edges index
    existing nodes (a damaged store is refused)."""
    bank = fold.whole.slides
    for t in fold.targets:
        if t.pool != BANK and t.pool not in fold.pools:
            raise InputError(f"{where}: the graph of '{t.target}' refers to missing pool {t.pool}; {_REBUILD}")
        pool = fold.references(t)
        absent = [s for s in [t.target, *pool.slides] if s not in fold.slides]
        if absent:
            raise InputError(f"{where}: the graph of '{t.target}' refers to missing slides {absent}; {_REBUILD}")
        tests = [s for s in pool.slides if s in fold.info.test]
        if tests:
            raise InputError(f"{where}: the {t.role} graph of '{t.target}' has test slides {tests} among its "
                             f"references; {_REBUILD}")
        if t.role == "train" and t.target not in bank:
            raise InputError(f"{where}: training target '{t.target}' is not one of the fold's training slides "
                             f"{bank}; {_REBUILD}")
        order = [bank.index(s) if s in bank else -1 for s in pool.slides]
        if -1 in order or order != sorted(set(order)):
            raise InputError(f"{where}: the references of '{t.target}' ({pool.slides}) are not slides of the "
                             f"fold's reference bank {bank} in its order; {_REBUILD}")
        n_spot = len(fold.slides[t.target].barcodes)
        n_ref = sum(len(fold.slides[s].barcodes) for s in pool.slides)
        n = {"spot": n_spot, "ref": n_ref}
        for rel, e in {**t.edges, **pool.edges}.items():
            src_n, dst_n = n[relation(rel).src], n[relation(rel).dst]
            if e.ndim != 2 or e.shape[0] != 2 or (e.size and (e.min() < 0 or e[0].max() >= src_n or e[1].max() >= dst_n)):
                raise InputError(f"{where}: the '{rel}' edges of '{t.target}' do not fit its nodes; {_REBUILD}")


def read_graphs(path: str | Path, fold: str | None = None, role: str | None = None) -> list[SlideGraph]:
    """Stored graphs as :class:`SlideGraph` records, optionally of one fold and/or role."""
    if role not in (None, "train", "test"):
        raise InputError(f"role must be 'train' or 'test', got '{role}'")
    return read_graph_set(path, fold).graphs(role=role)


def read_fold_info(path: str | Path) -> list[FoldInfo]:
    """Per-fold facts (splits, genes, fitted normaliser) without reading any graph arrays."""
    with _open(path) as f:
        return [_fold_info(f, path, n) for n in _fold_names(f, path, None)]


def summarize(path: str | Path) -> list[dict]:
    """One dict per (fold, target): counts of nodes and edges and the reference patients.

    Reads only shapes and attributes, so it is quick on stores with millions of references.
    """
    with _open(path) as f:
        n_spots = {g.attrs["id"]: int(g["barcodes"].shape[0]) for g in f["slides"].values()}
        patient = {g.attrs["id"]: str(g.attrs["patient"]) for g in f["slides"].values()}
        rows = []
        for name in _fold_names(f, path, None):
            g = f[f"folds/{safe_name(name)}"]
            for target, role in json.loads(g.attrs["targets"]):
                t = g[f"graphs/{safe_name(target)}"]
                pool = g[f"pools/{t.attrs['pool']}"]
                refs = json.loads(pool.attrs["slides"])
                counts = {r: (pool if relation(r).of_references else t)[r].shape[1] for r in relation_names()
                          if r in (pool if relation(r).of_references else t)}
                rows.append({
                    "fold": name, "target": target, "role": role, "patient": patient[target],
                    "n_spot": n_spots[target], "n_ref": sum(n_spots[s] for s in refs),
                    "edges": {r: int(c) for r, c in counts.items()},
                    "ref_slides": refs, "ref_patients": sorted({patient[s] for s in refs}),
                })
        return rows
