"""Baselines: mean, ridge (grouped-CV alpha, PCA capped by samples) and kNN retrieval."""
from __future__ import annotations

import numpy as np
import pytest

from graph_factory import make_fold
from hgc.errors import InputError
from hgc.evaluate import pearson_per_gene
from hgc.train.baselines import (
    KnnBaseline,
    LowRankOutput,
    MeanBaseline,
    RidgeBaseline,
    TrainingSet,
    gene_basis,
    make_baseline,
    neighbour_mean,
    project,
    refer_weights,
    spatial_bands,
    training_set,
)


@pytest.fixture(scope="module")
def fold_graphs():
    fold = make_fold(["A1", "A2", "B1", "B2"], ["C1"], name="slide-C1")
    return training_set(fold.bank), fold.graphs("test"), fold.graphs("train")


def test_training_set_is_every_training_spot_once(fold_graphs):
    train, test, train_graphs = fold_graphs
    assert list(dict.fromkeys(train.slides)) == ["A1", "A2", "B1", "B2"]
    np.testing.assert_array_equal(train.y, np.concatenate([g.spot_y for g in train_graphs]))
    np.testing.assert_array_equal(train.x, np.concatenate([g.spot_x for g in train_graphs]))
    np.testing.assert_array_equal(train.x, test[0].ref_x)  # the test graphs' references: the whole bank


def test_mean_baseline_is_training_mean(fold_graphs):
    train, test, train_graphs = fold_graphs
    pred = MeanBaseline().fit(train).predict(test[0])
    expected = np.concatenate([g.spot_y for g in train_graphs]).mean(0)
    assert pred.shape == test[0].spot_y.shape and pred.dtype == np.float32
    np.testing.assert_allclose(pred, np.tile(expected, (test[0].n_spot, 1)), rtol=1e-6)


def test_ridge_learns_and_chooses_alpha_by_grouped_cv(fold_graphs):
    train, test, _ = fold_graphs
    ridge = RidgeBaseline().fit(train)
    assert ridge.alpha_ in ridge.alphas and len(ridge.cv_mse_) == len(ridge.alphas)
    pca = ridge.model_[1]
    assert pca.n_components_ == 16  # min(256, samples, features): the 8-d embedding and its neighbour mean
    pred = ridge.predict(test[0])
    assert np.nanmean(pearson_per_gene(test[0].spot_y, pred)) > 0.5
    # Deterministic: a second fit gives identical predictions.
    np.testing.assert_array_equal(RidgeBaseline().fit(train).predict(test[0]), pred)


