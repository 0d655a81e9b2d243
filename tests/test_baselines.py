"""Baselines: mean, ridge (grouped-CV alpha, PCA capped by samples) and kNN retrieval."""
from __future__ import annotations

import numpy as np
import pytest

from graph_factory import make_fold
from hgc.errors import InputError
from hgc.evaluate import pearson_per_gene
from hgc.train.baselines import (
    KnnBaseline,
    MeanBaseline,
    RidgeBaseline,
    TrainingSet,
    make_baseline,
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
    assert pca.n_components_ == 8  # min(256, samples, features): capped by the 8-d embedding
    pred = ridge.predict(test[0])
    assert np.nanmean(pearson_per_gene(test[0].spot_y, pred)) > 0.5
    # Deterministic: a second fit gives identical predictions.
    np.testing.assert_array_equal(RidgeBaseline().fit(train).predict(test[0]), pred)


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
    pred = KnnBaseline().fit(train).predict(g)
    src, dst = g.edges["refer"]
    w = g.edge_weight["refer"]
    spot = 7
    sel = dst == spot
    expected = (w[sel, None] * g.ref_y[src[sel]]).sum(0) / w[sel].sum()
    np.testing.assert_allclose(pred[spot], expected, rtol=1e-5)
    assert np.nanmean(pearson_per_gene(g.spot_y, pred)) > 0.3


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
