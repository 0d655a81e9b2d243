"""The evaluation report of a prediction folder (:mod:`hgc.evaluate.predictions`).

``hgc evaluate`` scores exactly the files the folder's completion record lists, every method by
the same code on the same genes, and writes metrics.json / .csv / .md beside them.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._outputs import command_line, output_lock, write_text
from ..data.slide import label_strings
from ..embed.store import describe_embedding
from ..errors import InputError
from .biology import BiologySettings, slide_biology, summarise_biology
from .metrics import METRIC_KEYS, N_TOP_GENES, SlideMetrics, pooled_pcc, slide_metrics, summarise
from .predictions import Prediction, open_predictions, read_prediction

log = logging.getLogger(__name__)

#: Report order of known methods; others follow alphabetically.
METHOD_ORDER: tuple[str, ...] = ("hgc", "ridge", "knn", "mean")

CONSTANT_GENE_RULE = (
    "a gene whose observed or predicted values are constant on a slide has PCC = NaN; it is "
    "excluded from that slide's average and counted in n_constant"
)


def ordered_methods(methods) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))


def _single(values: set[str], what: str, pred_dir: Path) -> str:
    if len(values) != 1:
        raise InputError(f"predictions in {pred_dir} mix {what}s {sorted(values)}; evaluate one run at a time")
    return next(iter(values))


class SpotLabels:
    """The annotation column of each scored slide: from the prediction file, else the manifest's annotation table."""

    def __init__(self, column: str, manifest=None) -> None:
        self.column, self.manifest = column, manifest
        self._read: dict[str, pd.Series] = {}

    def __call__(self, p: Prediction, path: Path) -> np.ndarray:
        if self.column in p.obs:
            return label_strings(pd.Series(p.obs[self.column]))
        if self.manifest is None or p.slide not in self.manifest.slide_ids:
            where = ("give the manifest with --manifest" if self.manifest is None
                     else f"manifest {self.manifest.path} has no slide '{p.slide}'")
            raise InputError(f"prediction file {path} has no per-spot column '{self.column}' "
                             f"(it has {sorted(p.obs) or 'none'}); {where} to read the slide's annotation table")
        if p.slide not in self._read:  # read each slide's table once, for every method
            table = self.manifest.annotations(p.slide, p.barcodes.astype(str))
            if self.column not in table.columns:
                raise InputError(f"slide '{p.slide}' of manifest {self.manifest.path} has no annotation column "
                                 f"'{self.column}' (its annotation table has {list(table.columns)})")
            self._read[p.slide] = table[self.column]
        column = self._read[p.slide]
        return label_strings(column.reindex(pd.Index(p.barcodes.astype(str))))  # this file's spots, in its order


def _biology_rows(settings: BiologySettings, labels: SpotLabels | None, p: Prediction, path: Path) -> dict[str, Any]:
    row = slide_biology(settings, observed=p.observed, predicted=p.predicted, genes=[str(g) for g in p.genes],
                        labels=None if labels is None else labels(p, path), patient=p.patient)
    return {"slide": p.slide, "fold": p.fold, **row}


def evaluate(pred_dir: str | Path, biology: BiologySettings | None = None, manifest=None) -> dict[str, Any]:
    """Score every method of the prediction folder ``pred_dir``; return the report dict (see :func:`write_report`).

    ``biology`` adds region, tumour and signature checks (:mod:`hgc.evaluate.biology`); their spot
    annotations come from the prediction files, else from ``manifest`` (a :class:`hgc.data.Manifest`).
    """
    pred_dir = Path(pred_dir)
    predictions = open_predictions(pred_dir)
    spaces: set[str] = set()
    protocols: set[str] = set()
    features: dict[str, dict[str, Any]] = {}  # distinct image-feature settings, by their JSON
    report: dict[str, Any] = {"methods": {}}
    labels = SpotLabels(biology.annotation, manifest) if biology and biology.annotation else None
    observed_biology: dict[str, dict[str, Any]] = {}
    for method in ordered_methods(predictions.files):
        rows: list[SlideMetrics] = []
        biology_rows: list[dict[str, Any]] = []
        observed, predicted = [], []
        for slide, path in sorted(predictions.files[method].items()):
            p = read_prediction(path)
            spaces.add(p.space)
            protocols.add(p.protocol)
            features.setdefault(json.dumps(p.features, sort_keys=True), p.features)
            if p.observed is None:
                log.warning("%s: no observed expression for slide %s, not scored", path, p.slide)
                continue
            try:
                rows.append(slide_metrics(p.observed, p.predicted, p.heg, p.hvg, slide=p.slide, fold=p.fold))
            except InputError as exc:
                raise InputError(f"prediction file {path}: {exc}") from None
            observed.append(p.observed)
            predicted.append(p.predicted)
            if biology is not None and biology.active:
                biology_rows.append(_biology_rows(biology, labels, p, path))
                if p.slide not in observed_biology:  # the ceiling: observed scored as if it were a prediction
                    observed_biology[p.slide] = _biology_rows(biology, labels, replace(p, predicted=p.observed), path)
        if not rows:
            log.warning("method %s has no slide with observed expression; skipped", method)
            continue
        mean, std = summarise(rows)
        report["methods"][method] = {
            "per_slide": [r.to_dict() for r in rows],
            "mean": mean,
            "std": std,
            "pooled_pcc": pooled_pcc(observed, predicted),
            "n_slides": len(rows),
        }
        if biology_rows:
            report["methods"][method]["biology"] = {"per_slide": biology_rows, "mean": summarise_biology(biology_rows)}
    if not report["methods"]:
        raise InputError(f"no prediction under {pred_dir} carries observed expression to score against")
    counts = {m: r["n_slides"] for m, r in report["methods"].items()}
    if len(set(counts.values())) > 1:
        log.warning("methods were scored on different numbers of slides (%s): compare them on the slides "
                    "they share (per_slide in metrics.json)", ", ".join(f"{m} {n}" for m, n in counts.items()))
    report["space"] = _single(spaces, "normalisation space", pred_dir)
    report["protocol"] = _single(protocols, "protocol", pred_dir)
    report["n_top_genes"] = N_TOP_GENES
    report["gene_sets"] = "HEG/HVG: top genes by mean/variance of the fold's training slides' normalised expression"
    report["constant_genes"] = CONSTANT_GENE_RULE
    # how the spots' image features were made (encoder, weights, patch settings), when recorded
    report["features"] = [f for f in features.values() if f]
    if biology is not None and observed_biology:
        rows = [observed_biology[s] for s in sorted(observed_biology)]
        report["biology"] = {**biology.describe(), "observed": {"per_slide": rows, "mean": summarise_biology(rows)}}
    return report


