"""Every script in examples/ runs, on the real data where it exists and on a HEST-1k layout the test writes.

The scripts run as a user runs them (a fresh Python process, ``HGC_DATA`` pointing at the data),
with the quick encoder and few epochs; what they write is then checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest

from conftest import REPO
from test_readers_hest_h5ad import write_hest

EXAMPLES = REPO / "examples"
QUICK = ["--encoder", "effnet-lite0", "--epochs", "2"]
#: Each example and the test that runs it (a new script without one fails test_every_example_is_run).
RUN_BY = {
    "her2st_quickstart.py": "test_her2st_quickstart",
    "predict_image_only.py": "test_predict_image_only",
    "visium_sample.py": "test_visium_sample",
    "hest_sample.py": "test_hest_sample",
    "read_outputs.py": "test_read_outputs",
}


def run_example(name: str, *args, shared: Path) -> str:
    env = {**os.environ, "HGC_DATA": str(shared), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def test_every_example_is_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUN_BY)
    assert all(name in globals() for name in RUN_BY.values())


@pytest.fixture(scope="module")
def image_only(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples") / "image-only"
    run_example("predict_image_only.py", "--out", out, *QUICK, shared=shared_data)
    return out


def test_predict_image_only(image_only):
    pred = anndata.read_h5ad(image_only / "pred-b4-image" / "hgc" / "B4.h5ad")
    assert pred.obs["virtual"].all() and pred.n_obs > 100 and pred.n_vars == 785
    assert "observed" not in pred.layers and "spatial" in pred.uns
    assert (image_only / "pred-b4-image" / "tissue" / "B4.png").is_file()
    figures = json.loads((image_only / "figures" / "figures.json").read_text())["files"]
    assert figures == ["B4.png"]  # an image alone: maps, no summary to score


def test_visium_sample(image_only, shared_data, tmp_path):
    folder = shared_data / "visium" / "spaceranger1_tiny"
    out = run_example("visium_sample.py", folder, "--model", image_only / "model-C" / "model" / "all",
                      "--out", tmp_path, shared=shared_data)
    assert "100 spots" in out
    sample = anndata.read_h5ad(tmp_path / "sample.h5ad")
    assert sample.n_obs == 100 and sample.obsm["spatial"].shape == (100, 2)
    pred = anndata.read_h5ad(tmp_path / "pred" / "hgc" / "sample.h5ad")
    assert pred.n_obs == 100 and pred.n_vars == 785 and np.isfinite(pred.X).all()


def test_hest_sample(image_only, shared_data, tmp_path):
    write_hest(tmp_path / "hest", "TENX99")
    out = run_example("hest_sample.py", tmp_path / "hest", "TENX99", "--model",
                      image_only / "model-C" / "model" / "all", "--out", tmp_path / "out", shared=shared_data)
    assert "TENX99 (visium)" in out
    pred = anndata.read_h5ad(tmp_path / "out" / "pred" / "hgc" / "TENX99.h5ad")
    assert pred.n_vars == 785 and np.isfinite(pred.X).all()


def test_read_outputs(image_only, shared_data, tmp_path):
    out = run_example("read_outputs.py", image_only / "pred-b4-image" / "hgc" / "B4.h5ad", "--gene", "FASN",
                      "--figure", tmp_path / "fasn.png", shared=shared_data)
    assert "FASN: predicted mean" in out and "virtual" in out
    assert (tmp_path / "fasn.png").stat().st_size > 10_000


def test_her2st_quickstart(shared_data, tmp_path):
    out = run_example("her2st_quickstart.py", "--out", tmp_path / "run", *QUICK, shared=shared_data)
    assert "| hgc |" in out and "| ridge |" in out and "tumour AUROC" in out
    metrics = json.loads((tmp_path / "run" / "predictions" / "metrics.json").read_text())
    assert metrics["protocol"] == "patient-kfold" and metrics["methods"]["hgc"]["n_slides"] == 6
    assert metrics["biology"]["observed"]["mean"]["signatures"]["TUMOUR_EPITHELIUM"]["auroc"] > 0.75
    figures = json.loads((tmp_path / "run" / "figures" / "figures.json").read_text())["files"]
    assert figures == ["B4.png", "C2.png", "C3.png", "C4.png", "C5.png", "C6.png", "summary.png"]
    out = run_example("read_outputs.py", tmp_path / "run" / "predictions" / "hgc" / "C3.h5ad", shared=shared_data)
    assert "PCC" in out
