"""The in-memory record of one spatial-transcriptomics slide, whatever format it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .checks import require_spatial
from .image import SlideImage

if TYPE_CHECKING:  # anndata is a core dependency but slow to import; only load it when used
    import anndata

#: Where a slide's microns-per-pixel came from, in order of trust.
MPP_SOURCES = ("manifest", "format", "spot-pitch")

#: Centre-to-centre spot distance by platform, in µm: the last resort for microns per pixel.
SPOT_PITCH_UM = {"st": 200.0, "visium": 100.0}
#: Capture-spot diameter by platform, in µm (drawn spot size; virtual spots of new slides).
SPOT_DIAMETER_UM = {"st": 100.0, "visium": 55.0}


@dataclass(eq=False)
class Slide:
    """One tissue section: spots with positions and (usually) counts, and its H&E image.

    ``coords`` are spot centres as (x, y) in full-resolution image pixels (the space the image
    handle's ``read_region`` takes). ``counts`` is a spots x genes CSR matrix of raw counts, or
    None for a slide with only H&E (to be predicted; ``genes`` is then empty).
    """

    id: str
    patient: str
    barcodes: np.ndarray
    coords: np.ndarray
    counts: sp.csr_matrix | None
    genes: np.ndarray
    microns_per_pixel: float
    mpp_source: str
    platform: str = "unknown"
    image: SlideImage | None = None
    array_coords: np.ndarray | None = None
    annotations: pd.DataFrame | None = None
    source: dict[str, str] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return int(self.barcodes.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.genes.shape[0])

    @property
    def has_expression(self) -> bool:
        return self.counts is not None

    @property
    def needs_spots(self) -> bool:
        """An image alone (manifest format ``image``): spots are laid out on its tissue when predicted."""
        return self.source.get("format") == "image" and self.n_spots == 0

    def require_expression(self, purpose: str) -> sp.csr_matrix:
        """The counts, or an error saying that ``purpose`` (e.g. "training") needs them."""
        if self.counts is None:
            where = self.source.get("spots") or self.source.get("path") or "its manifest row"
            raise InputError(f"slide '{self.id}' has no expression ({where} gives no counts), but {purpose} needs "
                             "its counts; add them to the manifest, or predict the slide instead")
        return self.counts

    def to_anndata(self) -> "anndata.AnnData":
        """AnnData with scanpy conventions: ``obsm['spatial']`` in image pixels, metadata in ``uns``."""
        import anndata

        obs = pd.DataFrame(index=pd.Index(self.barcodes.astype(str), name="barcode"))
        if self.array_coords is not None:
            obs["array_row"] = self.array_coords[:, 0]
            obs["array_col"] = self.array_coords[:, 1]
        if self.annotations is not None:
            ann = self.annotations.reindex(obs.index)
            for col in ann.columns:
                obs[col] = ann[col].to_numpy()
        adata = anndata.AnnData(
            X=(self.counts if self.counts is not None else sp.csr_matrix((self.n_spots, 0))).astype(np.float32),
            obs=obs,
            var=pd.DataFrame(index=pd.Index(self.genes.astype(str), name="gene")),
        )
        adata.obsm["spatial"] = np.asarray(self.coords, dtype=np.float64)
        adata.uns["hgc"] = {
            "slide": self.id,
            "patient": self.patient,
            "platform": self.platform,
            "microns_per_pixel": float(self.microns_per_pixel),
            "mpp_source": self.mpp_source,
            "image_path": str(self.image.path) if self.image is not None else "",
            "image_scale": float(self.image.scale) if self.image is not None else 1.0,
        }
        return adata

    @classmethod
    def from_anndata(
        cls,
        adata: "anndata.AnnData",
        *,
        slide: str | None = None,
        patient: str | None = None,
        image: str | Path | None = None,
        microns_per_pixel: float | None = None,
    ) -> "Slide":
        """Inverse of :meth:`to_anndata`; arguments override what ``adata.uns['hgc']`` records."""
        meta = dict(adata.uns.get("hgc", {}))
        slide = slide or meta.get("slide")
        require_spatial(adata, slide or "<unnamed>")
        image_path = image or meta.get("image_path") or None
        mpp = microns_per_pixel or meta.get("microns_per_pixel")
        obs = adata.obs
        array_coords = None
        if {"array_row", "array_col"} <= set(obs.columns):
            array_coords = obs[["array_row", "array_col"]].to_numpy(dtype=np.int64)
        extra = [c for c in obs.columns if c not in ("array_row", "array_col")]
        return cls(
            id=str(slide),
            patient=str(patient or meta.get("patient") or slide),
            barcodes=np.asarray(adata.obs_names, dtype=object),
            coords=np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2],
            counts=sp.csr_matrix(adata.X) if adata.X is not None else None,
            genes=np.asarray(adata.var_names, dtype=object),
            microns_per_pixel=float(mpp) if mpp else float("nan"),
            mpp_source=meta.get("mpp_source", "manifest") if mpp else "unknown",
            platform=meta.get("platform", "unknown"),
            # a recorded scale belongs to the recorded image, not to one passed in its place
            image=SlideImage(Path(image_path), scale=1.0 if image else float(meta.get("image_scale", 1.0)))
            if image_path
            else None,
            array_coords=array_coords,
            annotations=obs[extra].copy() if extra else None,
        )


def check_slide(slide: Slide) -> None:
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


def label_strings(values: pd.Series) -> np.ndarray:
    """Labels as text: whole numbers without a decimal point (a column with gaps reads as float), gaps as ""."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() == values.notna().sum() and (numeric.dropna() % 1 == 0).all():
        values = numeric.astype("Int64")
    return values.astype(object).where(values.notna(), "").astype(str).to_numpy(dtype=object)
