"""Does a prediction carry the tissue's biology? Region agreement, tumour separation, signature scores.

Accuracy per gene (PCC) says little about whether a map follows the tumour or a pathway. These
checks score each method's prediction and the observed expression the same way, so observed is the
ceiling a method is read against:

* **Region agreement**: per annotated region (e.g. her2st's clusters named through
  ``motivation.csv``), the mean observed and predicted expression of each gene; the regions ranked by
  observed and by predicted mean agree as Spearman's rho per gene, averaged over genes.
* **Tumour separation**: AUROC of a signature's predicted score for tumour against non-tumour
  spots; the same AUROC from observed expression is the ceiling.
* **Signature scores**: per spot, the mean z-score of a set's genes (or, for a weighted signature,
  the weighted sum of their normalised expression); Pearson r of the observed and predicted scores
  across the slide's spots.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..data.genesets import GeneSet, RegionMap, read_gene_set_files, read_region_map
from ..errors import InputError
from .metrics import constant_columns, nan_mean, pearson_per_gene

log = logging.getLogger(__name__)

#: Regions named like this are tumour for tumour separation (her2st names them "cancer 1", "cancer in situ" ...).
TUMOUR_PATTERN = r"cancer|tumou?r|carcinoma|malignan|dcis|idc"
#: Region names that say a spot has no region (left out of every region check).
UNLABELLED = ("", "unknown", "unassigned", "unlabelled", "unlabeled", "na", "nan", "none")
#: A region needs this many spots on a slide to enter region agreement (a mean of 1-2 spots is noise).
MIN_REGION_SPOTS = 5
#: Region agreement needs this many regions on a slide (over two, Spearman's rho is only +-1).
MIN_REGIONS = 3
#: A signature is scored only when at least this many of its genes are among the predicted genes.
MIN_SIGNATURE_GENES = 3


@dataclass
class BiologySettings:
    """What the biology checks are given; recorded in the report beside their numbers."""

    annotation: str | None = None  # per-spot column of the prediction files (from the manifest's annotations)
    region_map: RegionMap | None = None
    tumour_pattern: str = TUMOUR_PATTERN
    signatures: Sequence[GeneSet] = field(default_factory=tuple)
    genes: Sequence[str] = field(default_factory=tuple)  # genes whose region means are listed

    def __post_init__(self) -> None:
        self.tumour_regex = re.compile(self.tumour_pattern, re.IGNORECASE)

    @classmethod
    def from_files(cls, annotation: str | None = None, region_map: str | Path | None = None,
                   signatures: Sequence[str | Path] = (), tumour_pattern: str = TUMOUR_PATTERN,
                   genes: Sequence[str] = ()) -> "BiologySettings":
        """Settings from the files a user names (``hgc evaluate --annotations/--region-map/--signatures``)."""
        if (region_map is not None or genes) and annotation is None:
            what = "a region map names the values of" if region_map is not None else "--genes lists region means of"
            raise InputError(f"{what} an annotation column; name the column with --annotations")
        try:
            re.compile(tumour_pattern)
        except re.error as exc:
            raise InputError(f"--tumour-regions {tumour_pattern!r} is not a regular expression: {exc}") from None
        return cls(annotation=annotation,
                   region_map=read_region_map(region_map, annotation) if region_map is not None and annotation else None,
                   tumour_pattern=tumour_pattern, signatures=tuple(read_gene_set_files(signatures)), genes=tuple(genes))

    @property
    def active(self) -> bool:
        return self.annotation is not None or bool(self.signatures)

    def describe(self) -> dict[str, Any]:
        return {
            "annotation": self.annotation,
            "region_map": self.region_map.source if self.region_map else None,
            "tumour_regions": self.tumour_pattern,
            "min_region_spots": MIN_REGION_SPOTS,
            "signatures": {s.name: {"source": s.source, "n_genes": len(s.genes), "weighted": s.weighted}
                           for s in self.signatures},
            "signature_score": "weighted sum of normalised expression (weighted sets); mean z-score over spots (others)",
            "region_agreement": "Spearman rho between regions ordered by observed and by predicted mean, per gene",
        }


def spearman_per_gene(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho over rows for every column (ties averaged); NaN where a column is constant."""
    from scipy.stats import rankdata

    rho = pearson_per_gene(rankdata(a, axis=0), rankdata(b, axis=0))
    rho[constant_columns(a) | constant_columns(b)] = np.nan  # round-off would otherwise rank as order
    return rho


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` spots (Mann-Whitney U, ties count half)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0 or constant_columns(np.asarray(score)[:, None])[0]:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def signature_scores(expression: np.ndarray, genes: Sequence[str], signature: GeneSet) -> tuple[np.ndarray, int]:
    """Per-spot score of ``signature`` on ``expression`` (spots x genes) and how many of its genes it used."""
    index = {g: j for j, g in enumerate(genes)}
    present = [(index[g], w) for g, w in zip(signature.genes, signature.weights or [1.0] * len(signature.genes))
               if g in index]
    if len(present) < MIN_SIGNATURE_GENES:
        return np.full(expression.shape[0], np.nan), len(present)
    cols = np.array([j for j, _ in present])
    x = np.asarray(expression[:, cols], dtype=np.float64)
    if signature.weighted:
        return x @ np.array([w for _, w in present]), len(present)
    std = x.std(axis=0)
    varies = ~constant_columns(x)[None, :]  # a gene constant but for round-off adds nothing, not unit variance
    z = np.divide(x - x.mean(axis=0), std, out=np.zeros_like(x), where=varies & (std > 0))
    return z.mean(axis=1), len(present)


def _region_agreement(regions: np.ndarray, observed: np.ndarray, predicted: np.ndarray,
                      genes: Sequence[str], listed: Sequence[str]) -> dict[str, Any] | None:
    names, counts = np.unique(regions[regions != ""], return_counts=True)
    names = names[counts >= MIN_REGION_SPOTS]
    if len(names) < MIN_REGIONS:
        return None
    member = regions[None, :] == names[:, None]  # (R, n)
    weight = member / member.sum(axis=1, keepdims=True)
    obs_mean, pred_mean = weight @ observed, weight @ predicted  # (R, G)
    rho = spearman_per_gene(obs_mean, pred_mean)
    index = {g: j for j, g in enumerate(genes)}
    return {
        "regions": {str(n): int(c) for n, c in zip(names, member.sum(axis=1))},
        "rank_agreement": nan_mean(rho),
        "n_genes_ranked": int((~np.isnan(rho)).sum()),
        "genes": {g: {"rank_agreement": float(rho[index[g]]),
                      "observed": dict(zip(map(str, names), obs_mean[:, index[g]].round(4).tolist())),
                      "predicted": dict(zip(map(str, names), pred_mean[:, index[g]].round(4).tolist()))}
                  for g in listed if g in index},
    }


def slide_biology(settings: BiologySettings, *, observed: np.ndarray, predicted: np.ndarray,
                  genes: Sequence[str], labels: np.ndarray | None, patient: str) -> dict[str, Any]:
    """Every check of ``settings`` on one slide's observed and predicted expression."""
    out: dict[str, Any] = {}
    regions = None
    if labels is not None:
        labels = pd.Series(labels, dtype=object).fillna("").astype(str).to_numpy(dtype=object)
        regions = settings.region_map.regions(labels, patient) if settings.region_map else labels
        regions = np.where(np.isin(np.char.lower(regions.astype(str)), UNLABELLED), "", regions).astype(object)
        if settings.region_map is not None and not (regions != "").any() and (labels != "").any():
            log.warning("patient %s: region map %s names none of the labels %s; no region checks for this slide",
                        patient, settings.region_map.source, sorted(set(labels) - {""})[:8])
        out["region_agreement"] = _region_agreement(regions, observed, predicted, genes, settings.genes)
    tumour = None
    if regions is not None:
        named = regions != ""
        names, inverse = np.unique(regions.astype(str), return_inverse=True)
        tumour = np.array([bool(settings.tumour_regex.search(n)) for n in names], dtype=bool)[inverse] & named
        out["tumour_spots"], out["annotated_spots"] = int(tumour.sum()), int(named.sum())
    scores = {}
    for s in settings.signatures:
        obs_score, n_used = signature_scores(observed, genes, s)
        pred_score, _ = signature_scores(predicted, genes, s)
        row: dict[str, Any] = {"n_genes_used": n_used}
        if n_used >= MIN_SIGNATURE_GENES:
            row["pcc"] = float(pearson_per_gene(obs_score[:, None], pred_score[:, None])[0])
            if tumour is not None:
                row["auroc"] = auroc(pred_score[named], tumour[named])
        scores[s.name] = row
    if scores:
        out["signatures"] = scores
    return out


def summarise_biology(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over slides of the per-slide numbers (NaN and absent slides left out)."""
    def mean_of(values) -> float:
        return nan_mean([v for v in values if v is not None])

    out: dict[str, Any] = {}
    agreements = [r["region_agreement"]["rank_agreement"] for r in rows if r.get("region_agreement")]
    if agreements:
        out["rank_agreement"] = mean_of(agreements)
    names = {n for r in rows for n in r.get("signatures", {})}
    out["signatures"] = {}
    for name in sorted(names):
        entries = [r["signatures"][name] for r in rows if name in r.get("signatures", {})]
        out["signatures"][name] = {k: mean_of(e.get(k) for e in entries)
                                   for k in ("pcc", "auroc") if any(k in e for e in entries)}
    return out
