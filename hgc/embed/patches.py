"""Spot patches: a fixed physical field of view around every spot, resampled to the encoder input.

The field of view is set in micrometres (default: the encoder's input size at 0.5 µm/px, so
112 µm for 224 px), converted to pixels with each slide's microns per pixel, so slides scanned at
0.5, 0.7 or 3 µm/px give patches of the same tissue area. A model trained on sharp slides and
applied to a coarser one sees blurrier patches than it learnt from; a working resolution
(``PatchSpec.mpp``, e.g. the coarsest slide's) brings every patch down to it first, so training and
target slides look alike. Spots near the border are padded with
white, never dropped or shifted. Each slide image is decoded once and patches are array slices of
it; a tiled whole-slide TIFF is not decoded at all, each patch decodes the tiles under it. Patches
are resampled a batch at a time (bilinear with antialiasing, deterministic on CPU).

Two costlier views of each spot are options (:class:`PatchViews`): wider fields of view around it
(context), whose embeddings are concatenated after the spot's own, and test-time augmentation,
the mean embedding over rotations (and mirror images) of each patch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..data.image import crop_padded
from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..data.image import SlideImage
    from ..data.slide import Slide

log = logging.getLogger(__name__)

#: Float32 bytes that resampling holds at once: wide crops (context fields of view) go in slices.
_RESAMPLE_BYTES = 256 << 20
#: Microns per pixel at which encoders' input sizes define the default field of view.
DEFAULT_MPP = 0.5
RESAMPLE = "bilinear-antialias"
WHITE = 255


#: Test-time augmentation: the dihedral views averaged (1: none; 4: the four rotations; 8: and their mirror images).
TTA_VIEWS = (1, 4, 8)


@dataclass(frozen=True)
class PatchViews:
    """Extra views of each spot, embedded with the same encoder (each multiplies the embedding cost).

    ``context``: wider fields of view as multiples of the patch width (e.g. ``(2, 4)``); each is cut
    around the spot, resampled to the encoder's input and embedded, and its features follow the
    spot's own (the embedding is ``1 + len(context)`` times as wide). ``tta``: each patch's
    embedding is the mean over that many dihedral views (:data:`TTA_VIEWS`).
    """

    context: tuple[float, ...] = ()
    tta: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", tuple(float(c) for c in self.context))
        bad = [c for c in self.context if not (math.isfinite(c) and c > 1)]
        if bad or len(set(self.context)) != len(self.context):
            raise InputError(f"context fields of view are multiples of the patch width, each above 1 and "
                             f"given once (e.g. 2,4); got {list(self.context)}")
        if self.tta not in TTA_VIEWS:
            raise InputError(f"test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views, got {self.tta}")

    @property
    def fields(self) -> tuple[float, ...]:
        """Every field of view embedded, as multiples of the patch width: the spot's own first."""
        return (1.0, *self.context)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> PatchViews:
        """The views recorded by :meth:`attrs` (in embedding attributes or a model bundle's encoder)."""
        return cls(tuple(attrs.get("patch_context") or ()), int(attrs.get("patch_tta") or 1))

    def attrs(self) -> dict[str, object]:
        """Recorded beside embeddings only when set, so files written before the views existed keep their keys."""
        return {**({"patch_context": list(self.context)} if self.context else {}),
                **({"patch_tta": int(self.tta)} if self.tta != 1 else {})}


