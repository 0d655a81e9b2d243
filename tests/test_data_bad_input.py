"""Every bad input gets an hgc error naming the slide, the file and what was expected,
the CLI prints it as one line with a non-zero exit, and nothing is written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import write_manifest, write_st_slide
from hgc.cli import main
from hgc.data import read_manifest
from hgc.errors import InputError


def _row(paths: dict[str, Path], slide: str = "S1", patient: str = "P1", **extra) -> dict[str, str]:
    row = {"slide": slide, "patient": patient, "format": "st", **{k: str(v) for k, v in paths.items()}}
    row.setdefault("microns_per_pixel", "1.0")
    row.update(extra)
    return row


def _inspect_fails(manifest: Path, *needles: str) -> None:
    """API and CLI both fail with a message containing every needle; no file appears."""
    before = sorted(p for p in manifest.parent.rglob("*"))
    with pytest.raises(InputError) as err:
        for _ in read_manifest(manifest).slides():
            pass
    for needle in needles:
        assert needle in str(err.value)
    result = CliRunner().invoke(main, ["data", "inspect", str(manifest)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and all(n in message for n in needles)
    assert sorted(p for p in manifest.parent.rglob("*")) == before


def test_good_slide_reads(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    slide = read_manifest(write_manifest(tmp_path / "m.tsv", [_row(paths)])).load("S1")
    assert slide.n_spots == 16 and slide.n_genes == 5 and slide.mpp_source == "manifest"


def test_missing_file(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    paths["image"].unlink()
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "S1", "S1.jpg", "not found")


def test_truncated_image(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    data = paths["image"].read_bytes()
    paths["image"].write_bytes(data[: len(data) // 2])
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "S1.jpg", "truncated")


def test_unreadable_image(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    paths["image"].write_bytes(b"this is not an image")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "S1.jpg", "cannot read image")


def test_no_common_spots(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    text = paths["spots"].read_text().splitlines()
    shifted = [text[0]] + ["\t".join([str(int(c.split("\t")[0]) + 100)] + c.split("\t")[1:]) for c in text[1:]]
    paths["spots"].write_text("\n".join(shifted) + "\n")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "S1.tsv", "no spot in common")


def test_duplicate_barcodes(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    lines = paths["counts"].read_text().splitlines()
    paths["counts"].write_text("\n".join(lines + [lines[1]]) + "\n")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "duplicate spot ids", "1x1")


def test_spots_outside_image(tmp_path):
    paths = write_st_slide(tmp_path / "S1", image_size=(100, 100))
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "outside the image", "coord_scale")


def test_coord_scale_maps_downscaled_coordinates(tmp_path):
    paths = write_st_slide(tmp_path / "S1", image_size=(100, 100))
    slide = read_manifest(write_manifest(tmp_path / "m.tsv", [_row(paths, coord_scale="0.5")])).load("S1")
    assert slide.coords.max() == pytest.approx(80.0)


@pytest.mark.parametrize(
    "value, what", [(-1, "negative"), (np.nan, "NaN"), (2.5, "non-integer")]
)
def test_bad_counts(tmp_path, value, what):
    counts = np.ones((16, 5))
    counts[3, 2] = value
    paths = write_st_slide(tmp_path / "S1", counts=counts)
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "S1.tsv", what, "raw integer")


def test_missing_required_column(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    row = _row(paths)
    del row["patient"]
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [row]), "m.tsv", "required column", "patient")


def test_unknown_format(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths, format="xenium")]), "'S1'", "unknown format 'xenium'")


def test_same_slide_id_twice(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    manifest = write_manifest(tmp_path / "m.tsv", [_row(paths), _row(paths, patient="P2")])
    _inspect_fails(manifest, "'S1'", "appears twice", "lines 2 and 3")


def test_slide_with_no_spots(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    lines = paths["spots"].read_text().splitlines()
    paths["spots"].write_text("\n".join([lines[0]] + [row[: row.rfind("\t")] + "\t0" for row in lines[1:]]) + "\n")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "no spots under tissue")


def test_microns_per_pixel_from_spot_pitch(tmp_path):
    paths = write_st_slide(tmp_path / "S1", pitch_px=40.0)
    row = _row(paths)
    row["microns_per_pixel"] = ""
    slide = read_manifest(write_manifest(tmp_path / "m.tsv", [row])).load("S1")
    assert slide.mpp_source == "spot-pitch"
    assert slide.microns_per_pixel == pytest.approx(200.0 / 40.0)


def test_cscc_layout_with_float_spot_positions(tmp_path):
    """GSE144240 (cSCC): ``*_stdata.tsv`` counts and a spot table whose x/y are perturbed floats;
    spots join on the rounded array position, as Hist2ST reads them."""
    paths = write_st_slide(tmp_path / "P2", name="P2_ST_rep1")
    counts = tmp_path / "P2" / "P2_ST_rep1_stdata.tsv"
    paths["counts"].rename(counts)
    lines = paths["spots"].read_text().splitlines()
    jittered = [lines[0]]
    for i, line in enumerate(lines[1:]):
        x, y, *rest = line.split("\t")
        jittered.append("\t".join([f"{int(x) + 0.04 * (-1) ** i:.3f}", f"{int(y) - 0.03:.3f}", *rest]))
    spots = tmp_path / "P2" / "spot_data-selection-P2_ST_rep1.tsv"
    spots.write_text("\n".join(jittered) + "\n")
    row = _row({"counts": counts, "spots": spots, "image": paths["image"]}, slide="P2_ST_rep1", patient="P2")
    slide = read_manifest(write_manifest(tmp_path / "m.tsv", [row])).load("P2_ST_rep1")
    assert slide.n_spots == 16 and slide.patient == "P2"
    assert sorted(map(tuple, slide.array_coords)) == [(x, y) for x in range(1, 5) for y in range(1, 5)]
    np.testing.assert_allclose(slide.coords[0], slide.array_coords[0] * 40.0)


# --- tables with values that are not numbers, positions that are not there -------------------------

def _edit_cell(path: Path, row: int, column: str, value: str) -> None:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    cells = lines[row].split("\t")
    cells[header.index(column)] = value
    lines[row] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("value, what", [("12,5", "non-numeric ERBB2 '12,5' at spot 3x1"),
                                         ("n/a", "missing or infinite count(s) (first at spot 3x1, gene ERBB2")])
def test_non_numeric_count_is_named(tmp_path, value, what):
    paths = write_st_slide(tmp_path / "S1")
    _edit_cell(paths["counts"], 3, "ERBB2", value)
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "S1.tsv", what)


@pytest.mark.parametrize("column, value", [("pixel_x", "2546.5px"), ("y", "two")])
def test_non_numeric_spot_position_is_named(tmp_path, column, value):
    paths = write_st_slide(tmp_path / "S1")
    _edit_cell(paths["spots"], 2, column, value)
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "S1_selection.tsv", f"'{value}'", column)


def test_missing_pixel_position_names_file_and_spot(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    _edit_cell(paths["spots"], 6, "pixel_y", "")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "S1_selection.tsv", "spot 2x2",
                   "no valid pixel position")


def test_anndata_without_expression_is_a_slide_to_predict_not_to_train_on(tmp_path):
    import anndata as ad
    import pandas as pd

    from hgc.data.genes import expression_matrix

    a = ad.AnnData(obs=pd.DataFrame(index=["s1", "s2"]), var=pd.DataFrame(index=["ERBB2"]))
    a.obsm["spatial"] = np.zeros((2, 2))
    a.write_h5ad(tmp_path / "x.h5ad")
    row = {"slide": "X", "patient": "P", "format": "h5ad", "path": str(tmp_path / "x.h5ad"), "microns_per_pixel": "1"}
    slide = read_manifest(write_manifest(tmp_path / "m.tsv", [row])).load("X")
    assert slide.n_spots == 2 and not slide.has_expression and slide.n_genes == 0
    with pytest.raises(InputError, match=r"slide 'X' has no expression \(.*x\.h5ad gives no counts\)"):
        expression_matrix(slide, ["ERBB2"])


def _visium_copy(tmp_path, shared_data) -> Path:
    import shutil

    outs = tmp_path / "outs"
    shutil.copytree(shared_data / "visium" / "spaceranger3_mouse_cytassist", outs)
    return outs


def test_truncated_visium_matrix(tmp_path, shared_data):
    outs = _visium_copy(tmp_path, shared_data)
    mtx = outs / "filtered_feature_bc_matrix" / "matrix.mtx.gz"
    mtx.write_bytes(mtx.read_bytes()[: mtx.stat().st_size // 2])
    row = {"slide": "V", "patient": "P", "format": "visium", "path": str(outs)}
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [row]), "'V'", "matrix.mtx.gz", "cannot read")


def test_visium_in_tissue_must_be_0_or_1(tmp_path, shared_data):
    outs = _visium_copy(tmp_path, shared_data)
    positions = next((outs / "spatial").glob("tissue_positions*.csv"))
    lines = positions.read_text().splitlines()
    cells = lines[5].split(",")
    cells[1] = "yes"
    lines[5] = ",".join(cells)
    positions.write_text("\n".join(lines) + "\n")
    row = {"slide": "V", "patient": "P", "format": "visium", "path": str(outs)}
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [row]), "'V'", positions.name, "in_tissue 'yes'",
                   cells[0], "expected 1 (spot under tissue) or 0")


# --- images decoded into the pixels they hold, or refused ------------------------------------------

def test_16_bit_grayscale_png_is_scaled_not_white(tmp_path):
    from hgc.data.image import SlideImage

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels = SlideImage(tmp_path / "deep.png").pixels()
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("damage", ["cut short, end marker kept", "corrupted middle"])
def test_damaged_jpeg_data_is_an_error_not_grey_rows(tmp_path, damage):
    from hgc.data.image import SlideImage

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "he.jpg", quality=90)
    data = bytearray((tmp_path / "he.jpg").read_bytes())
    if damage.startswith("cut"):
        data = data[: len(data) // 2] + b"\xff\xd9"
    else:
        data[len(data) // 3 : len(data) // 3 + 64] = b"\xab" * 64
    (tmp_path / "he.jpg").write_bytes(bytes(data))
    image = SlideImage(tmp_path / "he.jpg")
    assert image.size == (256, 256)  # the header is intact
    with pytest.raises(InputError, match=r"he\.jpg is damaged: the JPEG decoder reports 'Corrupt JPEG data"):
        image.pixels()


def test_jpeg_decodes_as_pillow_does(tmp_path):
    from hgc.data.image import SlideImage

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg", quality=85)
    with Image.open(tmp_path / "ok.jpg") as im:
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(SlideImage(tmp_path / "ok.jpg").pixels(), expected)


def test_exif_rotated_image_is_refused_with_the_right_advice(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    with Image.open(paths["image"]) as im:
        exif = im.getexif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display"
        im.save(paths["image"], exif=exif)
    message = "carries an EXIF orientation tag (rotated 90° clockwise for display)"
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "S1.jpg", message, "exiftool")


def test_spot_listed_twice_in_the_spot_table(tmp_path):
    paths = write_st_slide(tmp_path / "S1")
    lines = paths["spots"].read_text().splitlines()
    paths["spots"].write_text("\n".join(lines + [lines[1]]) + "\n")
    _inspect_fails(write_manifest(tmp_path / "m.tsv", [_row(paths)]), "'S1'", "S1_selection.tsv", "1x1", "more than once")
