"""Predictions for every test slide of every fold, by the trained model and by the baselines.

Each method's predictions carry the HEG/HVG gene indices chosen on the fold's training slides, so
``hgc evaluate`` scores all methods alike; the prediction folder is written whole
(:func:`hgc.evaluate.predictions.writing_predictions`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .._devices import resolve_device
from ..errors import InputError
from ..evaluate.metrics import training_gene_sets
from ..evaluate.predictions import Prediction, check_prediction_output, writing_predictions
from ..graph.fold import BankGraphs
from ..graph.record import SlideGraph
from .baselines import BASELINES, make_baseline, training_set
from .folds import check_leakage, load_folds
from .inference import load_model, predict_with_spread
from .rundir import Run, open_run

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("hgc",) + tuple(BASELINES)


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` without repeats; unknown or no methods are an InputError."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if not methods:
        raise InputError(f"no method to predict with; choose from {list(METHODS)}")
    return list(dict.fromkeys(methods))


def _model_predictions(run: Run, fold: BankGraphs, graphs: list[SlideGraph], backend: str | None,
                       device: str) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    info = run.fold_info(fold.name)  # checked before the weights are loaded
    if list(info["genes"]) != list(fold.bank.genes):
        raise InputError(
            f"run {run.path} fold '{fold.name}' was trained on other genes than the graph store has "
            f"({len(info['genes'])} vs {len(fold.bank.genes)}); predict with the store it was fitted on"
        )
    if sorted(info["test_slides"]) != sorted(fold.info.test):
        raise InputError(f"run {run.path} fold '{fold.name}' has test slides {info['test_slides']}, the store {fold.info.test}")
    dims = {"spot_dim": graphs[0].spot_x.shape[1], "ref_dim": graphs[0].ref_x.shape[1]}
    if any(info[k] != v for k, v in dims.items()):
        raise InputError(f"run {run.path} fold '{fold.name}' was trained on {info['spot_dim']}-d embeddings, the "
                         f"store has {dims['spot_dim']}-d ones (another encoder?); predict with the store it was fitted on")
    model, be, _ = load_model(run.path, fold.name, backend=backend, device=device)
    return {g.target: predict_with_spread(model, be.prepare(g, device)) for g in graphs}


def predict_fold(
    fold: BankGraphs,
    methods: Sequence[str] = METHODS,
    run: Run | None = None,
    backend: str | None = None,
    device: str = "cpu",
) -> list[Prediction]:
    """Every method's prediction for the fold's test slides (``hgc`` needs the ``run``)."""
    check_leakage(fold)
    graphs = fold.graphs("test")
    if not graphs:
        raise InputError(f"fold '{fold.name}' has no test slide to predict (a model of all its slides: predict new "
                         "slides with `hgc predict MODEL TARGETS`)")
    train = training_set(fold.bank)
    heg, hvg = training_gene_sets(train.y)
    preds: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]] = {}  # method -> slide -> (pred, spread)
    for method in check_methods(methods):
        if method == "hgc":
            if run is None:
                raise InputError("method 'hgc' needs the run folder of `hgc fit`")
            if fold.name in run.skipped:
                log.warning("fold %s: run %s has no model for it (%s); no hgc prediction for %s",
                            fold.name, run.path, run.skipped[fold.name], fold.info.test)
                continue
            preds[method] = _model_predictions(run, fold, graphs, backend, device)
        else:
            b = make_baseline(method).fit(train)
            preds[method] = {g.target: (b.predict(g), None) for g in graphs}
    return [
        Prediction(
            method=method, slide=g.target, fold=fold.name, patient=g.patient, protocol=fold.info.protocol,
            normalisation=fold.bank.normaliser, genes=np.asarray(fold.bank.genes, dtype=object),
            barcodes=g.spot_barcodes, coords=g.spot_coords, predicted=by_slide[g.target][0],
            observed=g.spot_y, heg=heg, hvg=hvg, image=g.image, image_scale=g.image_scale,
            uncertainty=by_slide[g.target][1], features=dict(fold.encoder),
        )
        for method, by_slide in preds.items() for g in graphs
    ]


def _folds_of(run: Run | None, store_folds: list[str], graphs_path: Path) -> list[str]:
    """The store's folds to predict: all of them, or those the run was fitted on."""
    if run is None:
        return store_folds
    known = [*run.folds, *run.skipped]
    foreign = [f for f in known if f not in store_folds]
    if foreign:
        raise InputError(f"run {run.path} was fitted on folds {foreign} that graph store {graphs_path} lacks; "
                         "predict with the store it was fitted on")
    chosen = [f for f in store_folds if f in known]
    if len(chosen) < len(store_folds):
        log.info("run %s covers folds %s of the store; predicting those", run.path, chosen)
    return chosen


def predict(
    run_dir: str | Path | None,
    graphs_path: str | Path,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    backend: str | None = None,
    device: str = "auto",
) -> list[Path]:
    """Predict the test slides of every fold (those of the run, with ``hgc``) into ``out_dir``.

    Every input is checked before the first file is written; ``out_dir`` is replaced whole once
    every prediction is made (see :mod:`hgc.evaluate.predictions`).
    """
    from .._outputs import command_line, output_lock, require_free_space
    from ..graph.store import read_fold_info, summarize
    from ..nn.config import check_backend

    methods = check_methods(methods)
    if backend is not None:
        check_backend(backend)
    device = str(resolve_device(device))
    graphs_path = Path(graphs_path)
    if "hgc" in methods and run_dir is None:
        raise InputError("method 'hgc' needs the run folder written by `hgc fit`")
    # read the run under its shared lock: one training's models, even if a fit into that folder starts
    reading = output_lock(run_dir, command_line(), shared=True) if "hgc" in methods else contextlib.nullcontext()
    with reading:
        run = open_run(run_dir) if "hgc" in methods else None
        infos = {f.name: f for f in read_fold_info(graphs_path)}
        folds = _folds_of(run, list(infos), graphs_path)
        check_prediction_output(out_dir)
        spots = sum(r["n_spot"] * len(infos[r["fold"]].genes) for r in summarize(graphs_path)
                    if r["role"] == "test" and r["fold"] in folds)
        require_free_space(out_dir, spots * 8 * len(methods), "the predictions", one_file=False)
        protocol = next(iter(infos.values())).protocol if infos else ""
        written = []
        with writing_predictions(out_dir, protocol=protocol, methods=methods, graphs=str(graphs_path.resolve()),
                                 run=str(Path(run_dir).resolve()) if run else None, folds=folds) as out:
            for name in folds:
                (fold,) = load_folds(graphs_path, [name])
                preds = predict_fold(fold, methods, run, backend, device)
                written += [out.add(p) for p in preds]
                log.info("fold %s: %d predictions", name, len(preds))
    return [Path(out_dir) / p.relative_to(p.parents[1]) for p in written]
