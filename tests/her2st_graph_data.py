"""Real her2st slides and a fast, real-image-derived embedding file for graph tests.

The embedding is a colour description of each spot's H&E patch (channel means, standard
deviations and 8-bin histograms of a 150 µm field of view, decoded at 1/8 scale through JPEG's
DCT scaling): real image signal in about a second for all six sections, where a CNN encoder
would take minutes on the CI's two cores. It is written in the layout of :mod:`hgc.embed.store`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from hgc._outputs import safe_name
from hgc.data import read_manifest
from hgc.data.slide import Slide

REDUCE = 8  # JPEG draft decode factor
FIELD_UM = 150.0


@lru_cache(maxsize=2)
def load_slides(manifest: Path) -> dict[str, Slide]:
    """The manifest's slides, read once per test process (several test modules share them)."""
    m = read_manifest(manifest)
    return {s.id: s for s in m.slides()}


@lru_cache(maxsize=2)
def load_colour_embeddings(manifest: Path) -> dict[str, np.ndarray]:
    return {sid: colour_embeddings(s) for sid, s in load_slides(manifest).items()}


def colour_embeddings(slide: Slide) -> np.ndarray:
    """(n, 30) float32: per-channel mean, std and 8-bin histogram of each spot's patch."""
    with Image.open(slide.image.path) as im:
        im.draft("RGB", (im.width // REDUCE, im.height // REDUCE))
        scale = im.width / slide.image.size[0]
        pixels = np.asarray(im.convert("RGB"))
    half = max(2, int(round(FIELD_UM / slide.microns_per_pixel * scale / 2)))
    padded = np.pad(pixels, ((half, half), (half, half), (0, 0)), constant_values=255)
    windows = sliding_window_view(padded, (2 * half, 2 * half), axis=(0, 1))
    centre = np.round(slide.coords * scale).astype(int)
    h, w = pixels.shape[:2]
    x0 = np.clip(centre[:, 0], 0, w - 1)
    y0 = np.clip(centre[:, 1], 0, h - 1)
    patches = windows[y0, x0].reshape(slide.n_spots, 3, -1).astype(np.float32) / 255.0
    hist = np.stack([(np.floor(patches * 7.999) == b).mean(axis=2) for b in range(8)], axis=2)
    return np.concatenate([patches.mean(2), patches.std(2), hist.reshape(slide.n_spots, -1)], 1).astype(np.float32)


def write_embedding_file(path: Path, slides: dict[str, Slide], embeddings: dict[str, np.ndarray]) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        for sid, emb in embeddings.items():
            g = f.create_group(safe_name(sid))
            g.create_dataset("embeddings", data=emb)
            g.create_dataset("barcodes", data=slides[sid].barcodes.astype(str).astype(object),
                             dtype=h5py.string_dtype())
            g.attrs.update({"encoder": "colour-stats", "complete": True, "patch_um": FIELD_UM})
    return path


def write_her2st_store(manifest: Path, path: Path, genes: str = "top-mean:20") -> Path:
    """A patient-kfold graph store of the six sections on their colour embeddings."""
    from hgc.data.splits import make_folds
    from hgc.graph import GraphConfig, build_graphs, write_graphs

    slides = load_slides(manifest)
    folds = make_folds({s: sl.patient for s, sl in slides.items()}, "patient-kfold")
    graphs = build_graphs(slides, load_colour_embeddings(manifest), folds, "patient-kfold", GraphConfig(genes=genes))
    return write_graphs(graphs, path)
