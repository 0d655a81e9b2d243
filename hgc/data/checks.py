"""Checks of what readers parse (counts matrices, AnnData layout): every problem is an
:class:`InputError` naming the slide and file. A whole slide is checked by :func:`hgc.data.slide.check_slide`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

if TYPE_CHECKING:
    import anndata


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


def require_spatial(adata: "anndata.AnnData", slide: str) -> None:
    if "spatial" not in adata.obsm:
        raise InputError(
            f"slide '{slide}': the AnnData has no obsm['spatial'] with spot pixel coordinates"
        )
