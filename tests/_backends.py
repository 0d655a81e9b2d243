"""Graph-backend helpers for the conversion and model tests, and one small real her2st graph.

DGL exists only on the "dgl" stack (its last wheels need torch<=2.2.1 and numpy<2). There its
tests must run: with ``HGC_STACK=dgl`` (set by the Makefile per stack) a DGL that does not
import fails the test instead of skipping it. Elsewhere DGL tests skip and say why.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from hgc._optional import available
from hgc.graph.record import SlideGraph

BACKEND_NAMES = ("dgl", "pyg")


def dgl_importable() -> bool:
    os.environ.setdefault("DGLBACKEND", "pytorch")
    return available("dgl")


def require_dgl() -> None:
    """Skip (modern stack) or fail (``HGC_STACK=dgl``) unless DGL imports."""
    if dgl_importable():
        return
    if os.environ.get("HGC_STACK") == "dgl":
        from hgc.nn.graphlib.convert import import_dgl

        import_dgl("the DGL stack's tests (HGC_STACK=dgl)")  # raises, naming the import error
    import numpy

    pytest.skip(
        f"DGL is not installable on this stack (torch {torch.__version__}, numpy {numpy.__version__}): "
        "its last PyPI wheels, 2.1.0, are built for torch<=2.2.1 and numpy<2; run the dgl stack"
    )


def backend(name: str):
    """The hgc backend ``name``, after :func:`require_dgl` for DGL."""
    from hgc.nn import get_backend

    if name == "dgl":
        require_dgl()
    return get_backend(name)


@lru_cache(maxsize=2)
def her2st_graph(manifest: Path, data_root: Path, genes: str = "top-mean:40") -> SlideGraph:
    """Target C2's test graph with references from C3, C4, C5 (hgc's builder, real colour features)."""
    from her2st_graph_data import load_colour_embeddings, load_slides
    from hgc.data.splits import Fold
    from hgc.graph.build import build_graphs
    from hgc.graph.fold import GraphConfig

    slides, emb = load_slides(manifest), load_colour_embeddings(manifest)
    fold = Fold("C2", train=["C3", "C4", "C5"], test=["C2"])
    used = {s: slides[s] for s in (*fold.train, *fold.test)}
    gs = build_graphs(used, emb, [fold], "slide-loso", GraphConfig(genes=genes, knn_backend="torch"), data_root)
    (g,) = gs.graphs(role="test")
    return g



@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run a module's small-graph torch work on one intra-op thread.

    On the shared 2-core CI machine, torch's OpenMP workers spin against other processes: the same
    small training step took ~4 s with 2 threads and ~0.03 s with 1. Import this fixture into a
    test module to apply it there; the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
