"""Small inputs for the embedding tests: a tiny timm encoder with saved weights, tiny slides.

``timm:test_efficientnet`` (99k parameters, 160 px input) takes the same code path as every
encoder given by name and weights file, at a fraction of EfficientNet-Lite0's cost.
"""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import write_manifest, write_st_slide

TINY = "timm:test_efficientnet"


def tiny_weights(folder: Path) -> Path:
    from hgc.embed.registry import build_model, get_spec

    torch.manual_seed(0)
    path = folder / "tiny.pth"
    torch.save(build_model(get_spec(TINY)).state_dict(), path)
    return path


def tiny_manifest(folder: Path, slides: tuple[str, ...] = ("S1", "S2"), grid: int = 3) -> Path:
    """Slides of grid x grid spots on random-texture images, 1 µm per pixel."""
    rows = []
    for i, name in enumerate(slides):
        size = 60 * grid + 60
        files = write_st_slide(folder / name, name=name, grid=grid, pitch_px=60, image_size=(size, size), seed=i)
        rows.append({"slide": name, "patient": "P", "format": "st", "microns_per_pixel": "1.0", **files})
    return write_manifest(folder / "m.tsv", rows)
