"""Visium reader on real Space Ranger 1.x / 3.x outputs and a Space Ranger 2.x layout written here."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy.io import mmread

from conftest import write_manifest
from hgc.data import read_manifest
from hgc.data.readers._common import make_unique
from hgc.data.readers.visium import read_visium
from hgc.errors import InputError

SPOT_UM = 55.0
GENES = ["GAPDH", "ERBB2", "KRT19", "ERBB2", "ACTB"]  # ERBB2 twice: two Ensembl ids, one symbol
IN_TISSUE = [f"BC{i:02d}-1" for i in range(6)]
MATRIX_BARCODES = ["BC05-1", "BC00-1", "BC03-1", "BC01-1", "BC04-1", "BC02-1", "BC06-1"]  # BC06 off tissue


def _positions(barcodes: list[str]) -> pd.DataFrame:
    i = np.arange(len(barcodes))
    return pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": (i < 6).astype(int),
            "array_row": i // 3,
            "array_col": (i % 3) * 2,
            "pxl_row_in_fullres": 30.0 + 40.0 * (i // 3),
            "pxl_col_in_fullres": 25.5 + 50.0 * (i % 3),
        }
    )


def write_visium(
    outs: Path, *, h5_layout: str = "matrix", header: bool = True, seed: int = 0
) -> np.ndarray:
    """A Space Ranger 2.x-style outs/ folder; returns the dense barcodes x features counts."""
    rng = np.random.default_rng(seed)
    (outs / "spatial").mkdir(parents=True)
    features = GENES + ["CD3_TotalSeqB"] if h5_layout == "matrix" else GENES
    dense = rng.poisson(3.0, size=(len(MATRIX_BARCODES), len(features)))
    m = sp.csr_matrix(dense)  # barcodes x features CSR == features x barcodes CSC, as 10x stores it
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
        if h5_layout == "matrix":  # Cell Ranger >= 3 / Space Ranger layout
            g = f.create_group("matrix")
            feat = g.create_group("features")
            feat["name"] = np.array(features, dtype="S")
            feat["id"] = np.array([f"ENSG{i:011d}" for i in range(len(features))], dtype="S")
            feat["feature_type"] = np.array(
                ["Gene Expression"] * len(GENES) + ["Antibody Capture"], dtype="S"
            )
        else:  # Cell Ranger 2 layout: one group per genome
            g = f.create_group("GRCh38")
            g["gene_names"] = np.array(features, dtype="S")
            g["genes"] = np.array([f"ENSG{i:011d}" for i in range(len(features))], dtype="S")
        g["barcodes"] = np.array(MATRIX_BARCODES, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array([len(features), len(MATRIX_BARCODES)], dtype=np.int32)
    positions = _positions(IN_TISSUE + ["BC06-1", "BC07-1"])
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    positions.to_csv(outs / "spatial" / name, index=False, header=header)
    scalefactors = {
        "spot_diameter_fullres": 20.0,
        "tissue_hires_scalef": 0.5,
        "tissue_lowres_scalef": 0.1,
        "fiducial_diameter_fullres": 32.0,
    }
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(outs / "spatial" / "tissue_hires_image.png")
    return dense


def _expected(dense: np.ndarray) -> tuple[list[str], np.ndarray]:
    keep = [i for i, b in enumerate(MATRIX_BARCODES) if b in IN_TISSUE]
    return [MATRIX_BARCODES[i] for i in keep], dense[keep][:, : len(GENES)]


@pytest.mark.parametrize("h5_layout", ["matrix", "genome-group"])
def test_spaceranger2_layout(tmp_path: Path, h5_layout: str) -> None:
    outs = tmp_path / "sampleA" / "outs"
    dense = write_visium(outs, h5_layout=h5_layout)
    s = read_visium(outs)
    barcodes, counts = _expected(dense)
    assert s.id == "sampleA" and s.patient == "sampleA" and s.platform == "visium"
    assert list(s.barcodes) == barcodes  # matrix order, off-tissue barcode dropped
    assert list(s.genes) == ["GAPDH", "ERBB2", "KRT19", "ERBB2-1", "ACTB"]  # antibody dropped
    np.testing.assert_array_equal(s.counts.toarray(), counts)
    pos = _positions(IN_TISSUE).set_index("barcode").loc[barcodes]
    np.testing.assert_array_equal(s.coords[:, 0], pos["pxl_col_in_fullres"])
    np.testing.assert_array_equal(s.coords[:, 1], pos["pxl_row_in_fullres"])
    np.testing.assert_array_equal(s.array_coords, pos[["array_row", "array_col"]].to_numpy())
    assert s.microns_per_pixel == pytest.approx(SPOT_UM / 20.0) and s.mpp_source == "format"
    assert s.image.path.name == "tissue_hires_image.png" and s.image.scale == 0.5
    assert s.image.size == (200, 200)


def test_fullres_image_mpp_and_coord_scale(tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    write_visium(outs)
    full = tmp_path / "he.png"
    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(full)
    s = read_visium(outs, slide="S", patient="P", image=full, coord_scale=2.0)
    assert (s.id, s.patient, s.image.path, s.image.scale) == ("S", "P", full, 1.0)
    ref = read_visium(outs)
    np.testing.assert_allclose(s.coords, ref.coords * 2.0)
    assert s.microns_per_pixel == pytest.approx(SPOT_UM / 40.0)  # spot diameter scaled too
    s = read_visium(outs, microns_per_pixel=0.5, coord_scale=2.0)
    assert (s.microns_per_pixel, s.mpp_source) == (0.5, "manifest")
    assert s.image.scale == pytest.approx(0.25)  # hires PNG stays aligned with scaled positions


def test_spaceranger1_tiny_h5_no_header(shared_data: Path) -> None:
    outs = shared_data / "visium" / "spaceranger1_tiny"
    s = read_visium(outs)
    positions = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    with h5py.File(outs / "filtered_feature_bc_matrix.h5") as f:
        h5_barcodes = f["matrix/barcodes"][:].astype(str)
        total = f["matrix/data"][:].sum()
    in_tissue = set(positions.index[positions[1] == 1])
    expected = [b for b in h5_barcodes if b in in_tissue]
    assert (s.n_spots, s.n_genes) == (len(expected), 100) and list(s.barcodes) == expected
    assert s.counts.sum() == pytest.approx(total)
    np.testing.assert_array_equal(s.coords, positions.loc[expected, [5, 4]].to_numpy(float))
    np.testing.assert_array_equal(s.array_coords, positions.loc[expected, [2, 3]].to_numpy())
    assert s.microns_per_pixel == pytest.approx(SPOT_UM / 89.42751063343188)
    assert s.image.path.name == "tissue_hires_image.png" and s.image.scale == 0.150015


def test_spaceranger3_cytassist_matrix_market(shared_data: Path, caplog) -> None:
    outs = shared_data / "visium" / "spaceranger3_mouse_cytassist"
    with caplog.at_level(logging.INFO):
        s = read_visium(outs)
    assert (s.n_spots, s.n_genes) == (2898, 19465)
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col="barcode")
    in_tissue = positions.index[positions["in_tissue"] == 1]
    assert len(in_tissue) == 2898 and set(in_tissue) == set(s.barcodes)  # every in-tissue spot, no other
    matrix = mmread(str(outs / "filtered_feature_bc_matrix" / "matrix.mtx.gz"))
    assert s.counts.sum() == pytest.approx(matrix.sum())
    assert pd.Index(s.genes).is_unique and {"Aldoa", "Aldoa-1"} <= set(s.genes)
    assert "11 duplicate gene symbols" in caplog.text and "lowres image" in caplog.text
    xy = positions.loc[s.barcodes, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    np.testing.assert_array_equal(s.coords, xy)
    assert s.image.path.name == "tissue_lowres_image.png" and s.image.scale == 0.2


def test_make_unique_matches_anndata() -> None:
    names = np.array(["A", "A", "A-1", "B", "A"], dtype=object)
    assert list(make_unique(names, "s", "f")) == ["A", "A-2", "A-1", "B", "A-3"]


def test_manifest_entry_with_annotations(tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    write_visium(outs)
    labels = pd.DataFrame({"Barcode": IN_TISSUE[::-1], "region": list("TTSSII")})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    manifest = write_manifest(
        tmp_path / "m.tsv",
        [{"slide": "V1", "patient": "P1", "format": "visium", "path": "outs",
          "microns_per_pixel": "0.8", "annotations": "labels.csv"}],
    )
    s = read_manifest(manifest).load("V1")
    assert (s.id, s.patient, s.microns_per_pixel, s.mpp_source) == ("V1", "P1", 0.8, "manifest")
    expected = labels.set_index("Barcode").loc[s.barcodes, "region"].to_numpy()
    np.testing.assert_array_equal(s.annotations["region"].to_numpy(), expected)


# --- bad input: each error names the slide, the file and what was expected ---------------------


def test_without_matrix_the_in_tissue_spots_are_read_to_predict(tmp_path: Path) -> None:
    """A Space Ranger folder without its count matrix: the in-tissue spots and the image, no expression."""
    outs = tmp_path / "outs"
    write_visium(outs)
    full = read_visium(outs, slide="S1")
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    s = read_visium(outs, slide="S1")
    assert not s.has_expression and s.n_genes == 0
    assert set(s.barcodes) >= set(full.barcodes)  # every in-tissue spot, with or without counts
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv").set_index("barcode")
    assert (positions.loc[s.barcodes, "in_tissue"] == 1).all()
    with pytest.raises(InputError, match="slide 'S1' has no expression .*training needs its counts"):
        s.require_expression("training")


def test_missing_positions(tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    write_visium(outs)
    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(InputError) as err:
        read_visium(outs, slide="S1")
    msg = str(err.value)
    assert "slide 'S1'" in msg and str(outs / "spatial") in msg
    assert "tissue_positions.csv or tissue_positions_list.csv" in msg


def test_positions_without_common_barcode(tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    write_visium(outs)
    other = _positions([f"XX{i:02d}-1" for i in range(8)])
    other.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(InputError) as err:
        read_visium(outs, slide="S1")
    msg = str(err.value)
    assert "slide 'S1'" in msg and "no barcode" in msg
    assert "filtered_feature_bc_matrix.h5" in msg and "tissue_positions.csv" in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "expected a JSON object"), ('{"spot_diameter_fullres": "big"}', "positive number")],
)
def test_malformed_scalefactors(tmp_path: Path, content: str, expected: str) -> None:
    outs = tmp_path / "outs"
    write_visium(outs)
    (outs / "spatial" / "scalefactors_json.json").write_text(content)
    with pytest.raises(InputError) as err:
        read_visium(outs, slide="S1", image=None)
    msg = str(err.value)
    assert "slide 'S1'" in msg and "scalefactors_json.json" in msg and expected in msg


def test_missing_fullres_image(tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    write_visium(outs)
    with pytest.raises(InputError, match="slide 'S1': full-resolution image not found: .*nope.tif"):
        read_visium(outs, slide="S1", image=tmp_path / "nope.tif")


def test_real_folder_copy_without_hires_uses_lowres(tmp_path: Path, shared_data: Path) -> None:
    outs = tmp_path / "tiny"
    shutil.copytree(shared_data / "visium" / "spaceranger1_tiny", outs)
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    s = read_visium(outs)
    assert s.image.path.name == "tissue_lowres_image.png" and s.image.scale == 0.045004502
