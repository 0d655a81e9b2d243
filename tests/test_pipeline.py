"""`hgc run`: steps rerun exactly when the content of what they read changes; ids never act as
paths; cheap checks refuse a doomed run before anything is embedded."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, tiny_st_project
from hgc.cli import main
from hgc.errors import InputError
from hgc.evaluate.report import json_safe
from hgc.train.config import FitConfig
from hgc.train.pipeline import run_pipeline

FIT = FitConfig(backend="pyg", device="cpu", epochs=1, patience=None, progress=False, model={"hidden": 8, "layers": 1})
#: Slide and patient ids that look like paths: they must name files inside the run, nothing else.
ODD_IDS = (("a/b", "P/1"), ("..", "P/1"), ("../../escape", "../P2"))


def _run(manifest: Path, out: Path, protocol: str = "patient-kfold", **kw):
    return run_pipeline(manifest, protocol, "top-mean:5", "effnet-lite0", out, fit_config=FIT, device="cpu",
                        progress=False, **kw)


def _steps(caplog) -> dict[str, str]:
    """step -> "running" / "up to date", from the pipeline's log."""
    out = {}
    for rec in caplog.records:
        if rec.name == "hgc.train.pipeline":
            step, _, state = rec.getMessage().partition(": ")
            out[step] = "running" if state.startswith("running") else "up to date"
    return out


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    manifest = tiny_st_project(root / "data", ODD_IDS)
    report = _run(manifest, root / "run")
    return root, report


def test_ids_that_look_like_paths_stay_inside_the_run(odd_run):
    root, report = odd_run
    assert {p.name for p in root.iterdir()} == {"data", "run", ".run.lock"}  # nothing written beside or above
    slides = sorted(s for s, _ in ODD_IDS)
    for method in ("hgc", "ridge", "knn", "mean"):  # every slide scored by every method, none lost
        assert sorted(r["slide"] for r in report["methods"][method]["per_slide"]) == slides
    record = json.loads((root / "run" / "predictions" / "predictions.json").read_text())
    files = [root / "run" / "predictions" / f for by_slide in record["files"].values() for f in by_slide.values()]
    assert len(set(files)) == 12 and all(f.is_file() and f.parent.parent == root / "run" / "predictions" for f in files)
    run = json.loads((root / "run" / "model" / "config.json").read_text())
    assert sorted(run["folds"]) == ["patient-../P2", "patient-P/1"]
    assert sorted(p.name for p in (root / "run" / "model").iterdir() if p.is_dir()) == ["patient-..%2FP2", "patient-P%2F1"]


