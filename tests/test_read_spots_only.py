"""Reading a slide without its expression (``expression=False``): the spots, positions and image
embedding needs, the same spots as a full read, and no counts parsed — so embedding works (and is
fast) even when the counts could not be read."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from conftest import write_manifest, write_st_slide
from embed_helpers import TINY, tiny_weights
from hgc.data import Slide, read_manifest
from hgc.data.readers.h5ad import read_h5ad
from hgc.data.readers.hest import read_hest
from hgc.data.readers.visium import read_visium
from hgc.embed import embed_manifest, read_embeddings
from hgc.errors import InputError
from test_readers_hest_h5ad import write_hest
from test_readers_visium import write_visium


def assert_same_spots(spots: Slide, full: Slide) -> None:
    assert spots.counts is None and spots.n_genes == 0 and not spots.has_expression
    assert full.counts is not None and full.n_genes > 0
    assert list(spots.barcodes) == list(full.barcodes)
    np.testing.assert_array_equal(spots.coords, full.coords)
    assert (spots.microns_per_pixel, spots.mpp_source, spots.platform) == (
        full.microns_per_pixel, full.mpp_source, full.platform)
    assert spots.image.path == full.image.path and spots.image.scale == full.image.scale
    if full.array_coords is not None:
        np.testing.assert_array_equal(spots.array_coords, full.array_coords)


def test_her2st_sections_have_the_same_spots_without_counts(her2st_manifest):
    m = read_manifest(her2st_manifest)
    for slide_id in m.slide_ids:
        assert_same_spots(m.load(slide_id, expression=False), m.load(slide_id))


def test_transposed_st_counts_give_the_same_spots(tmp_path):
    files = write_st_slide(tmp_path, grid=3)
    table = np.loadtxt(files["counts"], dtype=str, delimiter="\t")
    np.savetxt(tmp_path / "T.tsv", table.T, fmt="%s", delimiter="\t")  # genes x spots, as some GEO uploads
    rows = [{"slide": "S1", "patient": "P", "format": "st", **files, "counts": tmp_path / "T.tsv"}]
    m = read_manifest(write_manifest(tmp_path / "m.tsv", rows))
    assert_same_spots(m.load("S1", expression=False), m.load("S1"))


@pytest.mark.parametrize("layout", ["h5-matrix", "h5-genome-group", "mtx"])
def test_visium_barcodes_without_the_matrix_values(tmp_path, shared_data, layout):
    if layout == "mtx":
        outs = tmp_path / "outs"
        shutil.copytree(shared_data / "visium" / "spaceranger3_mouse_cytassist", outs)
        data = outs / "filtered_feature_bc_matrix" / "matrix.mtx.gz"
        full = read_visium(outs)
        data.write_bytes(b"not a matrix market file")
    else:
        outs = tmp_path / "outs"
        write_visium(outs, h5_layout=layout.removeprefix("h5-"))
        full = read_visium(outs)
        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "r+") as f:
            group = f["matrix"] if "matrix" in f else f[next(iter(f))]
            del group["data"]  # the counts are gone, the barcodes are not
    with pytest.raises(InputError, match="filtered_feature_bc_matrix"):
        read_visium(outs)
    assert_same_spots(read_visium(outs, expression=False), full)


def test_hest_and_h5ad_spots_without_x(tmp_path):
    write_hest(tmp_path / "hest")
    h5ad, wsi = tmp_path / "hest" / "st" / "TENX99.h5ad", tmp_path / "hest" / "wsis" / "TENX99.tif"
    full_hest, full_h5ad = read_hest(tmp_path / "hest", "TENX99"), read_h5ad(h5ad, image=wsi, microns_per_pixel=0.5)
    with h5py.File(h5ad, "r+") as f:
        del f["X"]["data"]  # an expression matrix that cannot be read
    with pytest.raises(InputError, match="TENX99"):
        read_hest(tmp_path / "hest", "TENX99")
    assert_same_spots(read_hest(tmp_path / "hest", "TENX99", expression=False), full_hest)
    assert_same_spots(read_h5ad(h5ad, image=wsi, microns_per_pixel=0.5, expression=False), full_h5ad)


def test_embedding_never_parses_the_counts(tmp_path):
    """A counts table with a damaged value stops training with a message, but not embedding."""
    files = write_st_slide(tmp_path / "S1", grid=3, pitch_px=60, image_size=(240, 240))
    text = files["counts"].read_text().splitlines()
    text[2] = text[2].rsplit("\t", 1)[0] + "\tn/a"
    files["counts"].write_text("\n".join(text) + "\n")
    manifest = write_manifest(tmp_path / "m.tsv", [{"slide": "S1", "patient": "P", "format": "st",
                                                     "microns_per_pixel": "1.0", **files}])
    with pytest.raises(InputError, match="missing or infinite count"):
        read_manifest(manifest).load("S1")
    out = embed_manifest(manifest, TINY, tmp_path / "e.h5", weights=tiny_weights(tmp_path), workers=0,
                         patch_um=50.0, progress=False)
    barcodes, emb = read_embeddings(out, "S1")
    assert len(barcodes) == 9 and emb.shape[0] == 9 and np.isfinite(emb).all()
