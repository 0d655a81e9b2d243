"""Tissue detection and virtual spots: spot layouts for slides that come as an image alone.

A model predicts spots; a whole-slide image has none. So the tissue is found on a thumbnail
(:func:`tissue_mask`), and a grid of virtual spots is laid over it in the geometry of the model's
training platform (:class:`SpotGeometry`, :func:`virtual_spots`): legacy ST's 100 µm spots on a
200 µm square grid, or Visium's 55 µm spots on a 100 µm hexagonal grid. Patches then cover the
same tissue area as in training, and ``near`` edges follow the same rule (ST 8-neighbourhood,
Visium hexagonal ring) because virtual spots carry array coordinates like real ones.

Tissue detection (the usual recipe for H&E): the saturation of each thumbnail pixel (tissue is
pink or purple, glass and background grey or white), smoothed over 20 µm, thresholded by Otsu's
method, closed over 100 µm (so fat and loose stroma between stained strands stay tissue), holes
filled, and components smaller than 0.4 x 0.4 mm dropped. A spot is kept when its disc overlaps
the tissue, as a capture spot partly on tissue is "under tissue" on the array. These settings were
checked on the five C sections of her2st (98-100% of their real spots fall on the mask). A user
mask (any image, non-zero = tissue) replaces the detection.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .image import SlideImage
from .slide import SPOT_DIAMETER_UM, SPOT_PITCH_UM, Slide

log = logging.getLogger(__name__)

#: Longest side of the thumbnail the tissue is found on (rounded to a power-of-two downsample).
MASK_MAX_PX = 2048
SMOOTH_UM = 20.0
CLOSE_UM = 100.0
MIN_PIECE_UM = 400.0


@dataclass(frozen=True)
class SpotGeometry:
    """Where virtual spots go: the platform's grid (``st`` square, ``visium`` hexagonal), its pitch
    (centre-to-centre distance) and the spot diameter, in µm."""

    platform: str
    pitch_um: float
    diameter_um: float

    @classmethod
    def of(cls, platform: str, pitch_um: float | None = None, diameter_um: float | None = None) -> "SpotGeometry":
        if platform not in SPOT_PITCH_UM:
            raise InputError(f"virtual spots need a spot geometry: 'st' (square grid) or 'visium' (hexagonal), got "
                             f"'{platform}' (a model trained on mixed or unknown platforms: pass --geometry)")
        pitch = float(pitch_um or SPOT_PITCH_UM[platform])
        diameter = float(diameter_um or SPOT_DIAMETER_UM[platform])
        if not (math.isfinite(pitch) and pitch > 0 and math.isfinite(diameter) and diameter > 0):
            raise InputError(f"spot pitch and diameter must be positive numbers of µm, got {pitch_um}, {diameter_um}")
        return cls(platform, pitch, diameter)


@dataclass
class TissueMask:
    """A boolean thumbnail of the tissue: ``mask[i, j]`` covers file pixels ``[i*step, (i+1)*step)``
    (rows) of the image, whose file pixels are ``image.scale`` per full-resolution pixel."""

    mask: np.ndarray
    step: int
    scale: float
    source: str  # "saturation (Otsu threshold 0.19)" or the user mask's path

    def at(self, coords: np.ndarray) -> np.ndarray:
        """Whether each full-resolution (x, y) lies on tissue."""
        ij = np.floor(np.asarray(coords, dtype=np.float64) * self.scale / self.step).astype(np.int64)
        h, w = self.mask.shape
        ok = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
        out = np.zeros(len(ij), dtype=bool)
        out[ok] = self.mask[ij[ok, 1], ij[ok, 0]]
        return out

    def mask_um(self, microns_per_pixel: float) -> float:
        """Microns per mask pixel."""
        return self.step / self.scale * microns_per_pixel


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    weight = np.cumsum(hist).astype(np.float64)
    mass = np.cumsum(hist * (edges[:-1] + edges[1:]) / 2)
    total, mean = weight[-1], mass[-1]
    between = (mean * weight - mass * total) ** 2 / np.maximum(weight * (total - weight), 1.0)
    return float(edges[int(np.argmax(between)) + 1])


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of the mask (dilation by a disc, through a distance transform, so the
    cost does not depend on the radius)."""
    from scipy import ndimage as ndi

    return ndi.distance_transform_edt(~mask) <= radius if mask.any() else mask


