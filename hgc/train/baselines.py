"""Baselines that run beside the model on the same folds, genes, embeddings and graphs.

* ``mean``: the training spots' mean expression per gene. Constant by construction, so only its
  MSE/MAE are meaningful (its PCC is reported as undefined with every gene counted constant).
* ``ridge``: the HEST-Benchmark recipe -- StandardScaler, PCA to 256 components (fewer when there
  are fewer samples or features), ridge regression -- on the spots' image embeddings, each beside
  the mean embedding of its spatial neighbours (the ``near`` relation's information, which the
  model gets too; :func:`neighbour_mean`). The ridge penalty is chosen by cross-validation on the
  training slides, grouped by slide (MSE in the normalised space), so the choice never sees a
  test slide nor splits one slide across folds; a lone training slide is grouped into bands of
  its tissue instead (:func:`spatial_bands`).
* ``ridge`` and ``knn`` project their predictions onto the leading principal components of the
  training expression (:class:`LowRankOutput`: genes share what the image can tell about them),
  the rank chosen on the same grouped splits by held-out PCC-ALL per slide (or band) among
  :data:`GENE_RANKS` and the full rank.
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
from typing import Protocol, Sequence

import numpy as np

from ..errors import InputError
from ..graph.bank import ReferenceBank
from ..graph.record import SlideGraph

log = logging.getLogger(__name__)

#: Ridge penalties tried by the grouped cross-validation (log grid).
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 6, 8))
PCA_COMPONENTS = 256
MAX_CV_FOLDS = 5
#: Gene-PCA output ranks tried by ridge's cross-validation (besides the full rank, ``None``).
GENE_RANKS: tuple[int, ...] = (5, 10, 20, 50, 100)


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


def gene_basis(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (G,) and principal axes (G, min(N, G)) of expression ``y``, leading axis first."""
    mean = y.mean(axis=0)
    _, _, vt = np.linalg.svd(np.asarray(y - mean, np.float64), full_matrices=False)
    return mean, vt.T


