"""Per-slide accuracy metrics for predicted spatial expression, vectorised over genes.

Conventions (the brief, §4), stated once here so every report means the same thing:

* PCC-ALL is Pearson's r across the spots of one slide, per gene, averaged over genes.
* A gene whose observed *or* predicted values are constant on the slide has no defined r. Its PCC
  is NaN, it is left out of the average, and the number of such genes is reported beside the
  average (``n_constant``) -- never dropped silently.
* PCC-HEG / PCC-HVG average the same per-gene r over the 50 most highly expressed / most variable
  genes, chosen on the fold's *training* slides (:func:`training_gene_sets`), never on the test slide.
* MSE and MAE are computed in the normalised expression space the predictions live in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError

#: Number of genes in the HEG / HVG subsets (the HEST-Benchmark and TRIPLEX convention).
N_TOP_GENES = 50

#: Metric keys every per-slide record and every summary carries, in report order.
METRIC_KEYS: tuple[str, ...] = ("pcc_all", "pcc_heg", "pcc_hvg", "mse", "mae")

# A column counts as constant when its standard deviation is below this fraction of its scale;
# an exact ``== 0`` test would let float32 round-off turn a constant prediction into r = +-1.
_CONSTANT_RTOL = 1e-6


def _as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"{name} must be a (spots, genes) matrix, got shape {a.shape}")
    return a


def constant_columns(a: np.ndarray) -> np.ndarray:
    """Boolean mask of columns of ``a`` (spots x genes) that have (numerically) zero variance."""
    a = _as_matrix(a, "matrix")
    std = a.std(axis=0)
    scale = np.maximum(np.abs(a).max(axis=0, initial=0.0), 1e-30)
    return std <= _CONSTANT_RTOL * scale


def pearson_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r across spots for every gene; NaN where either side is constant.

    Both inputs are (spots, genes); the result is (genes,) float64.
    """
    obs = _as_matrix(observed, "observed")
    pred = _as_matrix(predicted, "predicted")
    if obs.shape != pred.shape:
        raise InputError(f"observed {obs.shape} and predicted {pred.shape} shapes differ")
    if obs.shape[0] < 2:
        return np.full(obs.shape[1], np.nan)
    oc = obs - obs.mean(axis=0)
    pc = pred - pred.mean(axis=0)
    denom = np.sqrt((oc * oc).sum(axis=0) * (pc * pc).sum(axis=0))
    constant = constant_columns(obs) | constant_columns(pred)
    r = np.full(obs.shape[1], np.nan)
    ok = ~constant
    r[ok] = (oc[:, ok] * pc[:, ok]).sum(axis=0) / denom[ok]
    return np.clip(r, -1.0, 1.0)


def nan_mean(x) -> float:
    """Mean of the non-NaN entries; NaN when there are none (an undefined average stays undefined)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


@dataclass
class SlideMetrics:
    """Metrics of one method on one held-out slide (one row of ``metrics.csv``)."""

    slide: str
    fold: str
    pcc_all: float
    pcc_heg: float
    pcc_hvg: float
    mse: float
    mae: float
    n_genes: int  # genes scored
    n_constant: int  # of those, genes with a constant observed or predicted column (PCC = NaN)
    n_constant_heg: int
    n_constant_hvg: int
    n_spots: int

    def to_dict(self) -> dict:
        return asdict(self)


def slide_metrics(
    observed: np.ndarray,
    predicted: np.ndarray,
    heg: Sequence[int],
    hvg: Sequence[int],
    *,
    slide: str = "",
    fold: str = "",
) -> SlideMetrics:
    """All per-slide metrics; ``heg`` / ``hvg`` are gene indices chosen on training data."""
    obs = _as_matrix(observed, "observed")
    pred = _as_matrix(predicted, "predicted")
    r = pearson_per_gene(obs, pred)
    heg_idx = _check_indices(heg, r.size, "HEG")
    hvg_idx = _check_indices(hvg, r.size, "HVG")
    err = pred - obs
    return SlideMetrics(
        slide=slide,
        fold=fold,
        pcc_all=nan_mean(r),
        pcc_heg=nan_mean(r[heg_idx]),
        pcc_hvg=nan_mean(r[hvg_idx]),
        mse=float((err * err).mean()),
        mae=float(np.abs(err).mean()),
        n_genes=int(r.size),
        n_constant=int(np.isnan(r).sum()),
        n_constant_heg=int(np.isnan(r[heg_idx]).sum()),
        n_constant_hvg=int(np.isnan(r[hvg_idx]).sum()),
        n_spots=int(obs.shape[0]),
    )


def _check_indices(idx: Sequence[int], n_genes: int, name: str) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n_genes:
        raise InputError(f"{name} gene indices must be non-empty and within 0..{n_genes - 1}")
    return idx


def training_gene_sets(train_expression: np.ndarray, n: int = N_TOP_GENES) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` most highly expressed and the ``n`` most variable genes.

    ``train_expression`` is the normalised expression of the fold's training spots (all training
    slides stacked), so the choice never sees a test slide. Ties break by gene order (stable sort),
    making the choice deterministic.
    """
    y = _as_matrix(train_expression, "training expression")
    n = min(n, y.shape[1])
    heg = np.argsort(-y.mean(axis=0), kind="stable")[:n]
    hvg = np.argsort(-y.var(axis=0), kind="stable")[:n]
    return heg.astype(np.int64), hvg.astype(np.int64)


def pooled_pcc(observed: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> float:
    """Mean per-gene r over all test spots concatenated (the HEST-Benchmark convention)."""
    if len(observed) != len(predicted) or not observed:
        raise InputError("pooled PCC needs one predicted matrix per observed matrix")
    return nan_mean(pearson_per_gene(np.concatenate(observed), np.concatenate(predicted)))


def summarise(rows: Sequence[SlideMetrics]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) standard deviation over slides of each metric, ignoring NaN slides."""
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key in METRIC_KEYS:
        values = np.array([getattr(r, key) for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        mean[key] = float(values.mean()) if values.size else float("nan")
        std[key] = float(values.std()) if values.size else float("nan")
    return mean, std
