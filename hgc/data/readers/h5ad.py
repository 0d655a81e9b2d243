"""AnnData ``.h5ad`` files with spot pixel coordinates in ``obsm['spatial']`` (scanpy/squidpy
convention, and what :meth:`Slide.to_anndata` writes), so users can bring any preprocessed slide.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import InputError
from ..checks import as_raw_counts
from ..entry import SlideEntry
from ..slide import Slide, check_slide
from ._common import attach_annotations, existing, make_unique, reading, require_file
from .visium import VISIUM_SPOT_DIAMETER_UM

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)


def read_h5ad(
    path: str | Path,
    *,
    slide: str | None = None,
    patient: str | None = None,
    image: str | Path | None = None,
    microns_per_pixel: float | None = None,
    coord_scale: float | None = None,
    annotations: str | Path | None = None,
    expression: bool = True,
) -> Slide:
    """Read an AnnData file of raw counts; arguments override what the file records.

    Without ``slide``/``patient``/``image``/``microns_per_pixel`` the values :meth:`Slide.to_anndata`
    stored in ``uns['hgc']`` are used; microns per pixel also falls back to a scanpy Visium
    ``uns['spatial'][library]['scalefactors']['spot_diameter_fullres']``. ``expression=False``
    leaves ``X`` on disk (spots, positions and metadata only, for embedding).
    """
    path = Path(path)
    name = slide or path.stem
    require_file(path, name, "AnnData file")
    if image is not None:
        require_file(Path(image), name, "image")
    return slide_from_anndata(
        load_anndata(path, name, expression),
        path,
        slide=slide,
        patient=patient,
        image=image,
        microns_per_pixel=microns_per_pixel,
        mpp_source="manifest",
        coord_scale=coord_scale,
        annotations=annotations,
        expression=expression,
    )


def input_files(entry: SlideEntry) -> list[Path]:
    """The files an AnnData slide is read from (for content-keyed caches)."""
    return existing([entry.paths["path"], entry.paths.get("image"), entry.annotations])


def from_entry(entry: SlideEntry, expression: bool = True) -> Slide:
    """Adapter for ``FORMATS['h5ad'].read``: manifest columns ``path`` and optional ``image``."""
    return read_h5ad(entry.paths["path"], image=entry.paths.get("image"), expression=expression,
                     **entry.reader_keywords())


def load_anndata(path: Path, slide: str, expression: bool = True) -> "anndata.AnnData":
    """The AnnData of ``path``; without ``expression`` only its spots (obs, obsm, uns), ``X``
    and ``var`` left unread."""
    import anndata

    try:
        with warnings.catch_warnings():  # repeated symbols are made unique (and logged) later
            warnings.filterwarnings("ignore", message="Variable names are not unique")
            if expression:
                return anndata.read_h5ad(path)
            backed = anndata.read_h5ad(path, backed="r")
            try:
                return anndata.AnnData(obs=backed.obs.copy(), obsm={k: np.asarray(v) for k, v in backed.obsm.items()},
                                       uns=dict(backed.uns))
            finally:
                backed.file.close()
    except Exception as exc:  # h5py/anndata raise many types for a file that is not AnnData
        raise InputError(
            f"slide '{slide}': cannot read {path} as AnnData (expected an .h5ad file): {exc}"
        ) from exc


def slide_from_anndata(
    adata: "anndata.AnnData",
    path: Path,
    *,
    slide: str | None,
    patient: str | None,
    image: str | Path | None,
    microns_per_pixel: float | None,
    mpp_source: str,
    coord_scale: float | None,
    platform: str | None = None,
    annotations: str | Path | None = None,
    expression: bool = True,
) -> Slide:
    """:meth:`Slide.from_anndata` plus what a file reader adds: the file named in errors, raw-count
    validation, unique gene symbols, coordinate scaling, a microns-per-pixel fallback, annotations
    and :func:`check_slide`."""
    name = slide or str(adata.uns.get("hgc", {}).get("slide") or path.stem)
    spatial = adata.obsm.get("spatial")
    if spatial is not None:
        values = np.asarray(spatial)
        if values.dtype.kind not in "biuf" or values.ndim != 2 or values.shape[1] < 2:
            raise InputError(f"slide '{name}': obsm['spatial'] of {path} is not a numeric (spots x 2) array of "
                             f"pixel coordinates (found {values.dtype} {values.shape})")
    try:
        with reading(path, name, "AnnData", errors=(TypeError, ValueError, KeyError)):
            result = Slide.from_anndata(
                adata, slide=name, patient=patient, image=image, microns_per_pixel=microns_per_pixel
            )
    except InputError as exc:
        raise InputError(f"{exc} (in {path})" if str(path) not in str(exc) else str(exc)) from None
    if result.counts is not None:
        result.counts = as_raw_counts(result.counts, result.id, path, spots=result.barcodes, genes=result.genes)
        result.genes = make_unique(result.genes, result.id, path)
    else:
        if expression:
            log.info("slide %s: %s has no X: spots and image only, no expression", result.id, path)
        result.genes = np.zeros(0, dtype=object)
    if coord_scale:
        result.coords = result.coords * float(coord_scale)
    if platform:
        result.platform = platform
    if microns_per_pixel:
        result.mpp_source = mpp_source
    elif not math.isfinite(result.microns_per_pixel):
        result.microns_per_pixel = _mpp_from_scanpy(adata, coord_scale, result.id, path)
        result.mpp_source = "format"
        if result.platform == "unknown":  # only Visium records a spot diameter
            result.platform = "visium"
    result.source = {"format": "h5ad", "path": str(path), "counts": str(path) if result.counts is not None else ""}
    if result.image is not None:
        result.source["image"] = str(result.image.path)
    if annotations is not None:
        attach_annotations(result, Path(annotations))
    check_slide(result)
    return result


def _mpp_from_scanpy(adata, coord_scale: float | None, slide: str, path: Path) -> float:
    """Microns per pixel from a scanpy Visium ``uns['spatial']`` entry, else a clear error."""
    libraries = adata.uns.get("spatial", {})
    for library in libraries.values() if isinstance(libraries, dict) else ():
        diameter = library.get("scalefactors", {}).get("spot_diameter_fullres")
        if diameter is not None and np.isfinite(diameter) and diameter > 0:
            return VISIUM_SPOT_DIAMETER_UM / (float(diameter) * (coord_scale or 1.0))
    raise InputError(
        f"slide '{slide}': {path} records no microns per pixel (no uns['hgc'] or scanpy Visium "
        "scalefactors); give microns_per_pixel (manifest column or argument)"
    )
