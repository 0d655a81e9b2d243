"""Files from another hgc version, damaged or cut short: one line naming the file and how to rebuild it,
never a traceback, and nothing written by the command that read them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error
from hgc.cli import main

FAST = ["--epochs", "1", "--hidden", "8", "--layers", "1", "--backend", "pyg", "--device", "cpu"]


def _first_fold(f) -> str:
    return next(iter(f["folds"]))


def _graph_edit(kind: str):
    def edit(f):
        fold = _first_fold(f)
        if kind == "version":
            f.attrs["format_version"] = 99
        elif kind == "foreign":
            f.attrs["format"] = "something-else"
        elif kind == "missing dataset":  # a training slide's expression (a test slide may have none)
            del f[f"folds/{fold}/expression/S2"]
        elif kind == "unknown field":
            info = json.loads(f[f"folds/{fold}"].attrs["info"])
            f[f"folds/{fold}"].attrs["info"] = json.dumps({**info, "from_the_future": 1})
        elif kind == "no folds":
            del f.attrs["folds"]
        elif kind == "reordered bank":  # close edges index the bank's spots in its slide order
            pool = f[f"folds/{fold}/pools/bank"]
            pool.attrs["slides"] = json.dumps(json.loads(pool.attrs["slides"])[::-1])
        elif kind == "bad edges":
            target = next(iter(f[f"folds/{fold}/graphs"]))
            near = f[f"folds/{fold}/graphs/{target}/near"]
            near[0, 0] = 10**6
    return edit


GRAPH_CASES = {
    "version": ("format version 99", "build-graph"),
    "foreign": ("not an hgc graph file", ""),
    "missing dataset": ("lacks the embeddings or expression of", "build-graph"),
    "unknown field": ("from_the_future", "build-graph"),
    "no folds": ("damaged or incomplete", "build-graph"),
    "reordered bank": ("not the fold's training slides", "build-graph"),
    "bad edges": ("'near' edges", "build-graph"),
}


@pytest.mark.parametrize("kind", list(GRAPH_CASES))
def test_graph_stores(tmp_path, tiny_run, kind):
    _, run = tiny_run
    graphs = tmp_path / "graphs.h5"
    shutil.copy(run / "graphs.h5", graphs)
    with h5py.File(graphs, "a") as f:
        _graph_edit(kind)(f)
    message, hint = GRAPH_CASES[kind]
    r = CliRunner().invoke(main, ["fit", str(graphs), "--out", str(tmp_path / "model"), *FAST])
    assert_one_line_error(r, str(graphs), message, hint)
    assert not (tmp_path / "model").exists()


def test_truncated_graph_store(tmp_path, tiny_run):
    _, run = tiny_run
    graphs = tmp_path / "graphs.h5"
    graphs.write_bytes((run / "graphs.h5").read_bytes()[:4000])
    assert_one_line_error(CliRunner().invoke(main, ["graph", "inspect", str(graphs)]), str(graphs), "build-graph")


@pytest.mark.parametrize("kind", ["version", "missing dataset", "truncated", "not hdf5"])
def test_embedding_files(tmp_path, tiny_run, kind):
    manifest, run = tiny_run
    emb = tmp_path / "emb.h5"
    if kind in ("truncated", "not hdf5"):
        emb.write_bytes((run / "embeddings.h5").read_bytes()[:3000] if kind == "truncated" else b"just text")
    else:
        shutil.copy(run / "embeddings.h5", emb)
        with h5py.File(emb, "a") as f:
            if kind == "version":
                f.attrs["format_version"] = 7
            else:
                del f["S2/barcodes"]
    needle = {"version": "format version 7", "missing dataset": "lacks barcodes"}.get(kind, "cannot read embedding file")
    r = CliRunner().invoke(main, ["build-graph", str(manifest), "--embeddings", str(emb), "--protocol", "slide-loso",
                                  "--genes", "top-mean:5", "--out", str(tmp_path / "g.h5")])
    assert_one_line_error(r, str(emb), needle, "hgc embed")
    assert not (tmp_path / "g.h5").exists()


def _run_edit(kind: str, model: Path) -> str:
    fold = model / "slide-S1"
    if kind == "truncated checkpoint":
        ck = fold / "model.safetensors"
        ck.write_bytes(ck.read_bytes()[:200])
        return "model.safetensors"
    if kind == "malformed fold.json":
        (fold / "fold.json").write_text("{ not json")
        return "fold.json"
    if kind == "fold.json of another version":
        info = json.loads((fold / "fold.json").read_text())
        del info["spot_dim"]
        (fold / "fold.json").write_text(json.dumps(info))
        return "fold.json"
    if kind == "run of hgc 0.1":
        record = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({"fit": record["fit"], "backend": "pyg"}))
        return "hgc 0.1"
    if kind == "interrupted run":
        (model / "config.json").unlink()
        return "interrupted"
    if kind == "newer run":
        record = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**record, "format_version": 2}))
        return "format version 2"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated checkpoint", "malformed fold.json", "fold.json of another version",
                                  "run of hgc 0.1", "interrupted run", "newer run"])
def test_run_folders(tmp_path, tiny_run, kind):
    _, run = tiny_run
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    needle = _run_edit(kind, model)
    r = CliRunner().invoke(main, ["predict", str(model), "--graphs", str(run / "graphs.h5"), "--out", str(tmp_path / "p")])
    assert_one_line_error(r, needle, "hgc fit")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("kind", ["truncated file", "file missing", "record damaged", "not a prediction"])
def test_prediction_folders(tmp_path, tiny_run, kind):
    _, run = tiny_run
    pred = tmp_path / "pred"
    shutil.copytree(run / "predictions", pred)
    first = next((pred / "knn").glob("*.h5ad"))
    if kind == "truncated file":
        first.write_bytes(first.read_bytes()[:500])
        needle = str(first)
    elif kind == "file missing":
        first.unlink()
        needle = "lacks files its record lists"
    elif kind == "record damaged":
        (pred / "predictions.json").write_text("{")
        needle = "predictions.json"
    else:
        import anndata as ad

        a = ad.read_h5ad(first)
        del a.uns["heg"]
        a.write_h5ad(first)
        needle = "lacks ['heg']"
    before = {p.name for p in pred.iterdir()}
    assert_one_line_error(CliRunner().invoke(main, ["evaluate", str(pred)]), needle, "hgc predict")
    assert {p.name for p in pred.iterdir()} == before
