"""Summaries of a manifest's slides, for ``hgc data inspect``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .._progress import progress
from .manifest import load_entry, read_manifest


@dataclass
class SlideSummary:
    slide: str
    patient: str
    format: str
    n_spots: int
    n_genes: int
    microns_per_pixel: float
    mpp_source: str
    image: str
    image_width: int
    image_height: int


def inspect_manifest(path: str | Path, root: str | Path | None = None) -> list[SlideSummary]:
    """Load and validate every slide; image sizes come from headers (no decoding)."""
    manifest = read_manifest(path, root)
    rows = []
    for entry in progress(manifest.entries, desc="reading slides", unit="slide", leave=False):
        slide = load_entry(entry)
        w, h = slide.image.size if slide.image is not None else (0, 0)
        rows.append(
            SlideSummary(
                slide=slide.id,
                patient=slide.patient,
                format=entry.format,
                n_spots=slide.n_spots,
                n_genes=slide.n_genes,
                microns_per_pixel=slide.microns_per_pixel,
                mpp_source=slide.mpp_source,
                image=str(slide.image.path) if slide.image is not None else "",
                image_width=w,
                image_height=h,
            )
        )
    return rows
