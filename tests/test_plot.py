"""`hgc plot`: a figure of observed vs predicted expression from a prediction file the test writes."""
from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hgc.cli.plot import register
from hgc.errors import InputError
from hgc.evaluate.predictions import Prediction, writing_predictions
from hgc.plot import find_prediction, plot_prediction

GENES = ["ERBB2", "KRT19", "GENE_C"]


def _prediction(tmp_path, image: bool = True):
    """A 6 x 6 spot grid with a gradient in ERBB2, written as PRED/hgc/S1.h5ad (+ an H&E JPEG)."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(6), np.arange(6))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64) * 40.0 + 30.0
    observed = np.stack([xs.ravel(), ys.ravel(), rng.random(36)], 1).astype(np.float32)
    predicted = observed + 0.3 * rng.random((36, 3)).astype(np.float32)
    pred_dir = tmp_path / "pred"
    p = Prediction(
        method="hgc", slide="S1", fold="f0", patient="P", protocol="slide-loso",
        normalisation={"name": "log1p"}, genes=np.array(GENES, dtype=object),
        barcodes=np.array([f"{a}x{b}" for a, b in zip(xs.ravel(), ys.ravel())], dtype=object),
        coords=coords, predicted=predicted, observed=observed, heg=np.arange(3), hvg=np.arange(3),
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


def _check_png(path, size):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == size
    assert img.std() > 10  # not blank
    return img


def test_plot_file_with_underlay(tmp_path):
    _, path = _prediction(tmp_path)
    out = plot_prediction(path, ["ERBB2", "KRT19"], tmp_path / "fig.png", dpi=50)
    # 2 columns (observed, predicted) x 2 gene rows of 4-inch panels at 50 dpi
    _check_png(out, (400, 400))


def test_cli_plot_folder_and_errors(tmp_path):
    pred_dir, _ = _prediction(tmp_path, image=False)
    group = click.Group()
    register(group)
    runner = CliRunner()
    out = tmp_path / "cli.png"
    res = runner.invoke(group, ["plot", str(pred_dir), "--genes", "ERBB2", "--slide", "S1", "--out", str(out), "--dpi", "40"])
    assert res.exit_code == 0, res.output
    _check_png(out, (320, 160))
    assert find_prediction(pred_dir) == pred_dir / "hgc" / "S1.h5ad"  # the only slide
    with pytest.raises(InputError, match="NOPE"):
        plot_prediction(pred_dir, ["NOPE"], tmp_path / "x.png")
    with pytest.raises(InputError, match="method 'ridge'"):
        find_prediction(pred_dir, method="ridge")
