"""Validation vs test accuracy per fold, hgc beside the ridge baseline: where a model's edge is lost.

Usage (a folder written by ``hgc run`` or ``bench/accuracy.py``)::

    python bench/generalisation.py runs/bench/accuracy-her2st-patient-kfold-effnet-lite1-hist2st-her2st

Each fold's validation slides are training slides held out of training (the ones early stopping
watched); its test slides are the held-out ones. Under ``patient-kfold`` with few patients the
validation slides come from the training patients, so the validation-minus-test gap measures what
is lost across patients. Both methods are scored the same way (per slide): hgc with the saved
checkpoint, ridge fitted on the slides hgc trained on (the fold's training slides less the
validation ones), HEG/HVG chosen on those slides too. Nothing here is chosen on test slides; the
test figures are read from the run's ``predictions/metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from report import fmt, table  # noqa: E402

METRICS = ("pcc_all", "pcc_heg", "pcc_hvg")


def fold_rows(run: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """One row per (fold, slide, split): PCC-ALL/HEG/HVG of hgc and ridge on validation and test slides."""
    from hgc.evaluate.metrics import slide_metrics, training_gene_sets
    from hgc.train.baselines import TrainingSet, make_baseline, training_set
    from hgc.train.folds import load_folds
    from hgc.train.inference import load_model, predict_graph
    from hgc.train.rundir import open_run

    tested = json.loads((run / "predictions" / "metrics.json").read_text())["methods"]
    test = {(m, r["slide"]): r for m in ("hgc", "ridge") for r in tested[m]["per_slide"]}
    rows = []
    models = open_run(run / "model")
    for fold in load_folds(run / "graphs.h5"):
        if fold.name not in models.folds:
            continue
        info = models.fold_info(fold.name)
        model, backend, _ = load_model(run / "model", fold.name, device=device)
        everything = training_set(fold.bank)  # every training slide's spots
        keep = ~np.isin(everything.slides, info["validation_slides"])
        trained_on = TrainingSet(everything.x[keep], everything.y[keep], everything.slides[keep],
                                 None if everything.coords is None else everything.coords[keep])
        heg, hvg = training_gene_sets(trained_on.y)
        ridge = make_baseline("ridge").fit(trained_on) if info["validation_slides"] else None
        for g in (g for g in fold.graphs("train") if g.target in info["validation_slides"]):
            preds = {"hgc": predict_graph(model, backend.prepare(g, device)), "ridge": ridge.predict(g)}
            scores = {m: vars(slide_metrics(g.spot_y, p, heg, hvg)) for m, p in preds.items()}
            rows.append({"fold": fold.name, "slide": g.target, "split": "validation",
                         **{f"{m}_{k}": scores[m][k] for m in preds for k in METRICS}})
        for s in fold.info.test:
            rows.append({"fold": fold.name, "slide": s, "split": "test",
                         **{f"{m}_{k}": test[(m, s)][k] for m in ("hgc", "ridge") for k in METRICS}})
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ["fold", "slide", "split"] + [f"{m} {k.upper().replace('_', '-')}" for k in METRICS for m in ("hgc", "ridge")]
    cells = ([r["fold"], r["slide"], r["split"]] + [_number(r[f"{m}_{k}"]) for k in METRICS for m in ("hgc", "ridge")]
             for r in rows)
    return "\n".join(table(head, cells)) + "\n"


def _number(x: float | None) -> str:
    return fmt(float("nan") if x is None else float(x))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="A run folder (graphs.h5, model/, predictions/metrics.json).")
    p.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    a = p.parse_args(argv)
    rows = fold_rows(a.run)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows), end="")


if __name__ == "__main__":
    main()
