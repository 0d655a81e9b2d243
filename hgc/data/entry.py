"""One manifest row as readers receive it (its own module: readers and the manifest both need it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SlideEntry:
    """One manifest row, validated and with its paths resolved."""

    slide: str
    patient: str
    format: str
    paths: dict[str, Path]
    microns_per_pixel: float | None = None
    coord_scale: float | None = None
    annotations: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    row: int = 0

    def reader_keywords(self) -> dict[str, Any]:
        """The keywords every reader takes from a manifest row: the slide's id and patient, and
        the manifest's microns per pixel, coordinate scale and annotation file."""
        return {"slide": self.slide, "patient": self.patient, "microns_per_pixel": self.microns_per_pixel,
                "coord_scale": self.coord_scale, "annotations": self.annotations}
