"""Gene panels: which genes a model predicts, chosen from training slides only.

A panel is resolved once per fold. Published panels (the Hist2ST lists) are files; data-driven
panels (``top-mean:N``, ``hvg:N``) are computed on the fold's training slides so that no statistic
of a test slide influences the gene choice.

Data-driven panels only consider genes measured on *every* training slide (the TRIPLEX
convention): a gene absent from one section cannot be ranked fairly against the others, and the
union with zero fill would favour genes by how many sections happen to report them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .slide import Slide

log = logging.getLogger(__name__)

#: Published panels: spec -> file under ``<data_root>/gene_panels``.
PUBLISHED_PANELS: dict[str, str] = {
    "hist2st-her2st": "her2st_hist2st_785.txt",
    "hist2st-cscc": "cscc_hist2st_171.txt",
}

#: Library size every spot is scaled to before ``log1p`` (scanpy's ``normalize_total`` default).
TARGET_SUM = 1e4


@dataclass(frozen=True)
class GenePanel:
    """An ordered list of gene symbols; column ``j`` of every expression matrix is ``genes[j]``."""

    name: str
    genes: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        if not self.genes:
            raise InputError(f"gene panel '{self.name}' is empty")
        dup = pd.Index(self.genes)
        if not dup.is_unique:
            raise InputError(
                f"gene panel '{self.name}' lists genes more than once: "
                f"{sorted(set(dup[dup.duplicated()]))[:10]}"
            )

    def __len__(self) -> int:
        return len(self.genes)


def panel_file(spec: str, data_root: str | Path | None) -> Path | None:
    """The file a panel ``spec`` is read from (None for data-driven panels); a bad spec is an InputError.

    Checks only the spec, without any slide, so a run can refuse a typo before expensive work.
    """
    spec = str(spec).strip()
    if spec in PUBLISHED_PANELS:
        from .manifest import data_root as default_root

        path = default_root(data_root) / "gene_panels" / PUBLISHED_PANELS[spec]
        if not path.is_file():
            raise InputError(
                f"gene panel '{spec}' expects the file {path}, which does not exist; "
                f"run `hgc data fetch hist2st-panels` to download it"
            )
        return path
    kind, _, num = spec.partition(":")
    if kind in ("top-mean", "hvg") and num:
        if not (num.isdigit() and int(num) > 0):
            raise InputError(f"gene panel '{spec}': N must be a positive integer")
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise InputError(
        f"unknown gene panel '{spec}': expected one of {sorted(PUBLISHED_PANELS)}, "
        "'top-mean:N', 'hvg:N' or the path of a file with one gene symbol per line"
    )


def resolve_panel(spec: str, data_root: str | Path | None, train_slides: Sequence[Slide] = ()) -> GenePanel:
    """Turn a panel ``spec`` into genes.

    ``spec`` is ``hist2st-her2st`` / ``hist2st-cscc`` (files under ``<data_root>/gene_panels``;
    ``data_root`` None means ``$HGC_DATA``, else the per-user cache),
    ``top-mean:N`` (highest mean raw count), ``hvg:N`` (highest variance of log1p-normalised
    expression), or the path of a text file with one symbol per line. Data-driven specs rank the
    genes measured on all ``train_slides`` using their spots only.
    """
    spec = str(spec).strip()
    path = panel_file(spec, data_root)
    if path is not None:
        return GenePanel(spec if spec in PUBLISHED_PANELS else path.stem, _read_symbols(path))
    if not train_slides:
        raise InputError(f"gene panel '{spec}' is chosen on training slides, but none were given")
    kind, _, num = spec.partition(":")
    score = _mean_counts if kind == "top-mean" else _hvg_variance
    return GenePanel(spec, _top_genes(train_slides, int(num), score, spec))


def _read_symbols(path: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read gene panel file {path} ({exc}); expected text, one gene symbol per line") from None
    genes = [ln for ln in lines if ln and not ln.startswith("#")]
    if not genes:
        raise InputError(f"gene panel file {path} lists no genes")
    return genes


def common_genes(slides: Iterable[Slide]) -> list[str]:
    """Genes measured on every slide, in the first slide's order (deterministic)."""
    slides = list(slides)
    common = pd.Index(slides[0].genes.astype(str)).drop_duplicates()
    for s in slides[1:]:
        common = common[common.isin(s.genes.astype(str))]
    return list(common)