@dataclass(frozen=True)
class PatchSpec:
    """Which tissue area a patch covers and the pixel size it is resampled to.

    Give ``um`` (physical width) or ``native_px`` (width in full-resolution image pixels,
    whatever the slide's resolution); with neither, the width is ``out_px * 0.5`` µm. ``mpp``
    (µm per pixel) is a working resolution: patches of sharper slides are first downsampled to it.
    ``views`` adds wider fields of view and test-time augmentation (:class:`PatchViews`).
    """

    out_px: int = 224
    um: float | None = None
    native_px: int | None = None
    mpp: float | None = None
    views: PatchViews = PatchViews()

    def __post_init__(self) -> None:
        if self.um is not None and self.native_px is not None:
            raise InputError("give the patch size in µm or in native pixels, not both")
        for name in ("um", "native_px", "out_px", "mpp"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise InputError(f"patch {name} must be a positive number, got {value}")

    @property
    def mode(self) -> str:
        return "native-px" if self.native_px is not None else "um"

    @property
    def width_um(self) -> float | None:
        """The requested physical width; None in native-pixel mode (it then depends on the slide)."""
        if self.native_px is not None:
            return None
        return float(self.um) if self.um is not None else self.out_px * DEFAULT_MPP

    def box_px(self, slide: Slide) -> float:
        """Patch width in the slide's full-resolution pixels."""
        if self.native_px is not None:
            return float(self.native_px)
        mpp = slide.microns_per_pixel
        if not (mpp > 0 and math.isfinite(mpp)):
            raise InputError(
                f"slide '{slide.id}': microns per pixel is {mpp}; a patch of {self.width_um} µm "
                "needs it (set microns_per_pixel in the manifest, or use a native-pixel patch size)"
            )
        return self.width_um / mpp

    def via_px(self, slide: Slide, widen: float = 1.0) -> int | None:
        """Width the patches of ``slide`` (``widen`` times wider) pass through at the working
        resolution; None when there is none or the slide's image is no sharper than it (patches
        are never sharpened)."""
        if self.mpp is None:
            return None
        box, mpp, scale = self.box_px(slide) * widen, slide.microns_per_pixel, require_image(slide).scale
        if not (mpp > 0 and math.isfinite(mpp)):
            raise InputError(f"slide '{slide.id}': microns per pixel is {mpp}; a working resolution of "
                             f"{self.mpp} µm/px needs it (set microns_per_pixel in the manifest)")
        if mpp / scale >= self.mpp * (1 - 1e-6):  # the image file's own pixels are as coarse already
            return None
        return max(1, int(round(box * mpp / self.mpp)))

    def attrs(self, slide: Slide) -> dict[str, object]:
        """What the patches of ``slide`` were, as recorded beside its embeddings (``patch_mpp`` only
        when a working resolution is set, so files written before it existed keep their keys)."""
        box = self.box_px(slide)
        return {
            "patch_mode": self.mode,
            "patch_um": self.width_um if self.mode == "um" else float(box * slide.microns_per_pixel),
            "patch_px": int(self.out_px),
            "patch_box_px": float(box),
            "resample": RESAMPLE,
            **({"patch_mpp": float(self.mpp)} if self.mpp is not None else {}),
            **self.views.attrs(),
        }


def require_image(slide: Slide) -> SlideImage:
    if slide.image is None:
        raise InputError(f"slide '{slide.id}' has no H&E image; patches and embeddings need one")
    return slide.image


def patch_source(slide: Slide) -> np.ndarray | SlideImage:
    """What patches are cut from: the tiled TIFF itself (read tile by tile), else the decoded image."""
    image = require_image(slide)
    return image if image.tiled else image.pixels()


def crop_boxes(slide: Slide, spec: PatchSpec, widen: float = 1.0) -> np.ndarray:
    """(n, 3) int64 [x0, y0, width] of every spot's square box (``widen`` times the patch width)
    in the image FILE's pixels.

    The box is centred on the spot (to the nearest file pixel) and may extend past the image.
    """
    scale = require_image(slide).scale
    width = max(1, int(round(spec.box_px(slide) * widen * scale)))
    centre = np.asarray(slide.coords, dtype=np.float64) * scale
    origin = np.floor(centre - width / 2 + 0.5).astype(np.int64)
    return np.column_stack([origin, np.full(len(origin), width, dtype=np.int64)])


def resample(crops: np.ndarray, out_px: int, via_px: int | None = None) -> torch.Tensor:
    """(B, h, w, 3) uint8 crops to a (B, 3, out_px, out_px) float32 tensor in [0, 255].

    With ``via_px`` the crops are first downsampled to that width and rounded to 8 bits, as a
    slide scanned at the working resolution would be.
    """
    return resample_tensor(channels_first(crops), out_px, via_px)


def channels_first(crops: np.ndarray) -> torch.Tensor:
    """(B, h, w, 3) uint8 crops as a contiguous (B, 3, h, w) uint8 tensor."""
    import torch

    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def resample_tensor(x: torch.Tensor, out_px: int, via_px: int | None = None) -> torch.Tensor:
    """:func:`resample` of (B, 3, h, w) uint8 crops already in a tensor, on whatever device holds them."""
    import torch.nn.functional as F

    x = x.float()
    if via_px is not None and via_px < x.shape[-1]:
        x = F.interpolate(x, size=(via_px, via_px), mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    if x.shape[-2:] == (out_px, out_px):
        return x.contiguous()
    return F.interpolate(x, size=(out_px, out_px), mode="bilinear", align_corners=False, antialias=True)


class PatchBatches:
    """Map-style dataset of whole batches of one slide's patches (index = batch number).

    Whole batches keep Python overhead per batch, not per spot (one array slice per patch).
    ``raw=True`` leaves resampling and normalising to :meth:`finish`, called where the batch is
    used: on a GPU, so the loader only cuts crops (the costliest step left on the CPU was the
    resampling) and copies 8-bit crops rather than float patches to the device.
    ``source`` is the decoded image, or a :class:`SlideImage` of a tiled TIFF whose patches are
    read tile by tile (each worker process opens the file itself). DataLoader workers started by
    fork inherit a decoded image copy-on-write; for the spawn or forkserver start methods,
    ``share=True`` moves it into shared memory once, so workers never decode or copy it.
    """

    def __init__(
        self,
        source: np.ndarray | SlideImage,
        boxes: np.ndarray,
        out_px: int,
        batch_size: int,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        share: bool = False,
        via_px: int | None = None,
        raw: bool = False,
    ) -> None:
        import torch

        self.raw = raw

        self._image = None if isinstance(source, np.ndarray) else source
        self._pixels: np.ndarray | None = source if isinstance(source, np.ndarray) else None
        self._shared: torch.Tensor | None = None
        if share and self._pixels is not None:
            pixels = self._pixels
            self._shared = torch.empty(pixels.shape, dtype=torch.uint8).share_memory_()
            self._shared.numpy()[...] = pixels
            self._pixels = None
        self.boxes = boxes
        self.out_px, self.via_px = out_px, via_px
        self.batch_size = batch_size
        self.mean = None if mean is None else torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = None if std is None else torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def __len__(self) -> int:
        return -(-len(self.boxes) // self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Batch ``i``: normalised float32 if mean/std were given, else uint8 (B, 3, px, px); with
        ``raw`` the crops as cut, uint8 (B, 3, box, box), for :meth:`finish` on the GPU."""

        boxes = self.boxes[i * self.batch_size : (i + 1) * self.batch_size].tolist()
        if self._image is not None:
            crops = np.stack([self._image.file_region(x0, y0, w, w, WHITE) for x0, y0, w in boxes])
        else:
            px = self._pixels if self._pixels is not None else self._shared.numpy()
            crops = np.stack([crop_padded(px, x0, y0, w, w, WHITE) for x0, y0, w in boxes])
        x = channels_first(crops)
        if self.raw:
            return x
        return self.finish(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Raw uint8 crops resampled to the encoder's input and normalised, where ``x`` lives."""
        import torch

        step = max(1, _RESAMPLE_BYTES // (4 * x[0].numel())) if len(x) else 1
        if step < len(x):  # crops of a wide field of view: a few at a time, so float copies stay small
            return torch.cat([self.finish(x[i : i + step]) for i in range(0, len(x), step)])
        x = resample_tensor(x, self.out_px, self.via_px)
        if self.mean is None:
            return x.round_().clamp_(0, 255).to(torch.uint8)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def dihedral_view(x: torch.Tensor, i: int) -> torch.Tensor:
    """View ``i`` (0-7) of a batch of square images (B, C, H, W): rotated by ``i % 4`` quarter
    turns, then mirrored left-right when ``i >= 4``; view 0 is ``x`` itself."""
    import torch

    turned = torch.rot90(x, i % 4, dims=(-2, -1)) if i % 4 else x
    return turned.flip(-1) if i >= 4 else turned


def export_patches(slide: Slide, spec: PatchSpec, path: Path, batch_size: int = 256) -> Path:
    """Write ``slide``'s patches to an HDF5 file (HEST layout: ``img``, ``barcode``, ``coords``);
    the spot's own field of view only, as cut (``spec.views`` are embedding-time views).

    Written under a temporary name and renamed, so ``path`` is either complete or absent.
    """
    import h5py

    from .._outputs import atomic_h5, command_line, output_lock

    boxes = crop_boxes(slide, spec)
    data = PatchBatches(patch_source(slide), boxes, spec.out_px, batch_size, via_px=spec.via_px(slide))
    n, px = slide.n_spots, spec.out_px
    with output_lock(path, command_line()), atomic_h5(path, n * px * px * 3 + 64 * n) as f:
        img = f.create_dataset("img", (n, px, px, 3), dtype=np.uint8, chunks=(1, px, px, 3))
        for i in range(len(data)):
            img[i * batch_size : i * batch_size + batch_size] = data[i].permute(0, 2, 3, 1).numpy()
        f.create_dataset("barcode", data=slide.barcodes.astype(str).astype(object), dtype=h5py.string_dtype())
        f.create_dataset("coords", data=np.asarray(slide.coords, dtype=np.float64))
        f.attrs.update({"slide": slide.id, "microns_per_pixel": float(slide.microns_per_pixel), **spec.attrs(slide)})
    slide.image.release()
    return path