def test_steps_rerun_when_what_they_read_changes(tmp_path, caplog, monkeypatch):
    manifest = tiny_st_project(tmp_path / "data")
    out = tmp_path / "run"
    first = _run(manifest, out, "slide-loso")
    with caplog.at_level(logging.INFO, logger="hgc"):
        assert json_safe(_run(manifest, out, "slide-loso")) == json_safe(first)
    assert _steps(caplog) == dict.fromkeys(("embed", "graphs", "fit", "predict"), "up to date")

    # A counts file edited in place, with its size and modification time kept: content decides.
    counts = tmp_path / "data" / "slide0" / "slide0.tsv"
    st = counts.stat()
    lines = counts.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[1], cells[2] = cells[2], cells[1]  # swap two genes' counts of one spot
    lines[1] = "\t".join(cells)
    counts.write_text("\n".join(lines) + "\n")
    os.utime(counts, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert counts.stat().st_size == st.st_size and counts.stat().st_mtime_ns == st.st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):
        again = _run(manifest, out, "slide-loso")
    assert _steps(caplog) == dict.fromkeys(("embed", "graphs", "fit", "predict"), "running")
    assert caplog.text.count("embeddings up to date") == 3  # the images did not change: nothing re-embedded
    assert json_safe(again) != json_safe(first)

    # Another data root (the Hist2ST panels would come from there): the steps that read it rerun.
    monkeypatch.setenv("HGC_DATA", str(tmp_path / "elsewhere"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):
        _run(manifest, out, "slide-loso")
    assert _steps(caplog)["embed"] == "running" and _steps(caplog)["graphs"] == "running"

    # An output rewritten by another command is not vouched for: the step that owns it runs again.
    assert CliRunner().invoke(main, ["predict", str(out / "model"), "--graphs", str(out / "graphs.h5"),
                                     "--out", str(out / "predictions"), "--methods", "mean"]).exit_code == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):
        report = _run(manifest, out, "slide-loso")
    assert _steps(caplog)["predict"] == "running" and list(report["methods"]) == ["hgc", "ridge", "knn", "mean"]

    # The same training again writes other checkpoint bytes but the same tensors: predict is reused.
    (out / "model.stamp.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):
        _run(manifest, out, "slide-loso")
    assert _steps(caplog) == {"embed": "up to date", "graphs": "up to date", "fit": "running", "predict": "up to date"}

    # A new hgc whose default model differs (same options on the command line): the model is refitted.
    from hgc.train import presets

    monkeypatch.setitem(presets.PRESETS, "hgc", presets.Preset("changed defaults", model={"gene_rank": 2}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):
        _run(manifest, out, "slide-loso")
    assert _steps(caplog)["fit"] == "running" and _steps(caplog)["graphs"] == "up to date"


@pytest.mark.parametrize("case", ["one patient", "typo in panel", "panel without data genes", "learning rate",
                                  "empty split file", "foreign model folder"])
def test_cheap_checks_refuse_a_run_before_embedding(tmp_path, case):
    manifest = tiny_st_project(tmp_path / "data")
    rows = [line.split("\t") for line in manifest.read_text().splitlines()]
    protocol, genes, extra, needle = "patient-kfold", "top-mean:5", [], ""
    if case == "one patient":
        patient = rows[0].index("patient")
        manifest.write_text("\n".join(["\t".join(rows[0])] + ["\t".join(r[:patient] + ["P1"] + r[patient + 1:])
                                                              for r in rows[1:]]) + "\n")
        needle = "at least two patients"
    elif case == "typo in panel":
        genes, needle = "top-maen:5", "unknown gene panel 'top-maen:5'"
    elif case == "panel without data genes":
        (tmp_path / "mouse.txt").write_text("Actb\nGapdh\n")
        genes, needle = str(tmp_path / "mouse.txt"), "shares no gene with slide"
    elif case == "learning rate":
        extra, needle = ["--lr", "nan"], "must be a finite number > 0, got nan"
    elif case == "empty split file":
        (tmp_path / "split.tsv").write_text("")
        protocol, extra, needle = "split-file", ["--split-file", str(tmp_path / "split.tsv")], "is empty"
    else:  # the run folder's model/ holds something else: refused now, not after embedding and graphs
        (tmp_path / "run" / "model").mkdir(parents=True)
        (tmp_path / "run" / "model" / "notes.txt").write_text("mine")
        needle = "model is a folder that does not hold an hgc run"
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(manifest), "--protocol", protocol, "--genes", genes,
                                       "--encoder", "effnet-lite0", "--out", str(out), "--device", "cpu", *extra])
    assert_one_line_error(result, needle)
    assert not (out / "embeddings.h5").exists() and not (out / "embeddings.h5.parts").exists()


def test_panel_without_data_genes_fails_in_build_graph_too(tmp_path):
    """The same check guards `hgc build-graph` (it used to exit 0 with n/a metrics and MSE 0)."""
    from hgc.data import read_manifest
    from hgc.data.splits import make_folds
    from hgc.graph.build import build_graphs
    from hgc.graph.fold import GraphConfig

    m = read_manifest(tiny_st_project(tmp_path / "data"))
    slides = {s.id: s for s in m.slides()}
    (tmp_path / "mouse.txt").write_text("Actb\n")
    emb = {s: np.ones((v.n_spots, 4), np.float32) for s, v in slides.items()}
    folds = make_folds(m.patients, "slide-loso")
    with pytest.raises(InputError, match="shares no gene with slide"):
        build_graphs(slides, emb, folds, "slide-loso", GraphConfig(genes=str(tmp_path / "mouse.txt")))
