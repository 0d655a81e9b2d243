"""Baselines that run beside the model on the same folds, genes, embeddings and graphs.

* ``mean``: the training spots' mean expression per gene. Constant by construction, so only its
  MSE/MAE are meaningful (its PCC is reported as undefined with every gene counted constant).
* ``ridge``: the HEST-Benchmark recipe -- StandardScaler, PCA to 256 components (fewer when there
  are fewer samples or features), ridge regression -- on the spots' image embeddings. The ridge
  penalty is chosen by cross-validation on the training slides, grouped by slide (MSE in the
  normalised space), so the choice never sees a test slide nor splits one slide across folds; a
  lone training slide is grouped into bands of its tissue instead (:func:`spatial_bands`).
* ``knn``: retrieval without learning -- each spot's prediction is the weighted mean of the
  expression of the references its ``refer`` edges point from (the graph's k nearest reference
  spots by image embedding). Weights: the edges' similarity ``edge_weight``, which the graph
  builder sets to ``exp(-d / median d)`` for L1/L2 distances ``d`` (the median over the graph's
  ``refer`` edges) and to the cosine for cosine search; normalised per spot this is
  ``softmax(-d / tau)`` over the spot's k references with ``tau`` = the median distance, a
  scale-free temperature that needs no tuning (see :func:`refer_weights`).

Every baseline is fitted on the fold's training spots only (its reference bank, :func:`training_set`) and predicts one
graph at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..graph.bank import ReferenceBank
from ..graph.record import SlideGraph

log = logging.getLogger(__name__)

#: Ridge penalties tried by the grouped cross-validation (log grid).
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 6, 8))
PCA_COMPONENTS = 256
MAX_CV_FOLDS = 5


@dataclass
class TrainingSet:
    """Training spots of a fold: embeddings, normalised expression and slide id per row."""

    x: np.ndarray  # (N, d) float32
    y: np.ndarray  # (N, G) float32
    slides: np.ndarray  # (N,) str
    coords: np.ndarray | None = None  # (N, 2) pixel positions on their slides, when known


def training_set(bank: ReferenceBank) -> TrainingSet:
    """The training spots of a fold or a model: its reference bank (every training slide's spots,
    including a lone training slide that has no graph of its own)."""
    return TrainingSet(np.asarray(bank.x, np.float32), np.asarray(bank.y, np.float32), np.asarray(bank.slide).astype(str),
                       bank.coords)


def spatial_bands(coords: np.ndarray, n: int) -> np.ndarray:
    """Band index (0..n-1) of each spot: ``n`` bands of about equal spot counts across the slide's
    longer side (spots in one grid column stay together), so a lone slide is cross-validated on
    blocks of tissue rather than on the neighbours of the spots it was fitted on."""
    coords = np.asarray(coords, np.float64)
    c = coords[:, int(np.argmax(np.ptp(coords, axis=0)))]
    cuts = np.quantile(c, np.linspace(0.0, 1.0, n + 1)[1:-1])
    return np.searchsorted(cuts, c, side="right").astype(np.int64)


class Baseline(Protocol):
    name: str

    def fit(self, train: TrainingSet) -> "Baseline": ...

    def predict(self, graph: SlideGraph) -> np.ndarray: ...


@dataclass
class MeanBaseline:
    name: str = "mean"
    mean_: np.ndarray | None = None

    def fit(self, train: TrainingSet) -> "MeanBaseline":
        self.mean_ = train.y.mean(axis=0)
        return self

    def predict(self, graph: SlideGraph) -> np.ndarray:
        return np.tile(self.mean_, (graph.n_spot, 1)).astype(np.float32)


def _ridge_pipeline(n_samples: int, n_features: int, alpha: float):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = min(PCA_COMPONENTS, n_samples, n_features)
    # svd_solver="full": exact and deterministic (randomized PCA would add a seed to track).
    return make_pipeline(StandardScaler(), PCA(n_components=n_comp, svd_solver="full"), Ridge(alpha=alpha))


@dataclass
class RidgeBaseline:
    name: str = "ridge"
    alphas: tuple[float, ...] = RIDGE_ALPHAS
    alpha_: float | None = None
    cv_mse_: dict[float, float] = field(default_factory=dict)
    model_: object = None

    def fit(self, train: TrainingSet) -> "RidgeBaseline":
        x, y, groups = train.x, train.y, train.slides
        if len(set(groups)) < 2 and train.coords is not None:
            groups = spatial_bands(train.coords, MAX_CV_FOLDS)
            log.info("ridge: one training slide; alpha by cross-validation over %d spatial bands of it", MAX_CV_FOLDS)
        self.alpha_ = self._choose_alpha(x, y, groups)
        self.model_ = _ridge_pipeline(*x.shape, self.alpha_).fit(x, y)
        return self

    def _choose_alpha(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import GroupKFold

        n_groups = len(set(groups))
        if n_groups < 2:
            alpha = float(np.median(self.alphas))
            log.warning("ridge: one training slide and no spot positions, no grouped cross-validation; alpha = %g", alpha)
            return alpha
        sse = np.zeros(len(self.alphas))
        for tr, va in GroupKFold(n_splits=min(MAX_CV_FOLDS, n_groups)).split(x, y, groups):
            # Scaler and PCA are fitted once per split, then every alpha reuses the projection.
            prep = _ridge_pipeline(len(tr), x.shape[1], 1.0)[:-1].fit(x[tr])
            z_tr, z_va = prep.transform(x[tr]), prep.transform(x[va])
            for i, a in enumerate(self.alphas):
                err = Ridge(alpha=a).fit(z_tr, y[tr]).predict(z_va) - y[va]
                sse[i] += float((err * err).sum())
        self.cv_mse_ = {a: float(s / y.size) for a, s in zip(self.alphas, sse)}
        alpha = self.alphas[int(np.argmin(sse))]
        log.info("ridge: alpha %g chosen by %d-slide grouped CV (MSE by alpha: %s)", alpha, n_groups,
                 ", ".join(f"{a:g}: {m:.4f}" for a, m in self.cv_mse_.items()))
        return alpha

    def predict(self, graph: SlideGraph) -> np.ndarray:
        return np.asarray(self.model_.predict(graph.spot_x), dtype=np.float32)


def refer_weights(graph: SlideGraph) -> np.ndarray:
    """Non-negative weights of the ``refer`` edges for similarity-weighted averaging.

    The graph builder stores a similarity (larger = closer) as ``edge_weight["refer"]``; weights
    are clipped at zero, and a spot whose retrieved references all have zero weight falls back to
    their unweighted mean (all weights equal), so every retrieved set yields a prediction.
    """
    src, dst = graph.edges["refer"]
    w = graph.edge_weight.get("refer")
    w = np.ones(src.shape[0]) if w is None else np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    total = np.bincount(dst, weights=w, minlength=graph.n_spot)
    dead = total[dst] <= 0
    return np.where(dead, 1.0, w)


@dataclass
class KnnBaseline:
    name: str = "knn"

    def fit(self, train: TrainingSet) -> "KnnBaseline":
        return self  # nothing to learn: the graph's refer edges are the retrieval

    def predict(self, graph: SlideGraph) -> np.ndarray:
        import scipy.sparse as sp

        if "refer" not in graph.edges:
            raise InputError(f"graph of slide {graph.target} (fold {graph.fold}) has no 'refer' edges")
        src, dst = graph.edges["refer"]
        w = refer_weights(graph)
        a = sp.csr_matrix((w, (dst, src)), shape=(graph.n_spot, graph.n_ref))
        total = np.asarray(a.sum(axis=1)).ravel()
        if (total <= 0).any():
            raise InputError(
                f"graph of slide {graph.target} (fold {graph.fold}): {(total <= 0).sum()} spots retrieved no reference"
            )
        return np.asarray((a @ graph.ref_y.astype(np.float64)) / total[:, None], dtype=np.float32)


BASELINES: dict[str, type] = {"mean": MeanBaseline, "ridge": RidgeBaseline, "knn": KnnBaseline}


def make_baseline(name: str) -> Baseline:
    try:
        return BASELINES[name]()
    except KeyError:
        raise InputError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
