"""HEST-1k samples: ``st/<id>.h5ad``, ``wsis/<id>.tif`` (pyramidal), ``metadata/<id>.json``.

HEST-1k stores spot centres in full-resolution WSI pixels (``obsm['spatial']``) and an estimated
pixel size per sample, so a sample needs no manifest values beyond its id and patient.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ...errors import InputError
from ..entry import SlideEntry
from ..slide import Slide
from ._common import existing, require_file
from .h5ad import load_anndata, slide_from_anndata

log = logging.getLogger(__name__)

#: HEST-1k ``st_technology`` (lower case) -> hgc platform
PLATFORMS = {"visium": "visium", "spatial transcriptomics": "st"}
_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")


def read_hest(
    root: str | Path,
    sample_id: str,
    *,
    slide: str | None = None,
    patient: str | None = None,
    image: str | Path | None = None,
    microns_per_pixel: float | None = None,
    coord_scale: float | None = None,
    annotations: str | Path | None = None,
    expression: bool = True,
) -> Slide:
    """Read HEST-1k sample ``sample_id`` from the folder ``root`` (holding st/, wsis/, metadata/).

    Patient: ``patient`` > the metadata's ``patient`` > the sample id. Microns per pixel:
    ``microns_per_pixel`` > ``pixel_size_um_estimated`` (> ``pixel_size_um_embedded``).
    ``expression=False`` leaves the expression matrix unread (see :func:`~hgc.data.readers.h5ad.read_h5ad`).
    """
    root = Path(root)
    name = slide or sample_id
    h5ad = require_file(root / "st" / f"{sample_id}.h5ad", name, "HEST-1k expression file")
    wsi = require_file(
        Path(image) if image else root / "wsis" / f"{sample_id}.tif", name, "HEST-1k whole-slide image"
    )
    meta_file = require_file(root / "metadata" / f"{sample_id}.json", name, "HEST-1k metadata")
    meta = _read_metadata(meta_file, name)

    technology = str(meta.get("st_technology") or "")
    platform = PLATFORMS.get(technology.strip().lower(), "unknown")
    if platform == "unknown":
        log.warning("slide %s: st_technology %r in %s is not a spot platform hgc knows",
                    name, technology, meta_file)
    mpp = microns_per_pixel or _metadata_mpp(meta, meta_file, name)
    result = slide_from_anndata(
        load_anndata(h5ad, name, expression),
        h5ad,
        slide=name,
        patient=patient or _metadata_text(meta.get("patient")) or sample_id,
        image=wsi,
        microns_per_pixel=mpp,
        mpp_source="manifest" if microns_per_pixel else "format",
        coord_scale=coord_scale,
        platform=platform,
        annotations=annotations,
        expression=expression,
    )
    result.source.update(format="hest", image=str(wsi), metadata=str(meta_file))
    return result


def input_files(entry: SlideEntry) -> list[Path]:
    """The files a HEST-1k sample is read from (for content-keyed caches)."""
    root, sample = Path(entry.paths["path"]), entry.extra["id"]
    return existing([root / "st" / f"{sample}.h5ad", root / "wsis" / f"{sample}.tif",
                     root / "metadata" / f"{sample}.json", entry.annotations])


def from_entry(entry: SlideEntry, expression: bool = True) -> Slide:
    """Adapter for ``FORMATS['hest'].read``: column ``path`` (the HEST root) and field ``id``."""
    return read_hest(entry.paths["path"], entry.extra["id"], expression=expression, **entry.reader_keywords())


def _read_metadata(path: Path, slide: str) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise InputError(
            f"slide '{slide}': malformed HEST-1k metadata {path}: {exc} (expected a JSON object)"
        ) from exc
    if not isinstance(meta, dict):
        raise InputError(f"slide '{slide}': malformed HEST-1k metadata {path}: expected a JSON object")
    return meta


def _metadata_mpp(meta: dict, path: Path, slide: str) -> float:
    for key in _MPP_KEYS:
        try:
            value = float(meta.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    raise InputError(
        f"slide '{slide}': {path} has no positive {' or '.join(_MPP_KEYS)}; "
        "give microns_per_pixel (manifest column or argument)"
    )


def _metadata_text(value) -> str | None:
    """A metadata string, or None for JSON null / NaN / empty (HEST leaves unknown patients so)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    text = str(value).strip()
    return text if text and text.lower() not in ("nan", "none", "null") else None
