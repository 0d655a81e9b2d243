"""Validation of slides: every problem is an :class:`InputError` naming the slide and file."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

if TYPE_CHECKING:
    import anndata

    from .slide import Slide


def as_raw_counts(matrix, slide: str, path: str | Path, spots=None, genes=None) -> sp.csr_matrix:
    """Spots x genes raw counts as float32 CSR, refusing negative, NaN or fractional values.

    ``spots`` / ``genes`` (row and column names) let the message point at the first bad cell.
    """
    try:
        m = sp.csr_matrix(matrix)
    except (TypeError, ValueError) as exc:
        raise InputError(f"slide '{slide}': counts in {path} are not a numeric matrix ({exc})") from None
    values = m.data
    if values.dtype.kind not in "biuf":
        raise InputError(f"slide '{slide}': counts in {path} are not numeric (type {values.dtype})")
    values = values.astype(np.float64, copy=False)
    problems = [
        (~np.isfinite(values), "NaN, missing or infinite"),
        (values < 0, "negative"),
        (np.isfinite(values) & (values != np.round(values)), "non-integer"),
    ]
    for mask, what in problems:
        if mask.any():
            first = int(np.flatnonzero(mask)[0])
            row = int(np.searchsorted(m.indptr, first, side="right") - 1)
            col = int(m.indices[first])
            spot = f"spot {spots[row]}" if spots is not None else f"spot row {row + 1}"
            gene = f", gene {genes[col]}" if genes is not None else ""
            raise InputError(
                f"slide '{slide}': {path} has {int(mask.sum())} {what} count(s) (first at {spot}{gene}: "
                f"{m.data[first]}); expected raw integer UMI counts, not normalised values"
            )
    m = m.astype(np.float32)
    m.eliminate_zeros()
    return m


def check_slide(slide: "Slide") -> None:
    """Structural checks every reader's output must pass before anything uses it."""
    where = f"slide '{slide.id}'"
    src = slide.source.get("counts") or slide.source.get("path") or "its input files"
    n = slide.n_spots
    if n == 0:
        raise InputError(f"{where}: no spots under tissue were found in {src}")
    if slide.counts is not None and slide.counts.shape != (n, slide.n_genes):
        raise InputError(
            f"{where}: counts matrix is {slide.counts.shape[0]} x {slide.counts.shape[1]} but there are "
            f"{n} spots and {slide.n_genes} genes"
        )
    barcodes = np.asarray(slide.barcodes).astype(str)
    positions = slide.source.get("spots") or slide.source.get("positions") or slide.source.get("path") or src
    if slide.coords.shape != (n, 2):
        raise InputError(f"{where}: {positions} gives spot coordinates of shape {slide.coords.shape}; "
                         f"expected {n} (x, y) pairs")
    unplaced = ~np.isfinite(slide.coords).all(axis=1)
    if unplaced.any():
        i = int(np.argmax(unplaced))
        raise InputError(
            f"{where}: {int(unplaced.sum())} spot(s) have no valid pixel position in {positions}, e.g. spot "
            f"{barcodes[i]} at ({slide.coords[i, 0]}, {slide.coords[i, 1]}); expected finite x and y for every spot"
        )
    uniq, counts = np.unique(barcodes, return_counts=True)
    if (counts > 1).any():
        raise InputError(
            f"{where}: duplicate spot barcode(s) in {src}: {', '.join(uniq[counts > 1][:5])}"
        )
    if not (np.isfinite(slide.microns_per_pixel) and slide.microns_per_pixel > 0):
        raise InputError(f"{where}: microns per pixel is unknown; give microns_per_pixel in the manifest")
    if slide.image is not None:
        width, height = slide.image.size
        outside = (
            (slide.coords[:, 0] < 0) | (slide.coords[:, 1] < 0)
            | (slide.coords[:, 0] >= width) | (slide.coords[:, 1] >= height)
        )
        if outside.any():
            i = int(np.argmax(outside))
            raise InputError(
                f"{where}: {int(outside.sum())} spot centre(s) lie outside the image {slide.image.path} "
                f"({width} x {height} px), e.g. spot {barcodes[i]} at ({slide.coords[i, 0]:.1f}, "
                f"{slide.coords[i, 1]:.1f}); are the coordinates in another pixel space (set coord_scale)?"
            )


def require_spatial(adata: "anndata.AnnData", slide: str) -> None:
    if "spatial" not in adata.obsm:
        raise InputError(
            f"slide '{slide}': the AnnData has no obsm['spatial'] with spot pixel coordinates"
        )
