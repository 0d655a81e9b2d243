"""Convert a backend-neutral :class:`~hgc.graph.record.SlideGraph` into a graph library's object.

Both conversions carry the same tensors under the library's usual names, so a model written
against :mod:`hgc.nn`'s backend seam sees identical inputs under DGL and PyG:

========================  ==============================  =====================================
tensor                    DGL (``DGLHeteroGraph``)        PyG (``HeteroData``)
========================  ==============================  =====================================
node features             ``g.nodes[t].data["x"]``        ``data[t].x``
node expression           ``g.nodes[t].data["y"]``        ``data[t].y``
edges of a relation       ``g.edges(etype=canon)``        ``data[canon].edge_index``
edge weights              ``g.edges[canon].data["w"]``    ``data[canon].edge_weight``
========================  ==============================  =====================================

``y`` is set for ``ref`` always and for ``spot`` only where the graph knows it. Edge types are
the canonical triples of the relation table (:data:`~hgc.graph.record.RELATIONS`); a relation outside it is
an :class:`~hgc.errors.InputError` (the published SpaHGC code silently skipped convolutions whose
names did not match).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..._optional import require
from ...errors import InputError
from ...graph.record import NODE_TYPES, RELATIONS, SlideGraph, relation, relation_names

if TYPE_CHECKING:  # pragma: no cover
    import dgl
    from torch_geometric.data import HeteroData

@dataclass(frozen=True)
class GraphTensors:
    """The tensors of one :class:`SlideGraph`, checked once, on one device and float dtype."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    num_nodes: dict[str, int]
    edge_index: dict[str, torch.Tensor]  # relation name -> (2, E) int64
    edge_weight: dict[str, torch.Tensor]  # relation name -> (E,) float


def _where(g: SlideGraph) -> str:
    return f"graph of slide '{g.target}' (fold '{g.fold}')"


def check_slide_graph(g: SlideGraph) -> None:
    """Raise :class:`InputError` unless ``g``'s arrays and relations are mutually consistent."""
    where = _where(g)
    unknown = sorted(set(g.edges) - set(RELATIONS))
    if unknown:
        raise InputError(
            f"{where} has relations {unknown} that hgc does not know; expected a subset of "
            f"{list(RELATIONS)} (relation names are the contract between builder and model)"
        )
    if set(g.edge_weight) - set(g.edges):
        raise InputError(
            f"{where} has edge weights for relations without edges: "
            f"{sorted(set(g.edge_weight) - set(g.edges))}"
        )
    if g.spot_x.ndim != 2 or g.ref_x.ndim != 2 or g.ref_y.ndim != 2:
        raise InputError(f"{where}: spot_x, ref_x and ref_y must be 2-d arrays")
    if g.ref_y.shape[0] != g.n_ref:
        raise InputError(f"{where}: ref_y has {g.ref_y.shape[0]} rows, expected {g.n_ref} (one per ref)")
    if g.spot_y is not None and g.spot_y.shape != (g.n_spot, g.n_genes):
        raise InputError(
            f"{where}: spot_y has shape {g.spot_y.shape}, expected {(g.n_spot, g.n_genes)}"
        )
    n = {"spot": g.n_spot, "ref": g.n_ref}
    for name, e in g.edges.items():
        src_t, dst_t = RELATIONS[name].src, RELATIONS[name].dst
        e = np.asarray(e)
        if e.ndim != 2 or e.shape[0] != 2 or not np.issubdtype(e.dtype, np.integer):
            raise InputError(f"{where}: edges['{name}'] must be a (2, E) integer array, got {e.shape} {e.dtype}")
        for row, t in ((0, src_t), (1, dst_t)):
            if e.shape[1] and (e[row].min() < 0 or e[row].max() >= n[t]):
                raise InputError(
                    f"{where}: edges['{name}'] {'source' if row == 0 else 'destination'} indices "
                    f"must lie in [0, {n[t]}) ({t} nodes), got [{e[row].min()}, {e[row].max()}]"
                )
        w = g.edge_weight.get(name)
        if w is not None and np.shape(w) != (e.shape[1],):
            raise InputError(f"{where}: edge_weight['{name}'] has shape {np.shape(w)}, expected ({e.shape[1]},)")