def project(pred: np.ndarray, mean: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """``pred`` restricted to the span of ``basis`` around ``mean`` (unchanged when ``basis`` is None)."""
    if basis is None:
        return pred
    return mean + ((pred - mean) @ basis) @ basis.T


#: Spots within this many spot pitches (a slide's median nearest-neighbour distance) are
#: neighbours for :func:`neighbour_mean`: the ST grid's 8-neighbourhood, Visium's hexagonal ring.
NEIGHBOUR_PITCHES = 1.5


def neighbour_mean(x: np.ndarray, coords: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """(N, d): per spot the mean embedding of its spatial neighbours on its own slide (itself
    when it has none) -- what the graphs' ``near`` relation tells the model, as a feature."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    out = np.array(x, dtype=np.float32, copy=True)
    for slide in np.unique(slides):
        rows = np.flatnonzero(slides == slide)
        if len(rows) < 2:
            continue
        tree = cKDTree(coords[rows])
        pitch = float(np.median(tree.query(coords[rows], k=2)[0][:, 1]))
        pairs = tree.query_pairs(NEIGHBOUR_PITCHES * pitch, output_type="ndarray")
        if not len(pairs):
            continue
        i, j = np.concatenate([pairs, pairs[:, ::-1]]).T
        adj = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(len(rows), len(rows)))
        count = np.asarray(adj.sum(axis=1)).ravel()
        has = count > 0
        out[rows[has]] = (np.asarray(adj @ x[rows].astype(np.float64))[has] / count[has, None]).astype(np.float32)
    return out


def cv_groups(train: TrainingSet) -> np.ndarray | None:
    """What cross-validation holds out together: slides, or for a lone slide bands of its tissue
    (None when it is one slide without spot positions)."""
    if len(set(train.slides)) >= 2:
        return train.slides
    if train.coords is not None:
        log.info("one training slide: cross-validation over %d spatial bands of it", MAX_CV_FOLDS)
        return spatial_bands(train.coords, MAX_CV_FOLDS)
    return None


def group_splits(n: int, groups: np.ndarray):
    """Grouped CV splits (train rows, held-out rows): a group is never split."""
    from sklearn.model_selection import GroupKFold

    return GroupKFold(n_splits=min(MAX_CV_FOLDS, len(set(groups)))).split(np.zeros((n, 1)), groups=groups)


@dataclass
class LowRankOutput:
    """A baseline's predictions projected on the leading gene-PCA axes of its training expression
    (genes share what the image can tell about them), the rank chosen by held-out PCC-ALL."""

    rank: int | None  # None: the full rank, predictions unchanged
    cv_pcc: dict[int | None, float]
    mean: np.ndarray | None = None
    basis: np.ndarray | None = None

    @classmethod
    def choose(cls, y: np.ndarray, groups: np.ndarray | None, held_out, ranks: Sequence[int | None],
               name: str) -> "LowRankOutput":
        """``held_out`` yields (train rows, held-out rows, held-out predictions); the held-out
        PCC-ALL of each rank is averaged over held-out groups (slides or bands)."""
        from ..evaluate.metrics import nan_mean, pearson_per_gene

        ranks = [r for r in ranks if r is None or r < min(y.shape)]
        if groups is None or len(ranks) < 2:
            return cls(None, {})
        scores: dict[int | None, list[float]] = {r: [] for r in ranks}
        for tr, va, pred in held_out:
            mean, basis = gene_basis(y[tr])
            for r in ranks:
                p = project(pred, mean, None if r is None else basis[:, :r])
                for g in np.unique(groups[va]):
                    rows = groups[va] == g
                    scores[r].append(nan_mean(pearson_per_gene(y[va][rows], p[rows])))
        cv = {r: nan_mean(v) for r, v in scores.items()}
        rank = max(ranks, key=lambda r: -np.inf if np.isnan(cv[r]) else cv[r])
        log.info("%s: gene-PCA output rank %s chosen by CV (PCC-ALL by rank: %s)", name, rank or "full",
                 ", ".join(f"{r or 'full'}: {v:.4f}" for r, v in cv.items()))
        if rank is None:
            return cls(None, cv)
        mean, basis = gene_basis(y)
        return cls(rank, cv, mean, basis[:, :rank])

    def __call__(self, pred: np.ndarray) -> np.ndarray:
        return np.asarray(project(pred, self.mean, self.basis), dtype=np.float32)


@dataclass
class RidgeBaseline:
    name: str = "ridge"
    alphas: tuple[float, ...] = RIDGE_ALPHAS
    ranks: tuple[int | None, ...] = (*GENE_RANKS, None)
    context: bool = True  # add the neighbour mean (neighbour_mean) to each spot's embedding
    alpha_: float | None = None
    cv_mse_: dict[float, float] = field(default_factory=dict)
    output_: LowRankOutput | None = None
    context_: bool = False  # whether the fit used it (it needs the training spots' positions)
    model_: object = None

    def fit(self, train: TrainingSet) -> "RidgeBaseline":
        from sklearn.linear_model import Ridge

        self.context_ = self.context and train.coords is not None
        if self.context and not self.context_:
            log.warning("ridge: the training spots' positions are unknown (an older bank); no neighbour features")
        x, y = self._features(train.x, train.coords, train.slides), train.y
        groups = cv_groups(train)
        self.alpha_ = self._choose_alpha(y, self._splits(x, groups))
        # a second pass over the same splits (recomputed, not kept: they hold N x 256 per split)
        held_out = ((tr, va, Ridge(alpha=self.alpha_).fit(z_tr, y[tr]).predict(z_va))
                    for tr, va, z_tr, z_va in self._splits(x, groups))
        self.output_ = LowRankOutput.choose(y, groups, held_out, self.ranks, self.name)
        self.model_ = _ridge_pipeline(*x.shape, self.alpha_).fit(x, y)
        return self

    @staticmethod
    def _splits(x: np.ndarray, groups: np.ndarray | None):
        """Grouped CV splits with the scaler + PCA fitted on each training part: (tr, va, z_tr, z_va)."""
        if groups is None:
            return
        for tr, va in group_splits(len(x), groups):
            prep = _ridge_pipeline(len(tr), x.shape[1], 1.0)[:-1].fit(x[tr])
            yield tr, va, prep.transform(x[tr]), prep.transform(x[va])

    def _choose_alpha(self, y: np.ndarray, splits) -> float:
        from sklearn.linear_model import Ridge

        sse, n_splits = np.zeros(len(self.alphas)), 0
        for tr, va, z_tr, z_va in splits:  # every alpha reuses a split's projection
            n_splits += 1
            for i, a in enumerate(self.alphas):
                err = Ridge(alpha=a).fit(z_tr, y[tr]).predict(z_va) - y[va]
                sse[i] += float((err * err).sum())
        if not n_splits:
            alpha = float(np.median(self.alphas))
            log.warning("ridge: one training slide and no spot positions, no grouped cross-validation; alpha = %g", alpha)
            return alpha
        self.cv_mse_ = {a: float(s / y.size) for a, s in zip(self.alphas, sse)}
        alpha = self.alphas[int(np.argmin(sse))]
        log.info("ridge: alpha %g chosen by %d-split grouped CV (MSE by alpha: %s)", alpha, n_splits,
                 ", ".join(f"{a:g}: {m:.4f}" for a, m in self.cv_mse_.items()))
        return alpha

    def _features(self, x: np.ndarray, coords: np.ndarray | None, slides: np.ndarray) -> np.ndarray:
        return np.hstack([x, neighbour_mean(x, coords, slides)]) if self.context_ else x

    def predict(self, graph: SlideGraph) -> np.ndarray:
        x = graph.spot_x
        if self.context_:
            x = self._features(x, graph.spot_coords, np.zeros(len(x), np.int64))  # one slide
        return self.output_(self.model_.predict(x))


def refer_weights(graph: SlideGraph) -> np.ndarray:
    """Non-negative weights of the ``refer`` edges for similarity-weighted averaging.

    The graph builder stores a similarity (larger = closer) as ``edge_weight["refer"]``; weights
    are clipped at zero, and a spot whose retrieved references all have zero weight falls back to
    their unweighted mean (all weights equal), so every retrieved set yields a prediction.
    """
    return usable_weights(graph.edge_weight.get("refer"), graph.edges["refer"][1], graph.n_spot)


def usable_weights(w: np.ndarray | None, dst: np.ndarray, n_spot: int) -> np.ndarray:
    """Similarities ``w`` of edges into ``dst`` clipped at zero; all-zero spots get equal weights."""
    w = np.ones(dst.shape[0]) if w is None else np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    total = np.bincount(dst, weights=w, minlength=n_spot)
    return np.where(total[dst] <= 0, 1.0, w)


def weighted_mean(src: np.ndarray, dst: np.ndarray, w: np.ndarray, ref_y: np.ndarray, n_spot: int) -> np.ndarray:
    """(n_spot, G): per spot the ``w``-weighted mean of the expression of the references it retrieved."""
    import scipy.sparse as sp

    a = sp.csr_matrix((w, (dst, src)), shape=(n_spot, ref_y.shape[0]))
    total = np.asarray(a.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((a @ ref_y.astype(np.float64)) / total[:, None], dtype=np.float32)


@dataclass
class KnnBaseline:
    name: str = "knn"
    ranks: tuple[int | None, ...] = (*GENE_RANKS, None)
    output_: LowRankOutput | None = None

    def fit(self, train: TrainingSet) -> "KnnBaseline":
        """Nothing to learn for the retrieval (the graph's refer edges); the gene-PCA output rank is
        chosen by retrieving each held-out group's spots from the other groups' spots (with the
        graphs' default k and metric)."""
        from ..graph.edges import refer_edges
        from ..graph.fold import GraphConfig

        groups = cv_groups(train)
        config = GraphConfig()

        def held_out():
            for tr, va in group_splits(len(train.x), groups):
                (src, dst), w = refer_edges(train.x[va], train.x[tr], config)
                yield tr, va, weighted_mean(src, dst, usable_weights(w, dst, len(va)), train.y[tr], len(va))

        self.output_ = LowRankOutput.choose(train.y, groups, held_out() if groups is not None else (), self.ranks,
                                            self.name)
        return self

    def predict(self, graph: SlideGraph) -> np.ndarray:
        if "refer" not in graph.edges:
            raise InputError(f"graph of slide {graph.target} (fold {graph.fold}) has no 'refer' edges")
        src, dst = graph.edges["refer"]
        lonely = graph.n_spot - len(np.unique(dst))
        if lonely:
            raise InputError(f"graph of slide {graph.target} (fold {graph.fold}): {lonely} spots retrieved no reference")
        pred = weighted_mean(src, dst, refer_weights(graph), graph.ref_y, graph.n_spot)
        return pred if self.output_ is None else self.output_(pred)


BASELINES: dict[str, type] = {"mean": MeanBaseline, "ridge": RidgeBaseline, "knn": KnnBaseline}


def make_baseline(name: str) -> Baseline:
    try:
        return BASELINES[name]()
    except KeyError:
        raise InputError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