def json_safe(obj: Any) -> Any:
    """NaN -> null, so the file is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Mean ± std over slides per method, with the protocol and space named."""
    head = ["method", "PCC-ALL", "PCC-HEG", "PCC-HVG", "MSE", "MAE", "pooled PCC", "slides", "constant genes"]
    lines = [
        f"Protocol: {report['protocol']}; expression space: {report['space']}; "
        f"HEG/HVG: top {report['n_top_genes']} genes chosen on training slides.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in report["methods"].items():
        cells = [name]
        cells += [f"{_fmt(m['mean'][k])} ± {_fmt(m['std'][k])}" for k in METRIC_KEYS]
        n_const = [r["n_constant"] for r in m["per_slide"]]
        n_genes = m["per_slide"][0]["n_genes"]
        cells += [_fmt(m["pooled_pcc"]), str(m["n_slides"]), f"{min(n_const)}–{max(n_const)} of {n_genes}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Constant genes: {report['constant_genes']}."]
    lines += [f"Image features: {describe_embedding(f)}." for f in report.get("features", [])]
    if "biology" in report:
        lines += ["", *biology_table(report)]
    return "\n".join(lines) + "\n"


def biology_table(report: dict[str, Any]) -> list[str]:
    """Means over slides of the biology checks, one row per method and observed (the ceiling)."""
    bio = report["biology"]
    names = list(bio["signatures"])
    head = ["method"] + (["region rank agreement"] if bio["annotation"] else [])
    for n in names:
        head += [f"{n} PCC"] + ([f"{n} tumour AUROC"] if bio["annotation"] else [])
    rows = [("observed", bio["observed"]["mean"], True)]
    rows += [(m, r["biology"]["mean"], False) for m, r in report["methods"].items() if "biology" in r]
    regions = (f"regions from annotation '{bio['annotation']}'"
               + (f" named by {bio['region_map']}" if bio["region_map"] else "")
               + f", tumour = regions matching /{bio['tumour_regions']}/; ") if bio["annotation"] else ""
    lines = [
        f"Biology checks (mean over slides): {regions}signature scores: {bio['signature_score']}. "
        "Observed is the ceiling (its own PCC and rank agreement are 1 by definition).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, mean, ceiling in rows:
        cells = [name]
        if bio["annotation"]:
            cells.append("—" if ceiling else _fmt(mean.get("rank_agreement")))
        for n in names:
            sig = mean["signatures"].get(n, {})
            cells.append("—" if ceiling else _fmt(sig.get("pcc")))
            if bio["annotation"]:
                cells.append(_fmt(sig.get("auroc")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(pred_dir: str | Path, report: dict[str, Any] | None = None,
                 biology: BiologySettings | None = None, manifest=None) -> dict[str, Any]:
    """Evaluate (unless ``report`` is given) and write metrics.json, metrics.csv and metrics.md.

    The three files are written atomically under the prediction folder's lock.
    """
    pred_dir = Path(pred_dir)
    with output_lock(pred_dir, command_line()):
        report = evaluate(pred_dir, biology, manifest) if report is None else report
        fields = ["method"] + list(SlideMetrics.__dataclass_fields__)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for name, m in report["methods"].items():
            for row in m["per_slide"]:
                writer.writerow({"method": name, **row})
        texts = {"metrics.json": json.dumps(json_safe(report), indent=2) + "\n", "metrics.csv": table.getvalue(),
                 "metrics.md": markdown_table(report)}  # all made before any is written
        for name, text in texts.items():
            write_text(pred_dir / name, text)
    log.info("wrote metrics.json, metrics.csv and metrics.md to %s", pred_dir)
    return report
