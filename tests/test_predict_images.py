"""Slides that come as an image alone: tissue detection, virtual spots in the training platform's
geometry, and the same result whether the image is a JPEG or a pyramidal whole-slide TIFF read
through OpenSlide. A real her2st model (C2-C6, a tiny CNN so the suite stays fast) predicts B4."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, write_manifest
from embed_helpers import TINY, tiny_weights
from hgc.cli import main
from hgc.data import read_manifest

C_SLIDES = ("C2", "C3", "C4", "C5", "C6")


@pytest.fixture(scope="module")
def c_model(tmp_path_factory, her2st_manifest):
    """`hgc train` on the five C sections (tiny CNN encoder, short training): (folder, weights, B4 slide)."""
    root = tmp_path_factory.mktemp("c_model")
    m = read_manifest(her2st_manifest)
    rows = [{"slide": e.slide, "patient": e.patient, "format": "st", "counts": e.paths["counts"],
             "spots": e.paths["spots"], "image": e.paths["image"], "microns_per_pixel": e.microns_per_pixel}
            for e in m.entries if e.slide in C_SLIDES]
    weights = tiny_weights(root)
    r = CliRunner().invoke(main, ["train", str(write_manifest(root / "c.tsv", rows)), "--genes", "top-mean:40",
                                  "--encoder", TINY, "--weights", str(weights), "--out", str(root / "model"),
                                  "--epochs", "3", "--hidden", "16", "--layers", "1", "--backend", "pyg",
                                  "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    return root / "model", weights, m.load("B4")


def _image_row(slide: str, image: Path, **extra) -> dict:
    return {"slide": slide, "patient": "B", "format": "image", "image": str(image), **extra}


def _predict(model, weights, manifest, out, *extra):
    r = CliRunner().invoke(main, ["predict", str(model), str(manifest), "--out", str(out), "--weights", str(weights),
                                  "--device", "cpu", "--no-progress", *extra])
    assert r.exit_code == 0, r.output
    import anndata as ad

    (slide,) = json.loads((out / "predictions.json").read_text())["files"]["hgc"]
    return ad.read_h5ad(out / "hgc" / f"{slide}.h5ad")


def test_b4_from_its_image_alone(tmp_path, c_model):
    """Tissue covers >= 95% of B4's real spots; the virtual ST grid has 25 spots per mm²; predictions
    carried from the nearest virtual spot to each real spot follow the real spots' predictions."""
    from scipy.spatial import cKDTree

    from hgc.data.tissue import tissue_mask
    from hgc.evaluate.metrics import nan_mean, pearson_per_gene

    model, weights, b4 = c_model
    rows = [_image_row("B4-image", b4.image.path, microns_per_pixel=b4.microns_per_pixel)]
    virtual = _predict(model, weights, write_manifest(tmp_path / "img.tsv", rows), tmp_path / "pred")
    tissue = tissue_mask(b4.image, b4.microns_per_pixel)
    covered = tissue.at(b4.coords).mean()
    assert covered >= 0.95, covered
    area_mm2 = tissue.mask.sum() * (tissue.mask_um(b4.microns_per_pixel) / 1000) ** 2
    density = virtual.n_obs / area_mm2  # 200 µm square grid: 25 spots per mm² (a few more on the rim)
    assert 23 <= density <= 29, (virtual.n_obs, area_mm2)
    assert virtual.obs["virtual"].all() and {"array_row", "array_col"} <= set(virtual.obs)
    assert (tmp_path / "pred" / "tissue" / "B4-image.png").stat().st_size > 10_000

    spots = write_manifest(tmp_path / "spots.tsv", [{"slide": "B4-spots", "patient": "B", "format": "st",
                                                      "spots": b4.source["spots"], "image": b4.image.path,
                                                      "microns_per_pixel": b4.microns_per_pixel}])
    real = _predict(model, weights, spots, tmp_path / "pred-spots")
    assert not real.obs["virtual"].any()
    distance, nearest = cKDTree(virtual.obsm["spatial"]).query(real.obsm["spatial"])
    assert np.median(distance) * b4.microns_per_pixel < 150  # a virtual spot within a pitch of each real one
    agreement = nan_mean(pearson_per_gene(np.asarray(real.X), np.asarray(virtual.X)[nearest]))
    shuffled = np.random.default_rng(0).permutation(nearest)  # the same virtual spots, not the nearest ones
    chance = nan_mean(pearson_per_gene(np.asarray(real.X), np.asarray(virtual.X)[shuffled]))
    print(f"carried vs real-spot predictions: PCC {agreement:.3f} (nearest), {chance:.3f} (shuffled)")
    assert agreement > chance + 0.1, (agreement, chance)  # the nearest virtual spot sees the same tissue


