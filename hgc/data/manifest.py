"""Dataset manifests: one table row per slide, telling hgc how to read it.

Columns ``slide``, ``patient``, ``format`` are required; each format names its own file columns
(:data:`FORMAT_COLUMNS`). Relative paths resolve against the manifest's folder, or against the
data root when their first component is a dataset folder that exists there (``her2st/...``),
so one manifest works both beside its data and against a shared data root.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .entry import SlideEntry
from .readers import FORMATS
from .slide import Slide

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide", "patient", "format")

#: Per format: (required path columns, optional path columns).
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "st": (("spots", "image"), ("counts",)),
    "visium": (("path",), ("image",)),
    "hest": (("path",), ()),
    "h5ad": (("path",), ("image",)),
    "image": (("image",), ("mask",)),  # an H&E image alone: spots are laid out on its tissue when predicted
}
#: Non-path columns some formats need.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {"hest": ("id",)}
#: Non-path columns some formats may have.
FORMAT_OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {"image": ("image_reader",)}
OPTIONAL_PATH_COLUMNS = ("annotations",)
OPTIONAL_NUMBER_COLUMNS = ("microns_per_pixel", "coord_scale")


def data_root(explicit: str | Path | None = None) -> Path:
    """Folder holding datasets by name: ``explicit`` > ``$HGC_DATA`` > the per-user cache."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("HGC_DATA")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(cache) / "hgc").resolve()


@dataclass
class Manifest:
    path: Path
    entries: list[SlideEntry]

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide for e in self.entries]

    @property
    def patients(self) -> dict[str, str]:
        return {e.slide: e.patient for e in self.entries}

    def entry(self, slide_id: str) -> SlideEntry:
        for e in self.entries:
            if e.slide == slide_id:
                return e
        raise InputError(f"slide '{slide_id}' is not in manifest {self.path}")

    def load(self, slide_id: str, expression: bool = True) -> Slide:
        """Read and validate one slide (``expression=False``: all but its counts, which stay unparsed)."""
        return load_entry(self.entry(slide_id), expression)

    def annotations(self, slide_id: str, barcodes) -> pd.DataFrame:
        """The slide's annotation table (manifest column ``annotations``) for spots ``barcodes``,
        read alone: no counts, spots or image are parsed."""
        entry = self.entry(slide_id)
        if entry.annotations is None:
            raise InputError(f"slide '{slide_id}' has no annotation table in manifest {self.path} "
                             "(add a column 'annotations' with its path)")
        return FORMATS[entry.format].annotations(entry, np.asarray(barcodes))

    def slides(self) -> Iterator[Slide]:
        for e in self.entries:
            yield load_entry(e)


def load_entry(entry: SlideEntry, expression: bool = True) -> Slide:
    """Read one manifest entry with its format's reader (readers validate what they return)."""
    return FORMATS[entry.format].read(entry, expression)


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Parse and validate a manifest (TSV or CSV with a header); paths must exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment="#")
    except Exception as exc:
        raise InputError(f"cannot parse manifest {path}: {exc}") from exc
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"manifest {path} lacks required column(s) {', '.join(missing)}; "
            f"found columns: {', '.join(table.columns)}"
        )
    if table.empty:
        raise InputError(f"manifest {path} lists no slides")
    root = data_root(root)
    entries = [_entry(row, i + 2, path, root) for i, row in enumerate(table.to_dict("records"))]
    seen: dict[str, SlideEntry] = {}
    for e in entries:
        other = seen.get(e.slide.casefold())
        if other is not None:
            same = "appears twice" if other.slide == e.slide else f"and '{other.slide}' differ only in case"
            raise InputError(
                f"manifest {path}: slide id '{e.slide}' {same} (lines {other.row} and {e.row}); slide ids "
                "must be unique, also ignoring case (they name files, and macOS and Windows ignore case)"
            )
        seen[e.slide.casefold()] = e
    return Manifest(path=path.resolve(), entries=entries)


def _entry(row: dict[str, str], line: int, manifest: Path, root: Path) -> SlideEntry:
    where = f"manifest {manifest}, line {line}"
    slide, patient, fmt = (row["slide"].strip(), row["patient"].strip(), row["format"].strip().lower())
    if not slide:
        raise InputError(f"{where}: empty slide id")
    for what, value in (("slide id", slide), ("patient id", patient)):
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise InputError(f"{where}: {what} {value!r} contains a control character (tab, newline ...); "
                             "use letters, digits and punctuation")
    if not patient:
        raise InputError(f"{where} (slide '{slide}'): empty patient id; every slide needs one for patient-level splits")
    if fmt not in FORMAT_COLUMNS:
        raise InputError(
            f"{where} (slide '{slide}'): unknown format '{fmt}'; expected one of {', '.join(FORMAT_COLUMNS)}"
        )
    required, optional = FORMAT_COLUMNS[fmt]
    paths: dict[str, Path] = {}
    for col in required + optional + OPTIONAL_PATH_COLUMNS:
        value = (row.get(col) or "").strip()
        if not value:
            if col in required:
                raise InputError(f"{where} (slide '{slide}', format {fmt}): column '{col}' is required")
            continue
        paths[col] = _resolve(value, manifest.parent, root, f"{where} (slide '{slide}'), column '{col}'")
    extra = {}
    for col in FORMAT_FIELDS.get(fmt, ()) + FORMAT_OPTIONAL_FIELDS.get(fmt, ()):
        value = (row.get(col) or "").strip()
        if not value and col in FORMAT_FIELDS.get(fmt, ()):
            raise InputError(f"{where} (slide '{slide}', format {fmt}): column '{col}' is required")
        if value:
            extra[col] = value
    numbers = {c: _number(row.get(c, ""), where, slide, c) for c in OPTIONAL_NUMBER_COLUMNS}
    return SlideEntry(
        slide=slide,
        patient=patient,
        format=fmt,
        paths={k: v for k, v in paths.items() if k != "annotations"},
        microns_per_pixel=numbers["microns_per_pixel"],
        coord_scale=numbers["coord_scale"],
        annotations=paths.get("annotations"),
        extra=extra,
        row=line,
    )


def _number(value: str, where: str, slide: str, column: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise InputError(f"{where} (slide '{slide}'): {column} must be a positive number, got '{value}'")
    return number


def _resolve(value: str, base: Path, root: Path, where: str) -> Path:
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, root / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = " or ".join(str(c) for c in candidates)
    hint = ""
    if not p.is_absolute():
        hint = (
            f" (relative paths resolve against the manifest folder or the data root {root}; "
            "set it with --data-root or HGC_DATA, or download the data with 'hgc data fetch')"
        )
    raise InputError(f"{where}: file not found: {tried}{hint}")
