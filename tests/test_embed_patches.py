"""Spot patches: same physical field of view at any resolution, white padding at borders."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from PIL import Image

from conftest import write_manifest, write_st_slide
from hgc.cli import main
from hgc.data import Slide, read_manifest
from hgc.data.image import SlideImage
from hgc.embed.patches import PatchBatches, PatchSpec, crop_boxes
from hgc.errors import InputError


@pytest.fixture(scope="module")
def tissue(her2st_manifest):
    """A 1,400 px square of real tissue around spots of section C3, with those spots (µm/px 0.6691)."""
    slide = read_manifest(her2st_manifest).load("C3")
    centre = np.median(slide.coords, axis=0)
    x0, y0 = (centre - 700).astype(int)
    region = slide.image.pixels()[y0 : y0 + 1400, x0 : x0 + 1400].copy()
    slide.image.release()
    local = slide.coords - [x0, y0]
    inside = np.all((local > 200) & (local < 1200), axis=1)
    return region, local[inside][:12], slide.microns_per_pixel


def _slide(path, coords, mpp, scale=1.0) -> Slide:
    n = len(coords)
    return Slide(
        id=path.stem, patient="P", barcodes=np.array([f"s{i}" for i in range(n)], dtype=object),
        coords=np.asarray(coords, dtype=np.float64), counts=sp.csr_matrix((n, 1)),
        genes=np.array(["G"], dtype=object), microns_per_pixel=mpp, mpp_source="manifest",
        image=SlideImage(path, scale=scale),
    )


def _patches(slide: Slide, spec: PatchSpec) -> np.ndarray:
    data = PatchBatches(slide.image.pixels(), crop_boxes(slide, spec), spec.out_px, batch_size=64,
                        via_px=spec.via_px(slide))
    return data[0].numpy().astype(np.float64)


def _coarse(p: np.ndarray, cells: int = 14) -> np.ndarray:
    """Block means: compares tissue content while ignoring the detail a low resolution lacks."""
    b, c, h, w = p.shape
    return p.reshape(b, c, cells, h // cells, cells, w // cells).mean(axis=(3, 5))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("target_mpp", [1.4, 3.0])
def test_same_tissue_at_two_resolutions_gives_the_same_patches(tmp_path, tissue, target_mpp):
    region, spots, mpp = tissue
    Image.fromarray(region).save(tmp_path / "hi.png")
    f = mpp / target_mpp
    size = int(round(region.shape[1] * f))
    low = Image.fromarray(region).resize((size, size), Image.LANCZOS)
    low.save(tmp_path / "low.png")
    spec = PatchSpec(out_px=224)  # 112 µm
    hi = _slide(tmp_path / "hi.png", spots, mpp)
    lo = _slide(tmp_path / "low.png", spots * (size / region.shape[1]), mpp * region.shape[1] / size)
    assert crop_boxes(hi, spec)[0, 2] == round(112 / mpp)
    assert crop_boxes(lo, spec)[0, 2] == round(112 / lo.microns_per_pixel)
    a, b = _coarse(_patches(hi, spec)), _coarse(_patches(lo, spec))
    assert _corr(a, b) > 0.97
    assert np.abs(a - b).mean() < 6
    # The same image described as a downscaled copy of the full-resolution one (coordinates stay
    # full-resolution, SlideImage.scale maps them) gives the same patches as the native slide.
    scaled = _slide(tmp_path / "low.png", spots, mpp, scale=size / region.shape[1])
    c = _coarse(_patches(scaled, spec))
    assert _corr(a, c) > 0.97
    # Control: ignoring the resolution (same pixel box on both) is what this test catches.
    wrong = _coarse(_patches(lo, PatchSpec(out_px=224, native_px=int(round(112 / mpp)))))
    assert _corr(a, wrong) < 0.9


def test_a_working_resolution_makes_a_sharp_slide_look_like_its_coarse_scan(tmp_path, tissue):
    """A model trained on 0.67 µm/px slides and applied to a 3 µm/px scan sees blurrier patches
    than it learnt from; with the working resolution set to 3 µm/px both look alike, in detail."""
    region, spots, mpp = tissue
    size = int(round(region.shape[1] * mpp / 3.0))
    Image.fromarray(region).save(tmp_path / "hi.png")
    Image.fromarray(region).resize((size, size), Image.LANCZOS).save(tmp_path / "low.png")
    hi = _slide(tmp_path / "hi.png", spots, mpp)
    lo = _slide(tmp_path / "low.png", spots * (size / region.shape[1]), mpp * region.shape[1] / size)
    native, work = PatchSpec(out_px=224), PatchSpec(out_px=224, mpp=lo.microns_per_pixel)
    assert work.via_px(hi) == round(112 / lo.microns_per_pixel) and work.via_px(lo) is None  # never sharpened
    before = np.abs(_patches(hi, native) - _patches(lo, native)).mean()
    after = np.abs(_patches(hi, work) - _patches(lo, work)).mean()
    assert after < 0.6 * before, (before, after)
    np.testing.assert_array_equal(_patches(lo, work), _patches(lo, native))
    assert work.attrs(hi)["patch_mpp"] == lo.microns_per_pixel and "patch_mpp" not in native.attrs(hi)
    with pytest.raises(InputError, match="positive"):
        PatchSpec(mpp=0)


def test_border_spots_are_padded_white_not_shifted(tmp_path):
    img = np.zeros((100, 120, 3), dtype=np.uint8)
    img[:, :, 0] = np.arange(120, dtype=np.uint8)[None, :]  # red = column, green = row
    img[:, :, 1] = np.arange(100, dtype=np.uint8)[:, None]
    Image.fromarray(img).save(tmp_path / "grad.png")
    slide = _slide(tmp_path / "grad.png", [[0.0, 0.0], [60.0, 50.0], [119.0, 99.0]], mpp=1.0)
    spec = PatchSpec(out_px=40, native_px=40)  # no resampling: pixels are comparable exactly
    p = PatchBatches(slide.image.pixels(), crop_boxes(slide, spec), 40, 8)[0].numpy()
    shared = PatchBatches(slide.image.pixels(), crop_boxes(slide, spec), 40, 8, share=True)  # spawn workers
    np.testing.assert_array_equal(shared[0].numpy(), p)
    corner = p[0]
    assert (corner[:, :20, :] == 255).all() and (corner[:, :, :20] == 255).all()
    assert corner[0, 20, 20] == 0 and corner[1, 20, 20] == 0  # image pixel (0, 0) at the centre
    assert p[1, 0, 20, 20] == 60 and p[1, 1, 20, 20] == 50
    assert p[2, 0, 20, 20] == 119 and p[2, 1, 20, 20] == 99
    assert (p[2][:, 21:, :] == 255).all() and (p[2][:, :, 21:] == 255).all()


def test_patch_spec_defaults_and_errors(tmp_path):
    assert PatchSpec(out_px=224).width_um == 112.0
    assert PatchSpec(out_px=260).width_um == 130.0
    with pytest.raises(InputError, match="not both"):
        PatchSpec(um=100, native_px=100)
    with pytest.raises(InputError, match="positive"):
        PatchSpec(um=-1)
    slide = _slide(tmp_path / "x.png", [[1.0, 1.0]], mpp=float("nan"))
    with pytest.raises(InputError, match="microns per pixel"):
        PatchSpec().box_px(slide)


def test_patches_command_writes_hest_layout(tmp_path):
    files = write_st_slide(tmp_path / "data", grid=3, pitch_px=50, image_size=(200, 200))
    manifest = write_manifest(
        tmp_path / "m.tsv",
        [{"slide": "S1", "patient": "P", "format": "st", "microns_per_pixel": "1.0", **files}],
    )
    result = CliRunner().invoke(main, ["patches", str(manifest), "--out", str(tmp_path / "p"), "--px", "32"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "p" / "S1.h5") as f:
        img, barcodes, coords = f["img"][()], f["barcode"].asstr()[()], f["coords"][()]
        assert f.attrs["patch_um"] == pytest.approx(16.0)
    assert img.shape == (9, 32, 32, 3) and img.dtype == np.uint8
    slide = read_manifest(manifest).load("S1")
    np.testing.assert_array_equal(barcodes, slide.barcodes.astype(str))
    np.testing.assert_allclose(coords, slide.coords)


def test_wide_crops_are_resampled_a_few_at_a_time_with_the_same_result(monkeypatch):
    """Crops of a wide field of view are resampled in slices (bounded float memory), giving what
    one pass over the whole batch gives."""
    import torch

    from hgc.embed import patches

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 300, 300), dtype=np.uint8))
    batches = PatchBatches(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 3), np.int64), 64, 8,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    whole = batches.finish(x)
    monkeypatch.setattr(patches, "_RESAMPLE_BYTES", 2 * 4 * 3 * 300 * 300)  # two crops per slice
    sliced = batches.finish(x)
    assert sliced.shape == whole.shape == (6, 3, 64, 64)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


def test_embedding_settings_read_as_a_sentence():
    from hgc.embed.store import describe_embedding

    text = describe_embedding({"encoder": "uni", "weights_sha256": "ab" * 32, "patch_mode": "native-px",
                               "patch_box_px": 224.0, "patch_um": 50.0, "patch_px": 224, "patch_mpp": 2.0,
                               "patch_context": np.array([2.0, 4.0]), "patch_tta": np.int64(8)})
    assert text == ("encoder uni (weights sha256 abababababab...), patches of 224 px at 224 px, brought down to "
                    "2.00 µm/px, with fields of view 2, 4 times as wide, each the mean over its 4 rotations and "
                    "their mirror images")
    assert describe_embedding({"encoder": "effnet-lite1", "patch_um": 120.0, "patch_px": 240}).endswith(
        "patches of 120 µm at 240 px")
