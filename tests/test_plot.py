"""`hgc plot`: gene maps from prediction files the tests write and from a real her2st prediction folder."""
from __future__ import annotations

import json
import shutil

import anndata
import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import assert_one_line_error
from hgc.cli import main
from hgc.cli.plot import register
from hgc.errors import InputError
from hgc.evaluate.metrics import pearson_per_gene
from hgc.evaluate.predictions import Prediction, read_prediction, writing_predictions
from hgc.plot import find_prediction, plot_prediction, plot_run
from hgc.plot.maps import choose_genes, read_plot_input, spot_pitch
from hgc.plot.summary import read_scores

GENES = ["ERBB2", "KRT19", "GENE_C"]


def _prediction(tmp_path, image: bool = True, observed: bool = True, spatial: dict | None = None):
    """A 6 x 6 spot grid (40 px pitch) with a gradient in ERBB2, written as PRED/hgc/S1.h5ad (+ an H&E JPEG)."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(6), np.arange(6))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64) * 40.0 + 30.0
    obs = np.stack([xs.ravel(), ys.ravel(), rng.random(36)], 1).astype(np.float32)
    predicted = obs + 0.3 * rng.random((36, 3)).astype(np.float32)
    pred_dir = tmp_path / "pred"
    p = Prediction(
        method="hgc", slide="S1", fold="f0", patient="P", protocol="slide-loso",
        normalisation={"name": "log1p"}, genes=np.array(GENES, dtype=object),
        barcodes=np.array([f"{a}x{b}" for a, b in zip(xs.ravel(), ys.ravel())], dtype=object),
        coords=coords, predicted=predicted, observed=obs if observed else None, heg=np.arange(3), hvg=np.arange(3),
        spatial=spatial,
    )
    with writing_predictions(pred_dir, protocol="slide-loso") as out:
        out.add(p)
    path = pred_dir / "hgc" / "S1.h5ad"
    if image:
        import anndata as ad

        jpg = tmp_path / "he.jpg"
        Image.fromarray(rng.integers(150, 255, (150, 150, 3), dtype=np.uint8)).save(jpg)
        adata = ad.read_h5ad(path)
        adata.uns["image"] = str(jpg)
        adata.uns["image_scale"] = 0.5  # the JPEG is half the full-resolution size
        adata.write_h5ad(path)
    return pred_dir, path


def _check_png(path, width_in: float, dpi: int):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] == pytest.approx(width_in * dpi, abs=2)
    assert img.std() > 10  # not blank
    return img


def test_plot_file_with_underlay(tmp_path):
    _, path = _prediction(tmp_path)
    out = plot_prediction(path, ["ERBB2", "KRT19"], tmp_path / "fig.png", dpi=50)
    # observed, predicted and a colour bar: 2 panels of 2.6 in + 0.9 in
    img = _check_png(out, 2 * 2.6 + 0.9, 50)
    one_row = np.asarray(Image.open(plot_prediction(path, ["ERBB2"], tmp_path / "one.png", dpi=50)))
    assert img.shape[0] > 1.7 * one_row.shape[0]  # one row per gene


def test_gene_rows_best_worst_and_asked(tmp_path):
    _, path = _prediction(tmp_path, image=False)
    data = read_plot_input(path)
    r = pearson_per_gene(data.observed, data.predicted)
    best, middle, worst = (GENES[j] for j in np.argsort(-r))
    assert choose_genes(data, [middle], best=1, worst=1) == [(best, "best"), (worst, "worst"), (middle, "asked for")]
    assert choose_genes(data, [worst], best=1, worst=1) == [(best, "best"), (worst, "asked for")]  # drawn once
    with pytest.raises(InputError, match="NOPE"):
        choose_genes(data, ["NOPE"])


def test_spots_at_their_recorded_size(tmp_path):
    _, path = _prediction(tmp_path / "a", image=False)
    assert read_plot_input(path).spot_diameter() == pytest.approx(0.5 * 40.0)  # half the pitch
    assert spot_pitch(read_plot_input(path).coords) == pytest.approx(40.0)
    spatial = {"images": {"hires": np.full((120, 120, 3), 200, np.uint8)},
               "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 33.0}, "metadata": {}}
    _, path = _prediction(tmp_path / "b", image=False, spatial=spatial)
    data = read_plot_input(path)
    assert data.spot_diameter() == 33.0
    assert data.spatial["images"]["hires"].shape == (120, 120, 3)


def test_unobserved_slide_gets_predicted_maps_only(tmp_path):
    pred_dir, path = _prediction(tmp_path, image=False, observed=False)
    data = read_plot_input(path)
    rows = choose_genes(data, [], best=2, worst=2)
    spread = data.predicted.std(axis=0)
    assert [g for g, _ in rows] == [GENES[j] for j in np.argsort(-spread)[:2]]
    out = plot_prediction(path, [], tmp_path / "pred.png", best=2, dpi=40)
    _check_png(out, 2.6 + 0.9, 40)  # one panel and its colour bar
    files = plot_run([pred_dir], tmp_path / "figs", dpi=40)
    assert [f.name for f in files] == ["S1.png"]  # no observed expression: no summary


def test_cli_plot_file_folder_and_errors(tmp_path):
    pred_dir, path = _prediction(tmp_path, image=False)
    group = click.Group()
    register(group)
    runner = CliRunner()
    res = runner.invoke(group, ["plot", str(path), "--genes", "ERBB2", "--best", "0", "--worst", "0",
                                "--out", str(tmp_path / "cli.png"), "--dpi", "40"])
    assert res.exit_code == 0, res.output
    _check_png(tmp_path / "cli.png", 2 * 2.6 + 0.9, 40)
    res = runner.invoke(group, ["plot", str(pred_dir), "--slide", "S1", "--out", str(tmp_path / "one.png"), "--dpi", "40"])
    assert res.exit_code == 0, res.output
    _check_png(tmp_path / "one.png", 2 * 2.6 + 0.9, 40)  # a folder and one slide: one figure file
    assert find_prediction(pred_dir) == pred_dir / "hgc" / "S1.h5ad"  # the only slide
    with pytest.raises(InputError, match="method 'ridge'"):
        find_prediction(pred_dir, method="ridge")
    res = runner.invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "figs")])
    assert_one_line_error(res, str(tmp_path), "neither a prediction folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    res = runner.invoke(main, ["plot", str(pred_dir), str(pred_dir), "--out", str(tmp_path / "two.png")])
    assert_one_line_error(res, "is one figure")
    res = runner.invoke(main, ["plot", str(pred_dir), "--out", str(tmp_path / "mine")])
    assert_one_line_error(res, "does not hold an hgc figure folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_run_figures_of_real_her2st_predictions(her2st_predictions, tmp_path):
    """Per-slide maps and the summary for the six sections; a rerun replaces them and keeps a user's file."""
    out = tmp_path / "figs"
    files = plot_run([her2st_predictions], out, method="knn", genes=["MUCL1"], best=2, worst=1, dpi=40)
    slides = ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert [f.name for f in files] == [f"{s}.png" for s in slides] + ["summary.png"]
    record = json.loads((out / "figures.json").read_text())
    assert record["method"] == "knn" and record["files"] == [f.name for f in files]
    b4 = np.asarray(Image.open(out / "B4.png").convert("RGB"))
    assert b4.shape[1] == pytest.approx((2 * 2.6 + 0.9) * 40, abs=2) and b4.std() > 20
    (out / "notes.txt").write_text("mine")
    (out / "C2.png").unlink()  # a damaged folder: the rerun writes it whole again
    plot_run([her2st_predictions], out, method="ridge", slides=["B4"], best=1, worst=0, dpi=40)
    assert sorted(p.name for p in out.iterdir()) == ["B4.png", "figures.json", "notes.txt", "summary.png"]
    one_row = np.asarray(Image.open(out / "B4.png"))
    assert b4.shape[0] > 3 * one_row.shape[0]  # 4 rows (2 best, 1 worst, MUCL1) against 1


