"""Lazy, decode-once access to H&E images of any size.

A 10,000 x 10,000 JPEG takes seconds to decode; every consumer (validation, patch cropping,
plotting) goes through one :class:`SlideImage` so that happens at most once per process. A tiled
TIFF (a whole-slide image, e.g. HEST-1k's, ~40,000 px square) is never decoded whole for
patches: each region decodes only the tiles under it.

Pixels are what the file holds, or an error -- never silently different ones:

- JPEGs are decoded by libjpeg-turbo in strict mode (``simplejpeg``), so a file cut short, or
  with damaged data, fails with the decoder's message instead of coming back with grey or
  shifted rows;
- 16-bit and other deep images are scaled from their type's full range to 8 bits (a 16-bit
  grayscale PNG is not clipped to white), the same for every tile of a whole-slide image;
- an EXIF orientation other than "upright" is refused: hgc reads pixels as stored, so spot
  coordinates taken on the displayed (rotated) picture would not match.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

log = logging.getLogger(__name__)

# Whole-slide H&E images are legitimately larger than PIL's decompression-bomb guard (89 Mpx).
# We raise the limit deliberately, to 2 gigapixels, rather than disabling it.
Image.MAX_IMAGE_PIXELS = 2_000_000_000

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".btf"}
_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "mirrored and rotated 90°",
                 6: "rotated 90° clockwise", 7: "mirrored and rotated 270°", 8: "rotated 90° counter-clockwise"}
#: PIL modes whose pixels are deeper than 8 bits; converting them with ``convert("RGB")`` clips.
_DEEP_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


#: How an image file can be read: ``openslide`` (whole-slide formats, region by region), ``tifffile``
#: (TIFF, pyramidal or not), ``pillow`` (JPEG, PNG, plain TIFF); ``auto`` picks by suffix.
IMAGE_READERS = ("auto", "openslide", "tifffile", "pillow")
_OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
#: µm/px read from image metadata is trusted only within this range (screen "72 dpi" is not a scan).
_PLAUSIBLE_MPP = (0.05, 50.0)


@dataclass(eq=False)
class SlideImage:
    """A handle on an H&E image file: size without decoding, pixels decoded once on demand.

    ``scale`` maps the file's pixels to the slide's image-pixel space (e.g. 0.15 for a Visium
    hires PNG standing in for the full-resolution image): spot coordinates always live in the
    full-resolution space, and :meth:`read_region` takes full-resolution coordinates. ``reader``
    is one of :data:`IMAGE_READERS`: whole-slide formats (SVS, NDPI, MRXS, ...) go through
    OpenSlide when it is installed, TIFFs through tifffile, the rest through Pillow.
    """

    path: Path
    scale: float = 1.0
    reader: str = "auto"
    _pixels: np.ndarray | None = field(default=None, init=False, repr=False)
    _size: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _tiled: bool | None = field(default=None, init=False, repr=False)
    _tif: object = field(default=None, init=False, repr=False)  # open TiffFile / OpenSlide, per process
    _tif_pid: int | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.reader not in IMAGE_READERS:
            raise InputError(f"unknown image reader '{self.reader}' for {self.path}; expected one of {list(IMAGE_READERS)}")

    def __getstate__(self) -> dict:
        """For worker processes (spawn): the file reference, not the pixels, lock or file handle."""
        return {"path": self.path, "scale": self.scale, "reader": self.reader, "_size": self._size, "_tiled": self._tiled}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["scale"], state.get("reader", "auto"))
        self._size, self._tiled = state["_size"], state["_tiled"]

    @property
    def kind(self) -> str:
        """The reader this file is read with: ``openslide``, ``tifffile`` or ``pillow``."""
        from .._optional import available

        if self.reader != "auto":
            return self.reader
        suffix = self.path.suffix.lower()
        if suffix in _OPENSLIDE_SUFFIXES and available("openslide"):
            return "openslide"
        if suffix in _TIFF_SUFFIXES and _is_tifffile_preferred(self.path):
            return "tifffile"
        return "pillow"

    @property
    def tiled(self) -> bool:
        """Whether regions can be read without decoding the whole image: any OpenSlide file, or a
        TIFF whose level 0 is tiled RGB(A) with unsigned integer samples."""
        if self._tiled is None:
            self._tiled = self.kind == "openslide"
            if self.kind == "tifffile":
                with self._open_tiff() as tif:
                    self._tiled = _tiled_level0(tif) is not None
        return self._tiled

    def _open_tiff(self):
        if not self.path.is_file():
            raise InputError(f"image file not found: {self.path}")
        try:
            return _tifffile().TiffFile(self.path)
        except Exception as exc:  # tifffile raises many types for unreadable files
            raise InputError(f"cannot read image {self.path}: {exc}") from exc

    def _open_slide(self):
        if not self.path.exists():
            raise InputError(f"image file not found: {self.path}")
        openslide = _openslide()
        try:
            return openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlide raises its own types for unsupported or damaged files
            raise InputError(f"cannot read whole-slide image {self.path} with OpenSlide: {exc}") from None

    def _handle(self):
        """The open file of this process (tiled TIFF or OpenSlide), opened on first use."""
        if self._tif_pid != os.getpid():
            self._tif = self._open_slide() if self.kind == "openslide" else self._open_tiff()
            self._tif_pid = os.getpid()
        return self._tif

    def thumbnail_step(self, max_px: int) -> int:
        """The power-of-two subsampling of the file's pixels that :meth:`thumbnail` uses."""
        longest = max(self._file_size())
        return 1 << max(0, math.ceil(math.log2(longest / max_px))) if longest > max_px else 1

    def thumbnail(self, max_px: int) -> np.ndarray:
        """Every ``thumbnail_step(max_px)``-th pixel of the file (at most ``max_px`` a side, in file
        pixels' orientation). A pyramidal image is read from the level of that downsample (or the
        next finer one), so a whole-slide image is never decoded whole; others are decoded once."""
        step = self.thumbnail_step(max_px)
        if self._pixels is None and self.tiled:
            with self._lock:
                return self._subsampled(step)
        return self.pixels()[::step, ::step]

    def _subsampled(self, step: int) -> np.ndarray:
        """Every ``step``-th pixel, from the coarsest pyramid level whose downsample divides ``step``,
        read in strips of rows so that memory stays bounded even at level 0."""
        if self.kind == "openslide":
            slide = self._handle()
            downs = [int(round(d)) for d in slide.level_downsamples]
            level = max((i for i, d in enumerate(downs) if step % d == 0), key=lambda i: downs[i])
            (w, h), ds = slide.level_dimensions[level], downs[level]

            def strip(y: int, rows: int) -> np.ndarray:
                return _over_white(np.asarray(slide.read_region((0, y * ds), level, (w, rows))))
        else:
            tif = self._handle() if self.tiled else None
            with self._open_tiff() as tiff:
                levels = tiff.series[0].levels
                width = _level_hw(levels[0])[1]
                downs = [int(round(width / _level_hw(lv)[1])) for lv in levels]
                level = max((i for i, d in enumerate(downs) if step % d == 0), key=lambda i: downs[i])
                ds = downs[level]
                if level > 0 or tif is None:  # a coarse level (small), or an untiled file: read it whole
                    return _to_rgb_uint8(levels[level].asarray(), self.path)[:: step // ds, :: step // ds]
                h, w = _level_hw(levels[0])

            def strip(y: int, rows: int) -> np.ndarray:
                return _read_tiled_region(tif, self.path, 0, y, w, rows, 255)
        k = step // ds
        rows = max(k, (1 << 26) // max(1, 4 * w) // k * k)  # ~64 MiB of RGBA per strip
        parts = [strip(y, min(rows, h - y))[::k, ::k] for y in range(0, h, rows)]
        return np.concatenate(parts, axis=0)

    def metadata_mpp(self) -> float | None:
        """Microns per pixel as the file records them (OpenSlide's ``mpp-x``, TIFF resolution tags),
        or None. JPEG/PNG densities are screen settings, not scans, and are not trusted."""
        mpp = None
        if self.kind == "openslide":
            props = self._handle().properties
            mpp = props.get("openslide.mpp-x")
        elif self.kind == "tifffile":
            with self._open_tiff() as tif:
                tags = tif.pages[0].tags
                res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
                if res is not None and unit is not None and int(unit.value) in (2, 3):
                    num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
                    per_unit = num / den if den else 0
                    mpp = (25400.0 if int(unit.value) == 2 else 10000.0) / per_unit if per_unit > 0 else None
        try:
            value = float(mpp) if mpp is not None else None
        except (TypeError, ValueError):
            return None
        if value is not None and not (_PLAUSIBLE_MPP[0] <= value <= _PLAUSIBLE_MPP[1]):
            log.warning("image %s records %.4g µm/px, outside %s: ignored", self.path, value, _PLAUSIBLE_MPP)
            return None
        return value

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in full-resolution pixels, read from the header only."""
        if self._size is None:
            w, h = self._file_size()
            self._size = (int(round(w / self.scale)), int(round(h / self.scale)))
        return self._size

    def _file_size(self) -> tuple[int, int]:
        if not self.path.exists():
            raise InputError(f"image file not found: {self.path}")
        if self.kind == "openslide":
            with self._lock:
                return tuple(int(v) for v in self._handle().dimensions)
        if self.kind == "tifffile":
            with self._open_tiff() as tif:
                hw = _level_hw(tif.series[0].levels[0])
                tag = tif.pages[0].tags.get("Orientation")
            _check_orientation(self.path, int(tag.value) if tag is not None else 1)
            return int(hw[1]), int(hw[0])
        try:
            with Image.open(self.path) as im:
                size, fmt = im.size, im.format
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception as exc:  # PIL raises many types for unreadable files
            raise InputError(f"cannot read image {self.path}: {exc}") from exc
        _check_complete(self.path, fmt)
        _check_orientation(self.path, orientation)
        return size

    def pixels(self) -> np.ndarray:
        """The whole image as an (H, W, 3) uint8 array in file pixels, decoded once and cached."""
        with self._lock:
            if self._pixels is None:
                log.info("decoding image %s", self.path)
                self._pixels = self._decode()
            return self._pixels

    def _decode(self) -> np.ndarray:
        if not self.path.exists():
            raise InputError(f"image file not found: {self.path}")
        if self.kind == "openslide":
            slide = self._handle()
            return _over_white(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
        if self.kind == "tifffile":
            tifffile = _tifffile()
            try:
                arr = tifffile.imread(self.path, level=0)
            except Exception as exc:
                raise InputError(f"cannot read image {self.path}: {exc}") from exc
            return _to_rgb_uint8(arr, self.path)
        try:
            with Image.open(self.path) as im:
                _check_complete(self.path, im.format)
                _check_orientation(self.path, im.getexif().get(_EXIF_ORIENTATION, 1))
                if im.format == "JPEG" and im.mode in ("RGB", "L"):
                    return _decode_jpeg(self.path)
                im.load()
                if im.mode in _DEEP_MODES:
                    return _to_rgb_uint8(np.asarray(im), self.path)
                return np.asarray(im.convert("RGB"))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"cannot decode image {self.path} (unreadable or truncated): {exc}"
            ) from exc

    def read_region(self, x0: int, y0: int, width: int, height: int, fill: int = 255) -> np.ndarray:
        """Pixels of the full-resolution box [x0, x0+width) x [y0, y0+height), padded with ``fill``.

        Coordinates are full-resolution; with ``scale != 1`` the box is taken from the stored
        file at that scale (its size is then ``round(width*scale)`` etc.). Parts outside the image
        are padded, never shifted, so a spot stays at the centre of its patch.
        """
        s = self.scale
        fx0, fy0 = int(np.floor(x0 * s)), int(np.floor(y0 * s))
        fw, fh = max(1, int(round(width * s))), max(1, int(round(height * s)))
        return self.file_region(fx0, fy0, fw, fh, fill)

    def file_region(self, x0: int, y0: int, width: int, height: int, fill: int = 255) -> np.ndarray:
        """Like :meth:`read_region`, in the file's own pixels (what patch boxes are given in).

        A tiled TIFF or OpenSlide image that was not decoded whole decodes only the tiles under
        the box, through a file handle opened once per process (worker processes open their own).
        """
        if self._pixels is None and self.tiled:
            with self._lock:
                handle = self._handle()
                if self.kind == "openslide":
                    region = np.asarray(handle.read_region((int(x0), int(y0)), 0, (int(width), int(height))))
                    return _over_white(region, fill)
                return _read_tiled_region(handle, self.path, x0, y0, width, height, fill)
        return crop_padded(self.pixels(), x0, y0, width, height, fill)

    def release(self) -> None:
        """Drop the decoded pixels and close the file (e.g. after all patches of a slide are cut)."""
        with self._lock:
            self._pixels = None
            if self._tif is not None and self._tif_pid == os.getpid():
                self._tif.close()
            self._tif = self._tif_pid = None


def _over_white(rgba: np.ndarray, fill: int = 255) -> np.ndarray:
    """OpenSlide's RGBA (transparent outside the scanned area) as RGB with ``fill`` there."""
    rgb = np.ascontiguousarray(rgba[..., :3])
    if rgba.shape[-1] == 4:
        rgb[rgba[..., 3] == 0] = fill
    return rgb


def crop_padded(pixels: np.ndarray, x0: int, y0: int, w: int, h: int, fill: int = 255) -> np.ndarray:
    """Array slice of ``pixels`` with out-of-image parts filled, always of shape (h, w, C)."""
    H, W = pixels.shape[:2]
    out = np.full((h, w) + pixels.shape[2:], fill, dtype=pixels.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + w, W), min(y0 + h, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return out


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def _check_complete(path: Path, fmt: str | None) -> None:
    """Catch truncated JPEG/PNG files from their end marker, without decoding them."""
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 64))
        tail = fh.read().rstrip(b"\x00")
    if not tail.endswith(marker):
        raise InputError(
            f"image {path} is truncated (its {fmt} end marker is missing); re-download or re-export it"
        )


def _check_orientation(path: Path, orientation) -> None:
    if orientation in (None, 0, 1):
        return
    what = _ORIENTATIONS.get(int(orientation), f"orientation {orientation}")
    raise InputError(
        f"image {path} carries an EXIF orientation tag ({what} for display); hgc reads pixels as "
        "stored, so spot coordinates taken on the displayed picture would not match. Save the image "
        "upright without the tag (if the spot coordinates refer to the displayed picture), or remove "
        "the tag, e.g. `exiftool -Orientation=1 -n FILE` (if they refer to the stored pixels)"
    )


def _decode_jpeg(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from libjpeg-turbo in strict mode: corrupt or cut data is an error."""
    import simplejpeg

    data = path.read_bytes()
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        raise InputError(
            f"image {path} is damaged: the JPEG decoder reports '{exc}' (data cut short or corrupted); "
            "re-download or re-export it"
        ) from None


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from any layout, so a pixel's value never depends on the others: 8- and
    16-bit integers are scaled from their full range, 32-bit ones (PIL's "I" mode, which holds
    16-bit PNG and TIFF data) as 16-bit, floats from [0, 1] (or taken as 0-255 when larger)."""
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise InputError(f"image {path} has shape {arr.shape}; expected an RGB image")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind in "ui":
        hi = 65535.0 if arr.dtype.itemsize > 2 else float(np.iinfo(arr.dtype).max)
        scaled = arr.astype(np.float64) * (255.0 / hi)
    elif arr.dtype.kind == "f":
        scaled = arr.astype(np.float64) * (255.0 if np.nanmax(arr, initial=0) <= 1.0 else 1.0)
    else:
        raise InputError(f"image {path} has pixels of type {arr.dtype}; expected integer or float samples")
    return np.ascontiguousarray(np.clip(np.nan_to_num(scaled).round(), 0, 255).astype(np.uint8))


def _tiled_level0(tif):
    """Level 0's key page if it is tiled, interleaved RGB(A) with unsigned integer samples; else None.

    Float samples are decoded whole: whether they run to 1 or to 255 is a property of the image.
    """
    page = tif.series[0].levels[0].keyframe
    tiled = page.is_tiled and page.planarconfig == 1 and page.samplesperpixel >= 3
    return page if tiled and np.dtype(page.dtype).kind == "u" else None


def _level_hw(level) -> tuple[int, int]:
    shape = level.shape
    return shape[:2] if shape[-1] in (3, 4) or len(shape) == 2 else shape[1:3]


def _read_tiled_region(tif, path: Path, x0: int, y0: int, w: int, h: int, fill: int) -> np.ndarray:
    """The box from level 0 of an open tiled TIFF, decoding only the tiles it overlaps.

    Whole-slide images (HEST-1k WSIs are ~40,000 px square, ~5 GB as RGB) should not be decoded
    to look at one spot.
    """
    page = _tiled_level0(tif)
    H, W = page.imagelength, page.imagewidth
    th, tw = page.tilelength, page.tilewidth
    out = np.full((h, w, 3), fill, dtype=np.uint8)
    cols = -(-W // tw)
    fh = tif.filehandle
    for ty in range(max(y0, 0) // th, min(y0 + h, H) // th + 1):
        for tx in range(max(x0, 0) // tw, min(x0 + w, W) // tw + 1):
            if ty * th >= H or tx * tw >= W:
                continue
            index = ty * cols + tx
            if not page.databytecounts[index]:  # a sparse tile: nothing stored, leave it filled
                continue
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
            tile = _to_rgb_uint8(np.asarray(tile).reshape(th, tw, -1), path)
            # the part of this tile inside both the image and the box
            ax0, ay0 = max(tx * tw, x0, 0), max(ty * th, y0, 0)
            ax1, ay1 = min((tx + 1) * tw, x0 + w, W), min((ty + 1) * th, y0 + h, H)
            if ax1 > ax0 and ay1 > ay0:
                out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = tile[
                    ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw
                ]
    return out


def _tifffile():
    from .._optional import require

    return require("tifffile", "reading pyramidal TIFF/SVS images")


def _openslide():
    from .._optional import require

    return require("openslide", "reading whole-slide images (SVS, NDPI, MRXS, ...) through OpenSlide")


def _is_tifffile_preferred(path: Path) -> bool:
    """Use tifffile for TIFF-family files when it is installed; PIL handles plain TIFFs otherwise."""
    from .._optional import available

    return available("tifffile") or path.suffix.lower() != ".tif"
