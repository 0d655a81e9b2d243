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
from pathlib import Path
from typing import Any

from .._outputs import command_line, output_lock, write_text
from ..errors import InputError
from .metrics import METRIC_KEYS, N_TOP_GENES, SlideMetrics, pooled_pcc, slide_metrics, summarise
from .predictions import open_predictions, read_prediction

log = logging.getLogger(__name__)

#: Report order of known methods; others follow alphabetically.
METHOD_ORDER: tuple[str, ...] = ("hgc", "ridge", "knn", "mean")

CONSTANT_GENE_RULE = (
    "a gene whose observed or predicted values are constant on a slide has PCC = NaN; it is "
    "excluded from that slide's average and counted in n_constant"
)


def _ordered(methods) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))


def _single(values: set[str], what: str, pred_dir: Path) -> str:
    if len(values) != 1:
        raise InputError(f"predictions in {pred_dir} mix {what}s {sorted(values)}; evaluate one run at a time")
    return next(iter(values))


def evaluate(pred_dir: str | Path) -> dict[str, Any]:
    """Score every method of the prediction folder ``pred_dir``; return the report dict (see :func:`write_report`)."""
    pred_dir = Path(pred_dir)
    predictions = open_predictions(pred_dir)
    spaces: set[str] = set()
    protocols: set[str] = set()
    report: dict[str, Any] = {"methods": {}}
    for method in _ordered(predictions.files):
        rows: list[SlideMetrics] = []
        observed, predicted = [], []
        for slide, path in sorted(predictions.files[method].items()):
            p = read_prediction(path)
            spaces.add(p.space)
            protocols.add(p.protocol)
            if p.observed is None:
                log.warning("%s: no observed expression for slide %s, not scored", path, p.slide)
                continue
            try:
                rows.append(slide_metrics(p.observed, p.predicted, p.heg, p.hvg, slide=p.slide, fold=p.fold))
            except InputError as exc:
                raise InputError(f"prediction file {path}: {exc}") from None
            observed.append(p.observed)
            predicted.append(p.predicted)
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
    return "\n".join(lines) + "\n"


def write_report(pred_dir: str | Path, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate (unless ``report`` is given) and write metrics.json, metrics.csv and metrics.md.

    The three files are written atomically under the prediction folder's lock.
    """
    pred_dir = Path(pred_dir)
    with output_lock(pred_dir, command_line()):
        report = evaluate(pred_dir) if report is None else report
        fields = ["method"] + list(SlideMetrics.__dataclass_fields__)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for name, m in report["methods"].items():
            for row in m["per_slide"]:
                writer.writerow({"method": name, **row})
        write_text(pred_dir / "metrics.json", json.dumps(json_safe(report), indent=2) + "\n")
        write_text(pred_dir / "metrics.csv", table.getvalue())
        write_text(pred_dir / "metrics.md", markdown_table(report))
    log.info("wrote metrics.json, metrics.csv and metrics.md to %s", pred_dir)
    return report
