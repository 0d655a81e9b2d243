"""Predictions for every test slide of every fold, by the trained model and by the baselines.

Each method writes ``out_dir/<method>/<slide>.h5ad`` through the same writer
(:func:`hgc.evaluate.report.write_prediction`), with the HEG/HVG gene indices chosen on the fold's
training slides, so ``hgc evaluate`` scores all methods alike.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..evaluate.metrics import training_gene_sets
from ..evaluate.report import Prediction, write_prediction
from .baselines import BASELINES, make_baseline, training_set
from .fit import (
    CHECKPOINT,
    FoldData,
    check_leakage,
    load_folds,
    load_model,
    predict_graph,
    read_fold_info,
    resolve_device,
)

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("hgc",) + tuple(BASELINES)


def _check_methods(methods: Sequence[str]) -> list[str]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return list(dict.fromkeys(methods))


def _model_predictions(run_dir: Path, fold: FoldData, backend: str | None, device: str) -> dict[str, np.ndarray]:
    info = read_fold_info(run_dir, fold.name)  # checked before the weights are loaded
    if list(info["genes"]) != list(fold.genes):
        raise InputError(
            f"run {run_dir} fold '{fold.name}' was trained on other genes than the graph store has "
            f"({len(info['genes'])} vs {len(fold.genes)}); predict with the store it was fitted on"
        )
    if sorted(info["test_slides"]) != sorted(fold.test_slides):
        raise InputError(f"run {run_dir} fold '{fold.name}' has test slides {info['test_slides']}, the store {fold.test_slides}")
    model, be, _ = load_model(run_dir, fold.name, backend=backend, device=device)
    return {g.target: predict_graph(model, be.prepare(g, device)) for g in fold.test_graphs}


def predict_fold(
    fold: FoldData,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    run_dir: str | Path | None = None,
    backend: str | None = None,
    device: str = "cpu",
) -> list[Path]:
    """Write every method's prediction for the fold's test slides; return the files written."""
    check_leakage(fold)
    train = training_set(fold.test_graphs)  # the test graphs' references: all training spots
    heg, hvg = training_gene_sets(train.y)
    preds: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        if method == "hgc":
            if run_dir is None:
                raise InputError("method 'hgc' needs the run directory of `hgc fit`")
            if not (Path(run_dir) / fold.name / CHECKPOINT).is_file():
                log.warning("fold %s: run %s has no model for it (no training graph?); no hgc prediction for %s",
                            fold.name, run_dir, fold.test_slides)
                continue
            preds[method] = _model_predictions(Path(run_dir), fold, backend, device)
        else:
            b = make_baseline(method).fit(train)
            preds[method] = {g.target: b.predict(g) for g in fold.test_graphs}
    written = []
    for method, by_slide in preds.items():
        for g in fold.test_graphs:
            written.append(write_prediction(out_dir, Prediction(
                method=method, slide=g.target, fold=fold.name, patient=g.patient, protocol=fold.protocol,
                normalisation=fold.normaliser, genes=np.asarray(fold.genes, dtype=object),
                barcodes=g.spot_barcodes, coords=g.spot_coords, predicted=by_slide[g.target],
                observed=g.spot_y, heg=heg, hvg=hvg, image=g.image, image_scale=g.image_scale,
            )))
    log.info("fold %s: wrote %d prediction files", fold.name, len(written))
    return written


def predict(
    run_dir: str | Path | None,
    graphs_path: str | Path,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    backend: str | None = None,
    device: str = "auto",
) -> list[Path]:
    """Predict every fold's test slides with the trained model (``hgc``) and the baselines."""
    methods = _check_methods(methods)
    device = resolve_device(device)
    folds = load_folds(graphs_path)
    if "hgc" in methods and (run_dir is None or not Path(run_dir).is_dir()):
        raise InputError(f"method 'hgc' needs the run directory written by `hgc fit`; {run_dir} does not exist")
    written = []
    for fold in folds:
        written += predict_fold(fold, out_dir, methods, run_dir, backend, device)
    return written
