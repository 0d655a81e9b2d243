"""HEST-1k and AnnData readers, on small samples written here in the published layouts."""
from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image

from conftest import write_manifest
from hgc.data import read_manifest
from hgc.data.readers.h5ad import read_h5ad
from hgc.data.readers.hest import read_hest
from hgc.data.readers.visium import read_visium
from hgc.errors import InputError

WSI_SIZE = (256, 192)  # (width, height) of level 0


def _adata(n: int = 6, seed: int = 0) -> anndata.AnnData:
    """Raw counts and full-resolution pixel positions, as HEST-1k stores them."""
    rng = np.random.default_rng(seed)
    genes = ["ERBB2", "KRT19", "MT-CO1", "ERBB2", "ACTB"]
    i = np.arange(n)
    obs = pd.DataFrame(
        {"in_tissue": 1, "array_row": i // 3, "array_col": (i % 3) * 2},
        index=pd.Index([f"BC{k:02d}-1" for k in i]),
    )
    X = sp.csr_matrix(rng.poisson(4.0, size=(n, len(genes))).astype(np.float32))
    with pytest.warns(UserWarning, match="not unique"):  # anndata warns on the repeated symbol
        adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = np.column_stack([30.0 + 60.0 * (i % 3), 40.0 + 80.0 * (i // 3)])
    return adata


def write_hest(
    root: Path,
    sample: str = "TENX99",
    *,
    technology: str = "Visium",
    patient: str | None = "Patient 7",
    mpp: float | None = 0.5,
) -> tuple[anndata.AnnData, np.ndarray]:
    """A HEST-1k sample: st/<id>.h5ad, a tiled pyramidal wsis/<id>.tif, metadata/<id>.json."""
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    adata = _adata()
    adata.write_h5ad(root / "st" / f"{sample}.h5ad")
    rng = np.random.default_rng(1)
    level0 = rng.integers(0, 255, size=(WSI_SIZE[1], WSI_SIZE[0], 3), dtype=np.uint8)
    with tifffile.TiffWriter(root / "wsis" / f"{sample}.tif") as tif:
        tif.write(level0, tile=(64, 64), photometric="rgb", subifds=1)
        tif.write(level0[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    meta = {
        "id": sample,
        "st_technology": technology,
        "pixel_size_um_estimated": mpp,
        "pixel_size_um_embedded": 0.2631,
        "patient": patient,
        "species": "Homo sapiens",
    }
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta))
    return adata, level0


def test_tiled_wsi_regions_decode_only_their_tiles(tmp_path: Path) -> None:
    """read_region on a tiled TIFF decodes the tiles under the box, not the slide, and equals
    a crop of the fully decoded image everywhere: across tile seams and past the borders."""
    from hgc.data.image import SlideImage, crop_padded

    _, level0 = write_hest(tmp_path)
    image = SlideImage(tmp_path / "wsis" / "TENX99.tif")
    w, h = WSI_SIZE
    boxes = [(60, 60, 10, 10), (0, 0, 64, 64), (100, 30, 70, 90), (-20, -7, 40, 30), (w - 30, h - 5, 50, 40)]
    regions = [image.read_region(*box) for box in boxes]
    assert image._pixels is None  # nothing was decoded whole
    for box, region in zip(boxes, regions):
        np.testing.assert_array_equal(region, crop_padded(level0, *box, fill=255))
    np.testing.assert_array_equal(image.pixels(), level0)


def test_wsi_handle_pickles_thumbnails_from_the_pyramid_and_streams_16_bit_tiles(tmp_path: Path) -> None:
    """Worker processes get the file reference (no pixels, no open handle); a plot thumbnail comes
    from the smallest pyramid level wide enough; 16-bit tiles are streamed, each scaled from the
    16-bit range, so a region equals the same region of the image decoded whole."""
    import pickle

    from hgc.data.image import SlideImage

    _, level0 = write_hest(tmp_path)
    image = SlideImage(tmp_path / "wsis" / "TENX99.tif")
    first = image.file_region(30, 50, 80, 70)
    copy = pickle.loads(pickle.dumps(image))
    assert copy._pixels is None and copy._tif is None and copy.tiled
    np.testing.assert_array_equal(copy.file_region(30, 50, 80, 70), first)
    thumb = image.thumbnail(100)  # level 1 is 128 x 96: every second pixel of it
    np.testing.assert_array_equal(thumb, level0[::2, ::2][::2, ::2])
    assert image._pixels is None

    deep = (level0.astype(np.uint16) * 257)[:128, :128]
    tifffile.imwrite(tmp_path / "deep.tif", deep, tile=(64, 64), photometric="rgb")
    deep_image = SlideImage(tmp_path / "deep.tif")
    assert deep_image.tiled
    region = deep_image.file_region(10, 20, 64, 64)
    assert deep_image._pixels is None and region.dtype == np.uint8  # read tile by tile...
    np.testing.assert_array_equal(region, level0[20:84, 10:74])  # ...and scaled from the 16-bit range
    np.testing.assert_array_equal(deep_image.pixels(), level0[:128, :128])  # as when decoded whole


def test_hest_sample(tmp_path: Path) -> None:
    adata, level0 = write_hest(tmp_path)
    s = read_hest(tmp_path, "TENX99")
    assert (s.id, s.patient, s.platform) == ("TENX99", "Patient 7", "visium")
    assert (s.microns_per_pixel, s.mpp_source) == (0.5, "format")
    assert list(s.barcodes) == list(adata.obs_names)
    assert list(s.genes) == ["ERBB2", "KRT19", "MT-CO1", "ERBB2-1", "ACTB"]
    np.testing.assert_array_equal(s.coords, adata.obsm["spatial"])
    np.testing.assert_array_equal(s.counts.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(s.array_coords, adata.obs[["array_row", "array_col"]].to_numpy())
    assert s.image.path == tmp_path / "wsis" / "TENX99.tif" and s.image.size == WSI_SIZE
    np.testing.assert_array_equal(s.image.read_region(10, 20, 32, 16), level0[20:36, 10:42])
    assert s.source["format"] == "hest" and s.source["metadata"].endswith("TENX99.json")


def test_hest_st_platform_fallbacks_and_overrides(tmp_path: Path) -> None:
    write_hest(tmp_path, technology="Spatial Transcriptomics", patient=None, mpp=None)
    s = read_hest(tmp_path, "TENX99")
    assert (s.platform, s.patient) == ("st", "TENX99")  # no patient recorded: the sample id
    assert (s.microns_per_pixel, s.mpp_source) == (0.2631, "format")  # embedded size as fallback
    s = read_hest(tmp_path, "TENX99", slide="A1", patient="P", microns_per_pixel=0.3, coord_scale=0.5)
    assert (s.id, s.patient, s.microns_per_pixel, s.mpp_source) == ("A1", "P", 0.3, "manifest")
    np.testing.assert_allclose(s.coords, read_hest(tmp_path, "TENX99").coords * 0.5)


def test_hest_from_manifest(tmp_path: Path) -> None:
    write_hest(tmp_path / "hest")
    manifest = write_manifest(
        tmp_path / "m.tsv",
        [{"slide": "H1", "patient": "P1", "format": "hest", "path": "hest", "id": "TENX99"}],
    )
    s = read_manifest(manifest).load("H1")
    assert (s.id, s.patient, s.n_spots, s.mpp_source) == ("H1", "P1", 6, "format")


def test_hest_missing_wsi(tmp_path: Path) -> None:
    write_hest(tmp_path)
    (tmp_path / "wsis" / "TENX99.tif").unlink()
    with pytest.raises(InputError) as err:
        read_hest(tmp_path, "TENX99")
    msg = str(err.value)
    assert "slide 'TENX99'" in msg and "whole-slide image not found" in msg
    assert str(tmp_path / "wsis" / "TENX99.tif") in msg


def test_hest_malformed_metadata(tmp_path: Path) -> None:
    write_hest(tmp_path)
    (tmp_path / "metadata" / "TENX99.json").write_text('{"pixel_size_um_estimated": ')
    with pytest.raises(InputError, match=r"slide 'TENX99': malformed HEST-1k metadata .*TENX99\.json"):
        read_hest(tmp_path, "TENX99")


def test_h5ad_round_trip(tmp_path: Path, shared_data: Path) -> None:
    s = read_visium(shared_data / "visium" / "spaceranger1_tiny", slide="V1", patient="P1")
    path = tmp_path / "v1.h5ad"
    s.to_anndata().write_h5ad(path)
    r = read_h5ad(path)
    assert (r.id, r.patient, r.platform) == ("V1", "P1", "visium")
    np.testing.assert_array_equal(r.barcodes, s.barcodes)
    np.testing.assert_array_equal(r.genes, s.genes)
    np.testing.assert_array_equal(r.coords, s.coords)
    np.testing.assert_array_equal(r.array_coords, s.array_coords)
    assert (r.counts != s.counts).nnz == 0 and r.counts.dtype == s.counts.dtype
    assert (r.microns_per_pixel, r.mpp_source) == (s.microns_per_pixel, s.mpp_source)
    assert (r.image.path, r.image.scale) == (s.image.path, s.image.scale)


def test_h5ad_overrides(tmp_path: Path, shared_data: Path) -> None:
    s = read_visium(shared_data / "visium" / "spaceranger1_tiny")
    path = tmp_path / "v1.h5ad"
    s.to_anndata().write_h5ad(path)
    full = tmp_path / "he.png"
    Image.fromarray(np.zeros((2000, 2000, 3), np.uint8)).save(full)
    r = read_h5ad(path, slide="X", patient="Q", image=full, microns_per_pixel=1.2, coord_scale=0.15)
    assert (r.id, r.patient, r.microns_per_pixel, r.mpp_source) == ("X", "Q", 1.2, "manifest")
    assert (r.image.path, r.image.scale) == (full, 1.0)  # the hires scale belongs to the hires PNG
    np.testing.assert_allclose(r.coords, s.coords * 0.15)


def test_h5ad_from_manifest(tmp_path: Path) -> None:
    _adata().write_h5ad(tmp_path / "a.h5ad")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "a.png")
    manifest = write_manifest(
        tmp_path / "m.tsv",
        [{"slide": "A", "patient": "P1", "format": "h5ad", "path": "a.h5ad", "image": "a.png",
          "microns_per_pixel": "0.9"}],
    )
    s = read_manifest(manifest).load("A")
    assert (s.id, s.patient, s.n_spots, s.n_genes) == ("A", "P1", 6, 5)
    assert (s.microns_per_pixel, s.mpp_source, s.image.path) == (0.9, "manifest", tmp_path / "a.png")


def test_h5ad_scanpy_visium_scalefactors(tmp_path: Path) -> None:
    adata = _adata()
    adata.uns["spatial"] = {"lib1": {"scalefactors": {"spot_diameter_fullres": 110.0}}}
    adata.write_h5ad(tmp_path / "scanpy.h5ad")
    r = read_h5ad(tmp_path / "scanpy.h5ad", patient="P")
    assert (r.id, r.patient, r.image) == ("scanpy", "P", None)
    assert (r.microns_per_pixel, r.mpp_source, r.platform) == (0.5, "format", "visium")


def test_h5ad_without_spatial(tmp_path: Path) -> None:
    adata = _adata()
    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(InputError) as err:
        read_h5ad(tmp_path / "nospatial.h5ad", slide="S9", patient="P", microns_per_pixel=1.0)
    msg = str(err.value)
    assert "slide 'S9'" in msg and "obsm['spatial']" in msg and "nospatial.h5ad" in msg


def test_h5ad_without_mpp(tmp_path: Path) -> None:
    _adata().write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=r"slide 'S9': .*a\.h5ad records no microns per pixel"):
        read_h5ad(tmp_path / "a.h5ad", slide="S9")


def test_h5ad_normalised_values_refused(tmp_path: Path) -> None:
    adata = _adata()
    adata.X = adata.X / 3.0
    adata.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(InputError, match=r"slide 'S9': .*norm\.h5ad has .* non-integer count"):
        read_h5ad(tmp_path / "norm.h5ad", slide="S9", microns_per_pixel=1.0)


def test_h5ad_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"slide 'S9': AnnData file not found: .*gone\.h5ad"):
        read_h5ad(tmp_path / "gone.h5ad", slide="S9")
