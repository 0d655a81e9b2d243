"""Prediction files and the evaluation report built from them.

One ``.h5ad`` per held-out slide per method, at ``PRED_DIR/<method>/<slide>.h5ad``. Everything
needed to score a file travels inside it (observed expression, the training-chosen HEG/HVG gene
indices, the normalisation), so ``hgc evaluate`` needs nothing but the folder and every method --
the model and each baseline -- is scored by the same code on the same genes.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .metrics import METRIC_KEYS, N_TOP_GENES, SlideMetrics, pooled_pcc, slide_metrics, summarise

log = logging.getLogger(__name__)

#: Report order of known methods; others follow alphabetically.
METHOD_ORDER: tuple[str, ...] = ("hgc", "ridge", "knn", "mean")

CONSTANT_GENE_RULE = (
    "a gene whose observed or predicted values are constant on a slide has PCC = NaN; it is "
    "excluded from that slide's average and counted in n_constant"
)


@dataclass
class Prediction:
    """One method's prediction for one slide, with what is needed to score it."""

    method: str
    slide: str
    fold: str
    patient: str
    protocol: str
    normalisation: dict[str, Any]  # the fitted normaliser's to_dict(); "name" names the space
    genes: np.ndarray  # (G,) str
    barcodes: np.ndarray  # (n,) str
    coords: np.ndarray  # (n, 2) float64 pixel (x, y)
    predicted: np.ndarray  # (n, G) float32, normalised space
    observed: np.ndarray | None  # (n, G) float32, same space
    heg: np.ndarray  # gene indices chosen on the fold's training slides
    hvg: np.ndarray
    image: str = ""  # the slide's H&E file, for `hgc plot`
    image_scale: float = 1.0

    @property
    def space(self) -> str:
        return space_name(self.normalisation)


def space_name(normalisation: dict[str, Any]) -> str:
    """The normalised-expression space's name, as reports print it."""
    return str(normalisation.get("name", "unknown"))


def prediction_path(pred_dir: str | Path, method: str, slide: str) -> Path:
    return Path(pred_dir) / method / f"{slide}.h5ad"


def write_prediction(pred_dir: str | Path, p: Prediction) -> Path:
    """Write ``p`` as ``pred_dir/<method>/<slide>.h5ad`` (X = prediction, layers["observed"])."""
    import anndata as ad
    import pandas as pd

    path = prediction_path(pred_dir, p.method, p.slide)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(
        X=np.asarray(p.predicted, dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index([str(b) for b in p.barcodes], name="barcode")),
        var=pd.DataFrame(index=pd.Index([str(g) for g in p.genes], name="gene")),
    )
    if p.observed is not None:
        adata.layers["observed"] = np.asarray(p.observed, dtype=np.float32)
    adata.obsm["spatial"] = np.asarray(p.coords, dtype=np.float64)
    adata.uns.update(
        method=p.method,
        slide=p.slide,
        fold=p.fold,
        patient=p.patient,
        protocol=p.protocol,
        space=p.space,
        # JSON, because h5ad cannot store None or mixed lists a normaliser may carry.
        normalisation=json.dumps(p.normalisation),
        heg=np.asarray(p.heg, dtype=np.int64),
        hvg=np.asarray(p.hvg, dtype=np.int64),
    )
    if p.image:
        adata.uns.update(image=p.image, image_scale=float(p.image_scale))
    adata.write_h5ad(path)
    return path


def read_prediction(path: str | Path) -> Prediction:
    import anndata as ad

    path = Path(path)
    adata = ad.read_h5ad(path)
    uns = adata.uns
    missing = [k for k in ("method", "slide", "fold", "protocol", "normalisation", "heg", "hvg") if k not in uns]
    if missing:
        raise InputError(f"prediction file {path} lacks uns keys {missing}; was it written by `hgc predict`?")
    observed = adata.layers["observed"] if "observed" in adata.layers else None
    return Prediction(
        method=str(uns["method"]),
        slide=str(uns["slide"]),
        fold=str(uns["fold"]),
        patient=str(uns.get("patient", "")),
        protocol=str(uns["protocol"]),
        normalisation=json.loads(str(uns["normalisation"])),
        genes=np.asarray(adata.var_names, dtype=object),
        barcodes=np.asarray(adata.obs_names, dtype=object),
        coords=np.asarray(adata.obsm["spatial"], dtype=np.float64),
        predicted=_dense(adata.X),
        observed=None if observed is None else _dense(observed),
        heg=np.asarray(uns["heg"], dtype=np.int64),
        hvg=np.asarray(uns["hvg"], dtype=np.int64),
        image=str(uns.get("image", "")),
        image_scale=float(uns.get("image_scale", 1.0)),
    )


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _method_dirs(pred_dir: Path) -> list[Path]:
    dirs = [d for d in pred_dir.iterdir() if d.is_dir() and any(d.glob("*.h5ad"))]
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def _single(values: set[str], what: str, pred_dir: Path) -> str:
    if len(values) != 1:
        raise InputError(f"predictions in {pred_dir} mix {what}s {sorted(values)}; evaluate one run at a time")
    return next(iter(values))


def evaluate(pred_dir: str | Path) -> dict[str, Any]:
    """Score every method under ``pred_dir``; return the report dict (see :func:`write_report`)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"prediction folder {pred_dir} does not exist")
    methods = _method_dirs(pred_dir)
    if not methods:
        raise InputError(f"no <method>/<slide>.h5ad prediction files under {pred_dir}")
    spaces: set[str] = set()
    protocols: set[str] = set()
    report: dict[str, Any] = {"methods": {}}
    for mdir in methods:
        rows: list[SlideMetrics] = []
        observed, predicted = [], []
        for path in sorted(mdir.glob("*.h5ad")):
            p = read_prediction(path)
            spaces.add(p.space)
            protocols.add(p.protocol)
            if p.observed is None:
                log.warning("%s: no observed expression for slide %s, not scored", path, p.slide)
                continue
            rows.append(slide_metrics(p.observed, p.predicted, p.heg, p.hvg, slide=p.slide, fold=p.fold))
            observed.append(p.observed)
            predicted.append(p.predicted)
        if not rows:
            log.warning("method %s has no slide with observed expression; skipped", mdir.name)
            continue
        mean, std = summarise(rows)
        report["methods"][mdir.name] = {
            "per_slide": [r.to_dict() for r in rows],
            "mean": mean,
            "std": std,
            "pooled_pcc": pooled_pcc(observed, predicted),
            "n_slides": len(rows),
        }
    if not report["methods"]:
        raise InputError(f"no prediction under {pred_dir} carries observed expression to score against")
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
    """Evaluate (unless ``report`` is given) and write metrics.json, metrics.csv and metrics.md."""
    pred_dir = Path(pred_dir)
    report = evaluate(pred_dir) if report is None else report
    (pred_dir / "metrics.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    fields = ["method"] + list(SlideMetrics.__dataclass_fields__)
    with open(pred_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for name, m in report["methods"].items():
            for row in m["per_slide"]:
                writer.writerow({"method": name, **row})
    (pred_dir / "metrics.md").write_text(markdown_table(report))
    log.info("wrote metrics.json, metrics.csv and metrics.md to %s", pred_dir)
    return report
