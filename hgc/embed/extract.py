"""Batched, resumable extraction of spot embeddings for every slide of a manifest.

Per slide: decode the image once in the main process (a tiled whole-slide TIFF is read tile
by tile instead), let DataLoader workers cut and resample batches of patches as the model runs,
write the slide durably, release the image. Slides already embedded with the same encoder,
weights, patch settings and inputs are skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .. import __version__
from .._devices import resolve_device
from .._fingerprint import file_record
from ..errors import InputError
from .patches import PatchBatches, PatchSpec, PatchViews, crop_boxes, dihedral_view, patch_source, require_image
from .registry import DEFAULT_ENCODER, Encoder, load_encoder
from .store import EmbeddingStore

if TYPE_CHECKING:
    import torch

    from ..data.slide import Slide

log = logging.getLogger(__name__)

#: Patches per forward pass (``--batch-size``).
BATCH_SIZE = 64


class SlideSource(Protocol):
    """What embedding needs from a manifest: slide ids and a loader (``hgc.data.Manifest``)."""

    @property
    def slide_ids(self) -> list[str]: ...

    def load(self, slide_id: str, expression: bool = True) -> Slide: ...


def default_workers(device: torch.device) -> int:
    """Patch workers: none on CPU, where the model's own threads already use every core and
    cutting patches in the main process measured faster; on a GPU one per spare core of this
    process's share of the node (torchrun may start several), at most 8."""
    from .._distributed import local_processes

    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // local_processes() - 1))


def input_fingerprint(slide: Slide, image_sha256: str) -> str:
    """sha256 of what the patches depend on: spots, positions, resolution and the image's content."""
    image = require_image(slide)
    h = hashlib.sha256()
    h.update("\0".join(np.asarray(slide.barcodes).astype(str)).encode())
    h.update(np.ascontiguousarray(slide.coords, dtype=np.float64).tobytes())
    h.update(repr((float(slide.microns_per_pixel), float(image.scale))).encode())
    h.update(image_sha256.encode())
    return h.hexdigest()


def _precision(device: torch.device) -> tuple[contextlib.AbstractContextManager, str]:
    import torch

    if device.type != "cuda":
        return contextlib.nullcontext(), "float32"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), str(dtype).replace("torch.", "")


def embed_slide(
    slide: Slide,
    model: torch.nn.Module,
    encoder: Encoder,
    patch: PatchSpec,
    device: torch.device,
    batch_size: int = BATCH_SIZE,
    workers: int = 0,
    progress: bool = True,
    resize_on_device: bool | None = None,
) -> np.ndarray:
    """(n_spots, dim) float32 embeddings of one slide, in spot order; with ``patch.views``, each
    field of view's features in turn (the spot's own first), each the mean over the TTA views.

    Patches are resampled and normalised on the model's device when ``resize_on_device`` (default:
    on a GPU), so CPU workers only cut crops; elsewhere the workers do all of it.
    """
    import torch
    from torch.utils.data import DataLoader

    from .._progress import progress as progress_bar

    share = workers > 0 and torch.multiprocessing.get_start_method() != "fork"
    on_device = device.type == "cuda" if resize_on_device is None else resize_on_device
    autocast, _ = _precision(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    source, views, dim = patch_source(slide), patch.views, model.num_features
    fields = views.fields
    out = np.empty((slide.n_spots, dim * len(fields)), dtype=np.float32)
    with torch.inference_mode(), autocast, progress_bar(
        total=slide.n_spots * len(fields), desc=slide.id, unit="patch", disable=None if progress else True, leave=False
    ) as bar:
        for j, widen in enumerate(fields):
            data = PatchBatches(source, crop_boxes(slide, patch, widen), patch.out_px, batch_size, encoder.spec.mean,
                                encoder.spec.std, share, patch.via_px(slide, widen), raw=on_device)
            loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                pin_memory=device.type == "cuda")
            start = 0
            for x in loader:
                x = x.to(device, non_blocking=True)
                if on_device:
                    x = data.finish(x)
                n = len(x)
                feats = model(x.contiguous(memory_format=fmt)).float()
                for i in range(1, views.tta):  # one view at a time: memory as without augmentation
                    feats += model(dihedral_view(x, i).contiguous(memory_format=fmt)).float()
                out[start : start + n, j * dim : (j + 1) * dim] = (feats / views.tta).cpu().numpy()
                start += n
                bar.update(n)
    slide.image.release()
    return out