def test_ridge_chooses_a_low_gene_rank_for_low_rank_expression():
    """Expression driven by 3 image factors plus heavy gene-wise noise: the held-out PCC of a
    low-rank output beats the full rank, CV sees it, and predictions lie in the chosen span."""
    rng = np.random.default_rng(0)
    n, d, g = 600, 16, 60
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :3] @ rng.normal(size=(3, g)) + 3.0 * rng.normal(size=(n, g))).astype(np.float32)
    slides = np.repeat(["S1", "S2", "S3", "S4"], n // 4)
    ridge = RidgeBaseline(context=False).fit(TrainingSet(x, y, slides))
    out = ridge.output_
    assert set(out.cv_pcc) == {5, 10, 20, 50, None}
    assert out.rank in (5, 10) and out.cv_pcc[out.rank] > out.cv_pcc[None] + 0.01
    class Spots:  # predict reads a graph's spot embeddings only
        spot_x = rng.normal(size=(50, d)).astype(np.float32)

    pred = ridge.predict(Spots())
    centred = pred - out.mean
    inside = centred @ out.basis @ out.basis.T
    np.testing.assert_allclose(centred, inside, atol=1e-4)
    assert out.basis.shape == (g, out.rank)


def test_ridge_with_one_training_slide(fold_graphs):
    """A lone training slide: alpha by cross-validation over bands of its tissue when spot positions
    are known, else the middle of the grid."""
    train, test, _ = fold_graphs
    one = train.slides == "A1"
    ridge = RidgeBaseline().fit(TrainingSet(train.x[one], train.y[one], train.slides[one]))
    assert ridge.alpha_ == float(np.median(ridge.alphas)) and ridge.cv_mse_ == {}
    assert ridge.predict(test[0]).shape == test[0].spot_y.shape
    banded = RidgeBaseline().fit(TrainingSet(train.x[one], train.y[one], train.slides[one], train.coords[one]))
    assert set(banded.cv_mse_) == set(banded.alphas)
    assert banded.alpha_ == min(banded.cv_mse_, key=banded.cv_mse_.get)


def test_neighbour_mean_averages_grid_neighbours_on_the_same_slide():
    xs, ys = np.meshgrid(np.arange(4), np.arange(3))
    grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(float) * 200.0  # a 4 x 3 ST grid, pitch 200 px
    coords = np.concatenate([grid, grid + [5000.0, 0.0]])  # two slides side by side, far apart
    slides = np.repeat(["S1", "S2"], 12)
    x = np.arange(24 * 2, dtype=np.float32).reshape(24, 2)
    nbr = neighbour_mean(x, coords, slides)
    # spot 0 (corner of S1): its 3 grid neighbours (right, below, diagonal), never itself or S2
    np.testing.assert_allclose(nbr[0], x[[1, 4, 5]].mean(0))
    # spot 5 (inside S1): all 8 neighbours
    np.testing.assert_allclose(nbr[5], x[[0, 1, 2, 4, 6, 8, 9, 10]].mean(0))
    np.testing.assert_allclose(nbr[12], x[[13, 16, 17]].mean(0))
    alone = neighbour_mean(x[:1], coords[:1], slides[:1])
    np.testing.assert_array_equal(alone, x[:1])  # no neighbour: the spot itself


def test_ridge_uses_neighbour_features_when_positions_are_known(fold_graphs):
    train, test, _ = fold_graphs
    with_context = RidgeBaseline().fit(train)
    assert with_context.context_ and with_context.model_[0].n_features_in_ == 2 * train.x.shape[1]
    plain = RidgeBaseline(context=False).fit(train)
    assert plain.model_[0].n_features_in_ == train.x.shape[1]
    blind = RidgeBaseline().fit(TrainingSet(train.x, train.y, train.slides))  # a bank without positions
    assert not blind.context_
    assert with_context.predict(test[0]).shape == plain.predict(test[0]).shape == test[0].spot_y.shape


def test_spatial_bands_split_the_longer_side_and_keep_columns_together():
    xs, ys = np.meshgrid(np.arange(20), np.arange(6))  # 20 columns, 6 rows: bands across x
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(float) * 100
    bands = spatial_bands(coords, 5)
    assert sorted(set(bands)) == [0, 1, 2, 3, 4] and np.bincount(bands).tolist() == [24] * 5
    for x in range(20):  # one grid column, one band
        assert len(set(bands[coords[:, 0] == x * 100])) == 1
    assert (np.diff([bands[coords[:, 0] == x * 100][0] for x in range(20)]) >= 0).all()


def test_knn_is_weighted_mean_of_retrieved_refs(fold_graphs):
    train, test, _ = fold_graphs
    g = test[0]
    pred = KnnBaseline(ranks=(None,)).fit(train).predict(g)  # the full gene rank: no projection
    src, dst = g.edges["refer"]
    w = g.edge_weight["refer"]
    spot = 7
    sel = dst == spot
    expected = (w[sel, None] * g.ref_y[src[sel]]).sum(0) / w[sel].sum()
    np.testing.assert_allclose(pred[spot], expected, rtol=1e-5)
    assert np.nanmean(pearson_per_gene(g.spot_y, pred)) > 0.3


def test_knn_chooses_a_low_gene_rank_by_held_out_retrieval(fold_graphs):
    """Low-rank expression plus heavy noise: retrieving held-out slides' spots from the other
    slides' shows that a low-rank output beats the full rank; predictions are then the projected
    retrieval."""
    rng = np.random.default_rng(1)
    n, g = 600, 60
    z = rng.normal(size=(n, 3))
    x = np.concatenate([z, 0.3 * rng.normal(size=(n, 5))], 1).astype(np.float32)
    y = (z @ rng.normal(size=(3, g)) + 3.0 * rng.normal(size=(n, g))).astype(np.float32)
    knn = KnnBaseline().fit(TrainingSet(x, y, np.repeat(["S1", "S2", "S3", "S4"], n // 4)))
    out = knn.output_
    assert set(out.cv_pcc) == {5, 10, 20, 50, None}
    assert out.rank in (5, 10) and out.cv_pcc[out.rank] > out.cv_pcc[None] + 0.01
    _, test, _ = fold_graphs
    graph = test[0]
    plain = KnnBaseline(ranks=(None,)).predict(graph)
    mean, basis = gene_basis(graph.ref_y)
    knn.output_ = LowRankOutput(2, {}, mean, basis[:, :2])
    np.testing.assert_allclose(knn.predict(graph), project(plain, mean, basis[:, :2]), atol=1e-5)


def test_knn_zero_weights_fall_back_to_plain_mean(fold_graphs):
    _, test, _ = fold_graphs
    g = test[0]
    g0 = type(g)(**{**g.__dict__, "edge_weight": {**g.edge_weight, "refer": np.zeros_like(g.edge_weight["refer"])}})
    assert (refer_weights(g0) == 1.0).all()
    src, dst = g.edges["refer"]
    pred = KnnBaseline().predict(g0)
    np.testing.assert_allclose(pred[0], g.ref_y[src[dst == 0]].mean(0), rtol=1e-5)


def test_baseline_errors():
    with pytest.raises(InputError, match="unknown baseline"):
        make_baseline("svm")
