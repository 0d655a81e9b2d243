"""A tiny synthetic fold (a bank and its targets) with learnable signal, for training / baseline tests.

Expression is a fixed nonlinear function of the spot embedding plus noise, so the model and the
ridge / kNN baselines have something to learn, and graphs follow the builder's rules: a training
target's references come from the other training slides, a test target's from all of them.
"""
from __future__ import annotations

import numpy as np

from hgc.data.splits import Fold, validation_slides
from hgc.graph.fold import BANK, BankGraphs, FoldInfo, GraphConfig, Pool, SlideData, TargetEdges

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


def _pool(refs: list[str], xy: np.ndarray) -> Pool:
    cidx, _ = _knn(xy, xy, 3, exclude_self=True)
    close = np.stack([cidx.ravel(), np.repeat(np.arange(len(xy)), 3)]).astype(np.int64)
    return Pool(refs, {"close": close}, {"close": np.ones(close.shape[1], np.float32)})


def _target(target: str, role: str, pool: str, ref_x: np.ndarray, data, k: int = 4) -> TargetEdges:
    x, _, coords, _ = data[target]
    idx, dist = _knn(x, ref_x, k)
    refer = np.stack([idx.ravel(), np.repeat(np.arange(len(x)), k)]).astype(np.int64)
    d = np.abs(coords[:, None] - coords[None]).max(-1)
    src, dst = np.nonzero((d > 0) & (d <= 100.0))
    return TargetEdges(target, role, pool, {"near": np.stack([src, dst]).astype(np.int64), "refer": refer},
                       {"near": np.ones(src.size, np.float32),
                        "refer": np.exp(-dist.ravel() / dist.mean()).astype(np.float32)})


def make_fold(train: list[str], test: list[str], protocol: str = "slide-loso", name: str | None = None,
              seed: int = 0) -> BankGraphs:
    """A fold as the builder makes one (no graph store needed): the bank of the training slides;
    training targets reference the other training slides, test targets the whole bank."""
    data = _slide_data(seed)
    name = name or f"fold-{'-'.join(test)}"
    slides = {s: SlideData(s, SLIDES[s], data[s][0], data[s][3], data[s][2]) for s in [*train, *test]}
    expression = {s: data[s][1] for s in slides}
    genes, normaliser = [f"G{j}" for j in range(GENES)], {"name": "log1p", "target_sum": 1e4}

    def xy(refs):
        return np.hstack([np.concatenate([data[s][0] for s in refs]), np.concatenate([data[s][1] for s in refs])])

    pools, targets = {}, []
    for role, names in (("train", train), ("test", test)):
        for t in names:
            refs = list(train) if role == "test" else [s for s in train if s != t]
            key = BANK if refs == list(train) else f"without-{t}"
            if key != BANK:
                pools[key] = _pool(refs, xy(refs))
            targets.append(_target(t, role, key, np.concatenate([data[s][0] for s in refs]), data))
    val = validation_slides(Fold(name, list(train), list(test)), SLIDES)
    info = FoldInfo(name=name, protocol=protocol, train=list(train), val=val, test=list(test), genes=genes,
                    panel="synthetic", normaliser=normaliser)
    return BankGraphs(info, slides, targets, GraphConfig(), _pool(list(train), xy(train)), expression, pools)
