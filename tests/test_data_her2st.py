"""The legacy-ST reader and manifests on the real her2st sections."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hgc.cli import main
from hgc.data import Slide, read_manifest

EXPECTED_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


@pytest.fixture(scope="module")
def her2st(her2st_manifest):
    manifest = read_manifest(her2st_manifest)
    return {s.id: s for s in manifest.slides()}


def test_inspect_json_reports_every_section(her2st_manifest, shared_data):
    result = CliRunner().invoke(main, ["data", "inspect", str(her2st_manifest), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["slide"]: r["n_spots"] for r in rows} == EXPECTED_SPOTS
    assert sum(r["n_spots"] for r in rows) == 1193
    samples = pd.read_csv(shared_data / "her2st" / "samples.tsv", sep="\t").set_index("section")
    for r in rows:
        assert r["patient"] == samples.loc[r["slide"], "patient"]
        assert 14_000 < r["n_genes"] < 17_000
        expected = samples.loc[r["slide"], "microns_per_pixel"]
        assert abs(r["microns_per_pixel"] - expected) / expected < 0.01
        assert r["image_width"] > 9000 and r["image_height"] > 9000


def test_counts_match_the_raw_table(her2st, shared_data):
    slide = her2st["B4"]
    raw = pd.read_csv(shared_data / "her2st/data/ST-cnts/B4.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(shared_data / "her2st/data/ST-spotfiles/B4_selection.tsv", sep="\t")
    sel.index = sel["x"].astype(str) + "x" + sel["y"].astype(str)
    i = 17
    barcode = slide.barcodes[i]
    row = raw.loc[barcode].to_numpy()
    np.testing.assert_array_equal(slide.counts[i].toarray().ravel(), row)
    np.testing.assert_allclose(slide.coords[i], sel.loc[barcode, ["pixel_x", "pixel_y"]].to_numpy(float))
    x, y = map(int, barcode.split("x"))
    assert tuple(slide.array_coords[i]) == (x, y)


def test_spot_centres_fall_on_tissue(her2st):
    """Patches at spot centres are darker than the slide background (spots sit on tissue)."""
    slide = her2st["C3"]
    pixels = slide.image.pixels()
    xs, ys = slide.coords[:, 0].astype(int), slide.coords[:, 1].astype(int)
    at_spots = pixels[ys, xs].mean()
    corners = np.concatenate([pixels[:200, :200].reshape(-1, 3), pixels[-200:, -200:].reshape(-1, 3)])
    assert at_spots < corners.mean() - 20
    slide.image.release()


def test_image_is_decoded_once(her2st):
    image = her2st["C4"].image
    first = image.pixels()
    assert image.pixels() is first
    patch = image.read_region(int(her2st["C4"].coords[0, 0]) - 50, -20, 100, 100)
    assert patch.shape == (100, 100, 3) and (patch[:20] == 255).all()
    image.release()


def test_annotations_follow_spots(her2st):
    ann = her2st["C2"].annotations
    assert list(ann.index) == list(her2st["C2"].barcodes)
    assert ann["label"].notna().sum() >= 180


def test_anndata_round_trip(her2st, tmp_path):
    slide = her2st["C5"]
    adata = slide.to_anndata()
    assert adata.shape == (181, slide.n_genes)
    assert adata.uns["hgc"]["microns_per_pixel"] == pytest.approx(0.6907)
    path = tmp_path / "c5.h5ad"
    adata.write_h5ad(path)
    import anndata

    back = Slide.from_anndata(anndata.read_h5ad(path))
    assert back.id == "C5" and back.patient == "C"
    np.testing.assert_array_equal(back.barcodes, slide.barcodes)
    np.testing.assert_allclose(back.coords, slide.coords)
    assert (back.counts != slide.counts).nnz == 0
    np.testing.assert_array_equal(back.array_coords, slide.array_coords)
    assert back.image.path == slide.image.path