def graph_tensors(
    g: SlideGraph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GraphTensors:
    """Check ``g`` and move its arrays to ``device`` (floats as ``dtype``) in canonical order."""
    check_slide_graph(g)

    def f(a: np.ndarray) -> torch.Tensor:  # contiguous: torch refuses negative-stride views
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    x = {"spot": f(g.spot_x), "ref": f(g.ref_x)}
    y = {"ref": f(g.ref_y)}
    if g.spot_y is not None:
        y["spot"] = f(g.spot_y)
    names = [r for r in relation_names() if r in g.edges]
    edge_index = {r: torch.as_tensor(np.ascontiguousarray(g.edges[r]), dtype=torch.int64, device=device) for r in names}
    edge_weight = {
        r: f(g.edge_weight[r]) if r in g.edge_weight else torch.ones(edge_index[r].shape[1], dtype=dtype, device=device)
        for r in names
    }
    return GraphTensors(x, y, {"spot": g.n_spot, "ref": g.n_ref}, edge_index, edge_weight)


def import_dgl(purpose: str) -> Any:
    """Import DGL quietly (it otherwise prints a notice when ``DGLBACKEND`` is unset)."""
    os.environ.setdefault("DGLBACKEND", "pytorch")
    return require("dgl", purpose)


def to_dgl(
    g: SlideGraph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> "dgl.DGLHeteroGraph":
    """A DGL heterograph with canonical edge types, ndata ``x``/``y`` and edata ``w``."""
    return dgl_from_tensors(graph_tensors(g, device, dtype), _where(g))


def dgl_from_tensors(t: GraphTensors, where: str = "graph") -> "dgl.DGLHeteroGraph":
    """Build the DGL heterograph around already-checked tensors (no copies)."""
    dgl = import_dgl("converting a SlideGraph to DGL")
    if not t.edge_index:
        raise InputError(f"{where} has no edges at all; expected some of {list(relation_names())}")
    device = next(iter(t.edge_index.values())).device
    hg = dgl.heterograph(
        {relation(r).canonical: (e[0], e[1]) for r, e in t.edge_index.items()},
        num_nodes_dict={nt: t.num_nodes[nt] for nt in _node_types_of(t)},
        idtype=torch.int64,
        device=device,
    )
    for nt in _node_types_of(t):
        hg.nodes[nt].data["x"] = t.x[nt]
        if nt in t.y:
            hg.nodes[nt].data["y"] = t.y[nt]
    for r, w in t.edge_weight.items():
        hg.edges[relation(r).canonical].data["w"] = w
    return hg


def _node_types_of(t: GraphTensors) -> list[str]:
    """Node types some relation touches (DGL drops node types outside its metagraph)."""
    used = {nt for r in t.edge_index for nt in (relation(r).src, relation(r).dst)}
    return [nt for nt in NODE_TYPES if nt in used]


def to_pyg(
    g: SlideGraph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> "HeteroData":
    """A PyG ``HeteroData`` with ``x``/``y`` per node type, ``edge_index``/``edge_weight`` per relation."""
    return pyg_from_tensors(graph_tensors(g, device, dtype))


def pyg_from_tensors(t: GraphTensors) -> "HeteroData":
    """Build the PyG ``HeteroData`` around already-checked tensors (no copies)."""
    require("torch_geometric", "converting a SlideGraph to PyTorch Geometric")
    from torch_geometric.data import HeteroData

    data = HeteroData()
    for nt in NODE_TYPES:
        data[nt].x = t.x[nt]
        data[nt].num_nodes = t.num_nodes[nt]
        if nt in t.y:
            data[nt].y = t.y[nt]
    for r, e in t.edge_index.items():
        data[relation(r).canonical].edge_index = e
        data[relation(r).canonical].edge_weight = t.edge_weight[r]
    return data