def _shrink(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels farther than ``radius`` from outside the mask (erosion by a disc)."""
    from scipy import ndimage as ndi

    return ndi.distance_transform_edt(mask) > radius


def tissue_mask(image: SlideImage, microns_per_pixel: float, user_mask: str | Path | None = None,
                max_px: int = MASK_MAX_PX) -> TissueMask:
    """Where the tissue of ``image`` is (see the module docstring); an empty result is an InputError."""
    from scipy import ndimage as ndi

    thumb = image.thumbnail(max_px)
    step = image.thumbnail_step(max_px)
    where = f"image {image.path}"
    if user_mask is not None:
        mask = _read_user_mask(Path(user_mask), thumb.shape[:2])
        source = str(user_mask)
    else:
        px = thumb.astype(np.float32)
        hi, lo = px.max(axis=2), px.min(axis=2)
        saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0)
        um = step / image.scale * microns_per_pixel  # µm per thumbnail pixel
        smooth = ndi.gaussian_filter(saturation, sigma=SMOOTH_UM / um)
        threshold = _otsu(smooth)
        mask = _shrink(_grow(smooth > threshold, CLOSE_UM / um), CLOSE_UM / um)  # closing
        mask = ndi.binary_fill_holes(mask)
        labels, n = ndi.label(mask)
        sizes = ndi.sum(mask, labels, np.arange(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= (MIN_PIECE_UM / um) ** 2))
        source = f"saturation above {threshold:.3f} (Otsu)"
    if not mask.any():
        raise InputError(f"no tissue found in {where} ({source}); give a tissue mask image (manifest column "
                         "'mask': non-zero pixels are tissue)")
    log.info("%s: tissue covers %.1f%% of the image (%s)", where, 100 * mask.mean(), source)
    return TissueMask(mask, step, image.scale, source)


def _read_user_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise InputError(f"tissue mask {path} does not exist")
    try:
        with Image.open(path) as im:
            small = im.convert("L").resize((shape[1], shape[0]), Image.NEAREST)
    except Exception as exc:  # PIL raises many types for unreadable files
        raise InputError(f"cannot read tissue mask {path}: {exc}") from None
    return np.asarray(small) > 0


def virtual_spots(slide: Slide, geometry: SpotGeometry, tissue: TissueMask) -> Slide:
    """``slide`` (an image with no spots) with virtual spots on its tissue, in ``geometry``.

    Array coordinates follow the platform's convention so the ``near`` rule applies unchanged:
    legacy ST (x, y) on a square grid, barcodes ``"<x>x<y>"``; Visium (row, col) with columns in
    steps of two, rows offset by one column, barcodes ``"v<row>-<col>"``.
    """
    mpp = slide.microns_per_pixel
    width, height = slide.image.size
    pitch = geometry.pitch_um / mpp
    if geometry.platform == "st":
        cols, rows = np.arange(0, width / pitch), np.arange(0, height / pitch)
        aa, bb = np.meshgrid(cols, rows)  # aa: array x (columns), bb: array y (rows)
        x, y = (aa + 0.5) * pitch, (bb + 0.5) * pitch
        array = np.stack([aa.ravel(), bb.ravel()], axis=1).astype(np.int64)
    else:
        row_px = pitch * math.sqrt(3) / 2
        rows = np.arange(0, height / row_px)
        cols = np.arange(0, 2 * width / pitch)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        keep = (rr + cc) % 2 == 0  # hexagonal: a row's columns have its parity
        rr, cc = rr[keep], cc[keep]
        x, y = (cc + 1) * pitch / 2, (rr + 0.5) * row_px
        array = np.stack([rr, cc], axis=1).astype(np.int64)
    coords = np.stack([np.ravel(x), np.ravel(y)], axis=1)
    inside = (coords[:, 0] < width) & (coords[:, 1] < height)
    # a spot is under tissue when its disc overlaps the tissue: its centre lies within a radius of it
    radius = geometry.diameter_um / 2 / tissue.mask_um(mpp)
    grown = TissueMask(_grow(tissue.mask, radius), tissue.step, tissue.scale, tissue.source)
    keep = inside & grown.at(coords)
    if not keep.any():
        raise InputError(f"slide '{slide.id}': no virtual spot falls on the tissue of {slide.image.path}")
    array = array[keep]
    if geometry.platform == "st":  # legacy ST ids "<x>x<y>" count from 1
        first, second = (array + 1).astype(str).astype(object).T
        barcodes = first + "x" + second
    else:
        first, second = array.astype(str).astype(object).T
        barcodes = "v" + first + "-" + second
    out = Slide(
        id=slide.id, patient=slide.patient, barcodes=barcodes, coords=coords[keep],
        counts=None, genes=np.zeros(0, dtype=object), microns_per_pixel=mpp, mpp_source=slide.mpp_source,
        platform=geometry.platform, image=slide.image, array_coords=array,
        source={**slide.source, "virtual": geometry.platform},
    )
    log.info("slide %s: %d virtual %s spots (pitch %.0f µm) on %.2f mm² of tissue", slide.id, out.n_spots,
             geometry.platform, geometry.pitch_um, tissue.mask.sum() * (tissue.mask_um(mpp) / 1000) ** 2)
    return out


def draw_tissue(slide: Slide, tissue: TissueMask, out: str | Path, max_px: int = 1200) -> Path:
    """A PNG of the slide's thumbnail with the tissue outline and the virtual spots, to check them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .._outputs import atomic_file

    thumb = slide.image.thumbnail(max_px)
    width, height = slide.image.size
    fig = Figure(figsize=(6, 6 * height / max(width, 1)), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(thumb, extent=(0, width, height, 0))
    extent = (0, tissue.mask.shape[1] * tissue.step / tissue.scale, tissue.mask.shape[0] * tissue.step / tissue.scale, 0)
    ax.contour(tissue.mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8, extent=extent, origin="upper")
    ax.scatter(slide.coords[:, 0], slide.coords[:, 1], s=2, c="black", linewidths=0)
    ax.set_title(f"{slide.id}: {slide.n_spots} virtual spots; tissue: {tissue.source}", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    out = Path(out)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
