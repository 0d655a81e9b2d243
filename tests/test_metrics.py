"""Metrics against scipy / numpy references, constant-gene accounting, and the report files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import pearsonr

from hgc.errors import InputError
from hgc.evaluate import (
    Prediction,
    evaluate,
    pearson_per_gene,
    pooled_pcc,
    slide_metrics,
    training_gene_sets,
    write_report,
    writing_predictions,
)


def _pair(seed: int = 0, n: int = 30, g: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.gamma(2.0, 1.0, size=(n, g)).astype(np.float32)
    pred = (0.6 * obs + rng.normal(0, 1, size=(n, g))).astype(np.float32)
    return obs, pred


def test_pearson_matches_scipy():
    obs, pred = _pair()
    r = pearson_per_gene(obs, pred)
    expected = [pearsonr(obs[:, j].astype(float), pred[:, j].astype(float))[0] for j in range(obs.shape[1])]
    np.testing.assert_allclose(r, expected, rtol=1e-10, atol=1e-12)


def test_constant_genes_are_nan_and_counted():
    obs, pred = _pair()
    obs[:, 1] = 3.0  # constant observed
    pred[:, 4] = 0.25  # constant prediction
    pred[:, 5] = np.float32(1.1) + np.float32(1e-9) * np.arange(obs.shape[0], dtype=np.float32)  # round-off only
    r = pearson_per_gene(obs, pred)
    assert np.isnan(r[[1, 4, 5]]).all()
    assert not np.isnan(np.delete(r, [1, 4, 5])).any()
    m = slide_metrics(obs, pred, heg=[0, 1, 2], hvg=[4, 5], slide="s", fold="f")
    assert m.n_genes == 8 and m.n_constant == 3
    assert m.n_constant_heg == 1 and m.n_constant_hvg == 2
    assert m.pcc_all == pytest.approx(np.delete(r, [1, 4, 5]).mean())
    assert m.pcc_heg == pytest.approx(r[[0, 2]].mean())
    assert math.isnan(m.pcc_hvg)  # every HVG constant: undefined, not zero


def test_mse_mae_and_subsets_match_numpy():
    obs, pred = _pair(1)
    m = slide_metrics(obs, pred, heg=[3, 0], hvg=[7], slide="s", fold="f")
    d = pred.astype(np.float64) - obs
    assert m.mse == pytest.approx((d**2).mean())
    assert m.mae == pytest.approx(np.abs(d).mean())
    assert m.pcc_hvg == pytest.approx(pearsonr(obs[:, 7].astype(float), pred[:, 7].astype(float))[0])
    with pytest.raises(InputError):
        slide_metrics(obs, pred, heg=[8], hvg=[0])


def test_training_gene_sets_and_pooled():
    y = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 0.1], [5.0, 5.0, 0.2]])
    heg, hvg = training_gene_sets(y, n=2)
    assert heg.tolist() == [1, 0] and hvg.tolist() == [0, 2]
    a, b = _pair(2), _pair(3)
    pooled = pooled_pcc([a[0], b[0]], [a[1], b[1]])
    ref = pearson_per_gene(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])).mean()
    assert pooled == pytest.approx(ref)


def _prediction(method: str, slide: str, obs, pred, constant: bool = False, protocol: str = "slide-loso"):
    n, g = obs.shape
    return Prediction(
        method=method, slide=slide, fold=f"fold-{slide}", patient="P", protocol=protocol,
        normalisation={"name": "log1p", "target_sum": None}, genes=np.array([f"G{j}" for j in range(g)]),
        barcodes=np.array([f"{i}x{i}" for i in range(n)]), coords=np.arange(2 * n, dtype=float).reshape(n, 2),
        predicted=np.tile(obs.mean(0), (n, 1)) if constant else pred, observed=obs,
        heg=np.arange(3), hvg=np.arange(2, 5),
    )


def _write(folder, predictions) -> None:
    with writing_predictions(folder, protocol="slide-loso") as out:
        for p in predictions:
            out.add(p)


def test_report_files_and_json_keys(tmp_path):
    preds = []
    for k, slide in enumerate(["A1", "B1"]):
        obs, pred = _pair(k)
        preds += [_prediction("ridge", slide, obs, pred), _prediction("mean", slide, obs, pred, constant=True)]
    _write(tmp_path, preds)
    write_report(tmp_path)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["space"] == "log1p" and report["protocol"] == "slide-loso"
    assert list(report["methods"]) == ["ridge", "mean"]
    keys = {"pcc_all", "pcc_heg", "pcc_hvg", "mse", "mae"}
    for m in report["methods"].values():
        assert keys <= set(m["mean"]) and keys <= set(m["std"])
        assert [r["slide"] for r in m["per_slide"]] == ["A1", "B1"]
        for row in m["per_slide"]:
            assert keys | {"slide", "fold", "n_genes", "n_constant"} <= set(row)
    mean_rows = report["methods"]["mean"]["per_slide"]
    assert all(r["n_constant"] == 8 and r["pcc_all"] is None for r in mean_rows)  # NaN -> null
    obs, pred = _pair(0)
    assert report["methods"]["ridge"]["per_slide"][0]["pcc_all"] == pytest.approx(pearson_per_gene(obs, pred).mean())
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5
    md = (tmp_path / "metrics.md").read_text()
    assert "slide-loso" in md and "log1p" in md and "| ridge |" in md


def test_evaluate_refuses_mixed_protocols_and_empty(tmp_path):
    with pytest.raises(InputError, match="not a complete hgc prediction folder"):
        evaluate(tmp_path)
    obs, pred = _pair()
    _write(tmp_path / "mixed", [_prediction("ridge", "A1", obs, pred),
                                _prediction("knn", "A1", obs, pred, protocol="patient-kfold")])
    with pytest.raises(InputError, match="protocol"):
        evaluate(tmp_path / "mixed")