def test_a_whole_slide_tiff_through_openslide_gives_what_the_jpeg_gives(tmp_path, c_model):
    """B4's decoded JPEG written as a pyramidal, tiled, lossless TIFF (levels by 2x subsampling, µm/px
    in its resolution tags) and read through OpenSlide: the same tissue, virtual spots and predictions."""
    import tifffile

    model, weights, b4 = c_model
    pixels = b4.image.pixels()
    wsi = tmp_path / "B4.tif"
    resolution = (1e4 / b4.microns_per_pixel, 1e4 / b4.microns_per_pixel)  # pixels per cm
    with tifffile.TiffWriter(wsi, bigtiff=True) as tif:
        level = pixels
        for i in range(5):
            tif.write(level, tile=(512, 512), photometric="rgb", compression="zlib", subfiletype=1 if i else 0,
                      resolution=resolution, resolutionunit="CENTIMETER")
            level = level[::2, ::2]
    b4.image.release()
    jpeg = _predict(model, weights, write_manifest(tmp_path / "jpeg.tsv", [
        _image_row("B4", b4.image.path, microns_per_pixel=b4.microns_per_pixel)]), tmp_path / "jpeg")
    from hgc.data.image import SlideImage

    through_openslide = SlideImage(wsi, reader="openslide")
    assert through_openslide.kind == "openslide" and through_openslide.size == b4.image.size
    # µm/px as the file records it (a rational resolution tag: equal to ~1e-6)
    assert through_openslide.metadata_mpp() == pytest.approx(b4.microns_per_pixel, rel=1e-5)
    slide = _predict(model, weights, write_manifest(tmp_path / "wsi.tsv", [
        _image_row("B4", wsi, image_reader="openslide", microns_per_pixel=b4.microns_per_pixel)]), tmp_path / "wsi")
    assert list(slide.obs_names) == list(jpeg.obs_names)  # the same tissue mask and virtual grid
    np.testing.assert_array_equal(slide.obsm["spatial"], jpeg.obsm["spatial"])
    np.testing.assert_allclose(slide.X, jpeg.X, rtol=1e-5, atol=1e-5)  # the same pixels under every patch


def test_images_that_cannot_be_predicted_are_one_line(tmp_path, c_model):
    from PIL import Image

    model, weights, b4 = c_model

    def fails(rows, *needles):
        r = CliRunner().invoke(main, ["predict", str(model), str(write_manifest(tmp_path / "t.tsv", rows)),
                                      "--out", str(tmp_path / "p"), "--weights", str(weights), "--device", "cpu"])
        assert_one_line_error(r, *needles)
        assert not (tmp_path / "p").exists() and not (tmp_path / "p.embeddings.h5").exists()

    fails([_image_row("X", b4.image.path)], "records no microns per pixel", "microns_per_pixel")
    Image.new("L", (64, 64), 0).save(tmp_path / "empty.png")
    fails([_image_row("X", b4.image.path, microns_per_pixel=0.69, mask=tmp_path / "empty.png")],
          "no tissue found", "empty.png")
    Image.new("RGB", (600, 600), (235, 235, 235)).save(tmp_path / "glass.png")
    fails([_image_row("X", tmp_path / "glass.png", microns_per_pixel=0.69)], "no tissue found", "glass.png")
