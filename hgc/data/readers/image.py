"""An H&E image alone (format ``image``): JPEG, PNG, TIFF or a whole-slide image (SVS, NDPI, MRXS,
pyramidal TIFF through OpenSlide), with no spots and no expression.

Such a slide gets its spots when it is predicted: virtual spots on its tissue, in the geometry of
the model's training platform (:mod:`hgc.data.tissue`). Microns per pixel come from the manifest,
else from the file (OpenSlide's ``mpp-x``, TIFF resolution tags); without either it is an error.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ...errors import InputError
from ..entry import SlideEntry
from ..image import SlideImage
from ..slide import Slide
from ._common import existing

log = logging.getLogger(__name__)


def read_image_slide(
    image: str | Path,
    *,
    slide: str,
    patient: str | None = None,
    microns_per_pixel: float | None = None,
    mask: str | Path | None = None,
    reader: str = "auto",
) -> Slide:
    """A slide of an image with no spots yet (see the module docstring)."""
    image = Path(image)
    handle = SlideImage(image, reader=reader)
    width, height = handle.size  # the header is read, the file checked
    if microns_per_pixel:
        mpp, source = float(microns_per_pixel), "manifest"
    else:
        mpp, source = handle.metadata_mpp(), "format"
        if mpp is None:
            raise InputError(
                f"slide '{slide}': image {image} records no microns per pixel (a whole-slide image's mpp, or TIFF "
                "resolution tags); give microns_per_pixel in the manifest"
            )
    if mask is not None and not Path(mask).is_file():
        raise InputError(f"slide '{slide}': tissue mask not found: {mask}")
    log.info("slide %s: image %s, %d x %d px, %.4g µm/px (%s)", slide, image, width, height, mpp, source)
    return Slide(
        id=slide, patient=patient or slide, barcodes=np.zeros(0, dtype=object), coords=np.zeros((0, 2)),
        counts=None, genes=np.zeros(0, dtype=object), microns_per_pixel=mpp, mpp_source=source,
        image=handle, source={"format": "image", "image": str(image), "mask": str(mask) if mask else ""},
    )


def input_files(entry: SlideEntry) -> list[Path]:
    """The files an image slide is read from (for content-keyed caches)."""
    return existing([entry.paths["image"], entry.paths.get("mask")])


def from_entry(entry: SlideEntry, expression: bool = True) -> Slide:
    """Adapter for ``FORMATS['image'].read``: columns ``image``, optional ``mask`` and ``image_reader``
    (an image has no expression to read or skip)."""
    return read_image_slide(
        entry.paths["image"], slide=entry.slide, patient=entry.patient, microns_per_pixel=entry.microns_per_pixel,
        mask=entry.paths.get("mask"), reader=entry.extra.get("image_reader", "auto"),
    )