def _prefetched(
    ids: list[str], manifest: SlideSource, store: EmbeddingStore, cache_key: Callable[[Slide], dict[str, object]]
) -> Iterator[tuple[str, Slide, dict[str, object], str | None]]:
    """(slide id, slide, cache key, where cached or None) for ``ids``, in their order.

    The next slide's spots are read (not its counts), checked against the cache and, if it must
    be embedded, its image decoded in a background thread while the current one runs: decoding a
    large JPEG takes seconds per slide, which would otherwise leave a GPU idle.
    """

    def prepare(slide_id: str) -> tuple[str, Slide, dict[str, object], str | None]:
        slide = manifest.load(slide_id, expression=False)  # the image and spots are all it needs
        key = cache_key(slide)
        where = store.cached(slide_id, key, slide.barcodes)
        if where is None and not slide.image.tiled:  # a tiled WSI is read tile by tile instead
            slide.image.pixels()
        return slide_id, slide, key, where

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hgc-prefetch") as pool:
        pending = pool.submit(prepare, ids[0]) if ids else None
        for i in range(len(ids)):
            current = pending.result()
            pending = pool.submit(prepare, ids[i + 1]) if i + 1 < len(ids) else None
            yield current


def embed_manifest(
    manifest: SlideSource | str | Path,
    encoder: str = DEFAULT_ENCODER,
    out: str | Path = "embeddings.h5",
    *,
    weights: str | Path | None = None,
    device: str = "auto",
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    patch_um: float | None = None,
    patch_native_px: int | None = None,
    patch_mpp: float | None = None,
    views: PatchViews | None = None,
    arch_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    data_root: str | Path | None = None,
) -> Path:
    """Embed every slide of ``manifest`` into the HDF5 file ``out`` (see docs/embeddings.md).

    Resumable: rerunning after an interruption, or with more slides, computes only what is
    missing or was made with other settings. Started by ``torchrun`` with N processes, each
    embeds every N-th slide (on its own GPU) into the store's parts and the main process merges
    them: the same file as one process makes. A process that dies leaves the others' finished
    slides in the parts, which a rerun reuses. ``views``: wider fields of view and test-time
    augmentation (:class:`~hgc.embed.patches.PatchViews`; none by default).
    """
    import torch

    from .. import _distributed

    if isinstance(manifest, (str, Path)):
        from ..data.manifest import read_manifest

        manifest = read_manifest(manifest, data_root)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    enc = load_encoder(encoder, weights, arch_overrides)
    patch = PatchSpec(out_px=enc.spec.input_px, um=patch_um, native_px=patch_native_px, mpp=patch_mpp,
                      views=views or PatchViews())
    where = _distributed.ranks()
    dev = resolve_device(_distributed.local_device(str(resolve_device(device)), where))
    workers = default_workers(dev) if workers is None else workers
    _, precision = _precision(dev)
    model: torch.nn.Module | None = None
    out = Path(out)

    def cache_key(slide: Slide) -> dict[str, object]:
        # the image is hashed whole, but only again when its size or times changed since it was embedded
        image = file_record(require_image(slide).path, store.image_record(slide.id))
        return {
            "encoder": enc.spec.name,
            "weights_sha256": enc.weights_sha256,
            **patch.attrs(slide),
            "input_sha256": input_fingerprint(slide, image["sha256"]),
            "image_record": json.dumps(image, sort_keys=True),
        }

    with _distributed.process_group("gloo"), contextlib.ExitStack() as stack:
        store = EmbeddingStore(out, owner=where.main)
        if where.main:  # the owner locks the output and clears a killed run's files before anyone writes
            stack.enter_context(store)
        _distributed.barrier()
        for slide_id, slide, key, cached in _prefetched(where.share(manifest.slide_ids), manifest, store, cache_key):
            if cached is not None:
                log.info("slide '%s': embeddings up to date (%s), skipped", slide_id, cached)
                continue
            if model is None:
                model = enc.build().to(dev)
                if dev.type == "cuda":
                    model = model.to(memory_format=torch.channels_last)
            log.info("slide '%s': embedding %d spots with %s on %s", slide_id, slide.n_spots, enc.spec.name, dev)
            t0 = time.perf_counter()
            emb = embed_slide(slide, model, enc, patch, dev, batch_size, workers, progress and where.main)
            n_patches = slide.n_spots * len(patch.views.fields) * patch.views.tta
            log.info("slide '%s': %.1f patches/s", slide_id, n_patches / (time.perf_counter() - t0))
            attrs = {
                **key,
                "weights_file": enc.weights_file,
                "dim": int(emb.shape[1]),
                "device": dev.type,
                "precision": precision,
                "hgc_version": __version__,
            }
            store.write(slide_id, slide.barcodes, emb, attrs)
        _distributed.barrier()  # every process's slides are in the parts
        if where.main:
            store.commit()
        _distributed.barrier()  # and merged: every process returns a complete file
    return out
