"""Tiny synthetic SlideGraphs with learnable signal, for training / baseline / metric tests.

Expression is a fixed nonlinear function of the spot embedding plus noise, so the model and the
ridge / kNN baselines have something to learn, and graphs follow the builder's rules: a training
target's references come from the other training slides, a test target's from all of them.
"""
from __future__ import annotations

import numpy as np

from hgc.graph.record import SlideGraph

SLIDES = {"A1": "P1", "A2": "P1", "B1": "P2", "B2": "P2", "C1": "P3"}
DIM, GENES, GRID = 8, 6, 5


def _slide_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(DIM, GENES))
    data = {}
    for i, s in enumerate(SLIDES):
        xs, ys = np.meshgrid(np.arange(GRID), np.arange(GRID))
        coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64) * 100.0
        x = rng.normal(size=(GRID * GRID, DIM)).astype(np.float32) + 0.3 * i
        y = np.log1p(np.exp(x @ w / 2)) + 0.1 * rng.normal(size=(GRID * GRID, GENES))
        barcodes = np.array([f"{a}x{b}" for a, b in zip(xs.ravel(), ys.ravel())], dtype=object)
        data[s] = (x, y.astype(np.float32), coords, barcodes)
    return data


def _knn(q: np.ndarray, r: np.ndarray, k: int, exclude_self: bool = False):
    d = np.abs(q[:, None, :] - r[None, :, :]).sum(-1)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, 1)


def make_graph(fold: str, target: str, refs: list[str], role: str, data, k: int = 4) -> SlideGraph:
    x, y, coords, barcodes = data[target]
    ref_x = np.concatenate([data[s][0] for s in refs])
    ref_y = np.concatenate([data[s][1] for s in refs])
    ref_slide = np.concatenate([np.full(len(data[s][0]), s, dtype=object) for s in refs])
    idx, dist = _knn(x, ref_x, k)
    spot = np.repeat(np.arange(len(x)), k)
    refer = np.stack([idx.ravel(), spot])
    d = np.abs(coords[:, None] - coords[None]).max(-1)
    src, dst = np.nonzero((d > 0) & (d <= 100.0))
    cidx, _ = _knn(np.hstack([ref_x, ref_y]), np.hstack([ref_x, ref_y]), 3, exclude_self=True)
    close = np.stack([cidx.ravel(), np.repeat(np.arange(len(ref_x)), 3)])
    return SlideGraph(
        fold=fold, target=target, role=role, patient=SLIDES[target],
        spot_x=x, spot_coords=coords, spot_barcodes=barcodes,
        ref_x=ref_x, ref_y=ref_y, ref_slide=ref_slide,
        ref_patient=np.array([SLIDES[s] for s in ref_slide], dtype=object),
        edges={"near": np.stack([src, dst]).astype(np.int64), "refer": refer.astype(np.int64),
               "close": close.astype(np.int64)},
        edge_weight={"near": np.ones(src.size, np.float32),
                     "refer": np.exp(-dist.ravel() / dist.mean()).astype(np.float32),
                     "close": np.ones(close.shape[1], np.float32)},
        spot_y=y,
    )


def make_fold_graphs(fold: str, train: list[str], test: list[str], seed: int = 0) -> list[SlideGraph]:
    """Training graphs (refs = other training slides) then test graphs (refs = all training slides)."""
    data = _slide_data(seed)
    graphs = [make_graph(fold, t, [s for s in train if s != t], "train", data) for t in train]
    graphs += [make_graph(fold, t, train, "test", data) for t in test]
    return graphs


def make_fold(train: list[str], test: list[str], protocol: str = "slide-loso", name: str | None = None):
    """A :class:`hgc.train.fit.FoldData` over synthetic graphs (no graph store needed)."""
    from hgc.train.fit import FoldData

    name = name or f"fold-{'-'.join(test)}"
    graphs = make_fold_graphs(name, train, test)
    return FoldData(
        name=name, protocol=protocol, genes=[f"G{j}" for j in range(GENES)], normaliser={"name": "log1p", "target_sum": 1e4},
        train_slides=list(train), test_slides=list(test),
        train_graphs=[g for g in graphs if g.role == "train"], test_graphs=[g for g in graphs if g.role == "test"],
    )