def _top_genes(slides: Sequence[Slide], n: int, score, spec: str) -> list[str]:
    genes = common_genes(slides)
    if len(genes) < n:
        raise InputError(
            f"gene panel '{spec}' asks for {n} genes but the training slides "
            f"{[s.id for s in slides]} share only {len(genes)}"
        )
    values = score(slides, genes)
    # Rank by score, ties by gene symbol, so the panel never depends on file column order.
    order = np.lexsort((np.asarray(genes, dtype=str), -values))
    return [genes[i] for i in order[:n]]


def _mean_counts(slides: Sequence[Slide], genes: list[str]) -> np.ndarray:
    total = np.zeros(len(genes))
    n = 0
    for s in slides:
        total += expression_matrix(s, genes)[0].sum(axis=0, dtype=np.float64)
        n += s.n_spots
    return total / max(n, 1)


def _hvg_variance(slides: Sequence[Slide], genes: list[str]) -> np.ndarray:
    blocks = [log1p_normalized(s, genes) for s in slides]
    return np.concatenate(blocks, axis=0).var(axis=0, dtype=np.float64)


def _gene_columns(slide: Slide, genes: Sequence[str]) -> np.ndarray:
    """Column of each gene in ``slide.counts`` (first occurrence of a repeated symbol), -1 if absent."""
    index = pd.Index(slide.genes.astype(str))
    if not index.is_unique:
        keep = ~index.duplicated()
        log.warning("slide %s: %d repeated gene symbols, using the first column of each",
                    slide.id, int((~keep).sum()))
        pos = index[keep].get_indexer(list(genes))
        return np.where(pos >= 0, np.flatnonzero(keep)[pos], -1)
    return index.get_indexer(list(genes))


def expression_matrix(slide: Slide, genes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Raw counts (n, G) float32 of ``genes`` in ``slide``, with absent genes as zero columns.

    Returns the list of absent genes too: callers must report them (see :func:`panel_coverage`).
    """
    counts = slide.require_expression("expression values")
    cols = _gene_columns(slide, genes)
    present = cols >= 0
    out = np.zeros((slide.n_spots, len(genes)), dtype=np.float32)
    if present.any():
        out[:, present] = sp.csr_matrix(counts)[:, cols[present]].toarray()
    missing = [g for g, ok in zip(genes, present) if not ok]
    return out, missing


def library_size(slide: Slide) -> np.ndarray:
    """Total count of each spot over all genes of the slide (not only the panel)."""
    return np.asarray(slide.require_expression("library sizes").sum(axis=1), dtype=np.float64).ravel()


def log1p_normalized(slide: Slide, genes: Sequence[str], target_sum: float = TARGET_SUM) -> np.ndarray:
    """``log1p(counts / library_size * target_sum)`` for ``genes``; empty spots stay 0."""
    raw, _ = expression_matrix(slide, genes)
    lib = library_size(slide)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(raw * scale[:, None]).astype(np.float32)


def check_panel_overlap(panel: GenePanel, slides: Iterable[Slide]) -> None:
    """Refuse a panel that shares no gene with one of ``slides`` (its expression would be all zeros)."""
    for s in slides:
        if s.has_expression and (_gene_columns(s, panel.genes) < 0).all():
            source = s.source.get("counts") or s.source.get("path") or "its counts"
            raise InputError(
                f"gene panel '{panel.name}' ({len(panel)} genes, e.g. {', '.join(panel.genes[:3])}) shares no "
                f"gene with slide '{s.id}' ({source}), whose genes look like {', '.join(map(str, s.genes[:3]))}; "
                "check that both name genes the same way (symbols or Ensembl ids, same species)"
            )


def panel_coverage(panel: GenePanel, slides: Iterable[Slide]) -> dict[str, list[str]]:
    """Genes of ``panel`` missing from each slide (zero-filled downstream); logs one warning per slide."""
    out: dict[str, list[str]] = {}
    for s in (s for s in slides if s.has_expression):
        missing = [g for g, c in zip(panel.genes, _gene_columns(s, panel.genes)) if c < 0]
        out[s.id] = missing
        if missing:
            log.warning("slide %s lacks %d of the %d genes of panel %s (zero-filled): %s%s",
                        s.id, len(missing), len(panel), panel.name, ", ".join(missing[:5]),
                        " ..." if len(missing) > 5 else "")
    return out