def test_summary_over_seeds(her2st_predictions, tmp_path):
    """Two prediction folders are two seeds: each slide's PCC is kept per seed; the figure draws."""
    second = tmp_path / "seed1"
    shutil.copytree(her2st_predictions, second)
    other = anndata.read_h5ad(second / "knn" / "B4.h5ad")  # another seed: other predictions
    other.X = other.X + np.random.default_rng(3).normal(0, 0.3, other.X.shape).astype(np.float32)
    other.write_h5ad(second / "knn" / "B4.h5ad")
    scores = read_scores([her2st_predictions, second])
    assert scores.protocol == "patient-kfold" and scores.slides == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert scores.methods == ["ridge", "knn", "mean"]
    for seed, folder in zip(scores.pcc["knn"]["B4"], [her2st_predictions, second]):
        p = read_prediction(folder / "knn" / "B4.h5ad")
        np.testing.assert_allclose(seed, pearson_per_gene(p.observed, p.predicted))
    assert np.nanmean(scores.pcc["knn"]["B4"][0]) > np.nanmean(scores.pcc["knn"]["B4"][1])  # noise costs PCC
    assert np.isnan(scores.pcc["mean"]["C3"][0]).all()  # a constant prediction has no PCC
    files = plot_run([her2st_predictions, second], tmp_path / "figs", method="ridge", slides=["C2"], dpi=40)
    summary = np.asarray(Image.open(files[-1]).convert("RGB"))
    assert files[-1].name == "summary.png" and summary.std() > 20
