"""`hgc embed` on the real her2st sections: shapes, caching, determinism, settings changes."""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embed_helpers import TINY, tiny_manifest, tiny_weights
from hgc._devices import resolve_device
from hgc.cli import main
from hgc.data import read_manifest
from hgc.embed import embed_manifest, embed_slide, load_encoder, read_attrs, read_embeddings
from hgc.embed.patches import PatchSpec
from hgc.errors import InputError

EXPECTED_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
SENTINEL = "hf_SENTINELtoken0123456789abcdef"


@pytest.fixture(scope="module")
def her2st_run(her2st_manifest, tmp_path_factory):
    """All 1,193 spots embedded once with effnet-lite0 through the CLI (HF_TOKEN set to a sentinel)."""
    out = tmp_path_factory.mktemp("emb") / "emb.h5"
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = SENTINEL
    try:
        t0 = time.perf_counter()
        result = CliRunner().invoke(
            main, ["embed", str(her2st_manifest), "--encoder", "effnet-lite0", "--out", str(out), "--no-progress"]
        )
        seconds = time.perf_counter() - t0
    finally:
        os.environ.pop("HF_TOKEN") if old is None else os.environ.__setitem__("HF_TOKEN", old)
    assert result.exit_code == 0, result.output
    assert SENTINEL not in result.output
    return out, seconds


def test_her2st_sections_are_embedded(her2st_run, her2st_manifest):
    out, _ = her2st_run
    manifest = read_manifest(her2st_manifest)
    attrs = read_attrs(out)
    assert set(attrs) == set(EXPECTED_SPOTS)
    for slide_id, n in EXPECTED_SPOTS.items():
        barcodes, emb = read_embeddings(out, slide_id)
        assert emb.shape == (n, 1280) and emb.dtype == np.float32
        assert np.isfinite(emb).all()
        assert (emb.std(axis=0) > 0).sum() > 1000  # features vary across spots
        assert np.abs(emb - emb.mean(axis=0)).sum(axis=1).min() > 0  # no spot is a copy of the mean
        np.testing.assert_array_equal(barcodes, manifest.load(slide_id).barcodes.astype(str))
        a = attrs[slide_id]
        assert a["encoder"] == "effnet-lite0" and a["complete"]
        assert a["weights_sha256"] == load_encoder("effnet-lite0").weights_sha256
        assert a["patch_um"] == pytest.approx(112.0) and a["patch_px"] == 224
        assert a["patch_box_px"] == pytest.approx(112.0 / manifest.entry(slide_id).microns_per_pixel)
        assert a["hgc_version"] and a["device"] == "cpu"
    assert SENTINEL.encode() not in out.read_bytes()


def test_second_run_reuses_every_slide(her2st_run, her2st_manifest, caplog):
    out, first = her2st_run
    before = out.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="hgc"):
        t0 = time.perf_counter()
        embed_manifest(her2st_manifest, "effnet-lite0", out, progress=False)
        second = time.perf_counter() - t0
    assert second < 0.25 * first, (first, second)
    assert out.stat().st_mtime_ns == before  # nothing rewritten
    assert caplog.text.count("up to date (output), skipped") == 6
    assert "': embedding " not in caplog.text and "recomputing" not in caplog.text


def test_cpu_embeddings_are_deterministic(her2st_run, her2st_manifest):
    """The first 64 spots of C6 in one batch reproduce the CLI run's rows bit for bit, with or
    without DataLoader workers."""
    out, _ = her2st_run
    full = read_manifest(her2st_manifest).load("C6")
    sub = dataclasses.replace(full, barcodes=full.barcodes[:64], coords=full.coords[:64], counts=full.counts[:64])
    enc = load_encoder("effnet-lite0")
    model = enc.build()
    dev = resolve_device("cpu")
    one = embed_slide(sub, model, enc, PatchSpec(224), dev, batch_size=64, workers=0, progress=False)
    _, stored = read_embeddings(out, "C6")
    np.testing.assert_array_equal(one, stored[:64])
    again = embed_slide(sub, model, enc, PatchSpec(224), dev, batch_size=64, workers=2, progress=False)
    np.testing.assert_array_equal(one, again)
    # the GPU path's split: workers only cut 8-bit crops, resampling and normalising follow on the device
    split = embed_slide(sub, model, enc, PatchSpec(224), dev, batch_size=64, workers=2, progress=False,
                        resize_on_device=True)
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6)


@pytest.fixture()
def tiny(tmp_path):
    return tiny_manifest(tmp_path), tiny_weights(tmp_path)


def test_changed_settings_recompute_and_say_why(tiny, tmp_path, caplog):
    manifest, weights = tiny
    out = tmp_path / "e.h5"
    embed_manifest(manifest, TINY, out, weights=weights, workers=0, progress=False)
    _, base = read_embeddings(out, "S1")
    with caplog.at_level(logging.INFO, logger="hgc"):
        embed_manifest(manifest, TINY, out, weights=weights, workers=0, patch_um=50.0, progress=False)
    assert caplog.text.count("recomputing embeddings: patch_um differs (stored 80.0, now 50.0)") == 2
    _, smaller = read_embeddings(out, "S1")
    assert not np.allclose(base, smaller)
    assert read_attrs(out)["S1"]["patch_um"] == 50.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):  # a working resolution coarser than the slides' 1 µm/px
        embed_manifest(manifest, TINY, out, weights=weights, workers=0, patch_um=50.0, patch_mpp=4.0, progress=False)
    assert caplog.text.count("patch_mpp differs (stored None, now 4.0)") == 2
    _, blurred = read_embeddings(out, "S1")
    assert read_attrs(out)["S1"]["patch_mpp"] == 4.0 and not np.allclose(blurred, smaller)
    embed_manifest(manifest, TINY, out, weights=weights, workers=0, patch_um=50.0, progress=False)
    np.testing.assert_allclose(read_embeddings(out, "S1")[1], smaller, rtol=1e-5, atol=1e-6)  # back to native
    assert "patch_mpp" not in read_attrs(out)["S1"]

    state = torch.load(weights, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] * 1.01
    torch.save(state, tmp_path / "tuned.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc"):
        embed_manifest(manifest, TINY, out, weights=tmp_path / "tuned.pth", workers=0, patch_um=50.0, progress=False)
    assert caplog.text.count("weights_sha256 differs") == 2
    assert read_attrs(out)["S2"]["weights_file"] == "tuned.pth"


def test_an_image_edited_in_the_middle_is_embedded_again(tmp_path, caplog):
    """The cache key covers the whole image, not only its size and first/last bytes: painting out a
    pen mark in an uncompressed TIFF (same size, same head and tail) re-embeds that slide only."""
    import tifffile

    from conftest import write_manifest, write_st_slide
    from embed_helpers import tiny_weights

    rows = []
    for i, name in enumerate(("S1", "S2")):
        files = write_st_slide(tmp_path / name, name=name, grid=3, pitch_px=300, image_size=(8, 8), seed=i)
        files["image"] = tmp_path / name / f"{name}.tif"
        tifffile.imwrite(files["image"], np.random.default_rng(i).integers(0, 255, (1200, 1200, 3), dtype=np.uint8))
        rows.append({"slide": name, "patient": "P", "format": "st", "microns_per_pixel": "1.0", **files})
    manifest, weights, out = write_manifest(tmp_path / "m.tsv", rows), tiny_weights(tmp_path), tmp_path / "e.h5"
    embed_manifest(manifest, TINY, out, weights=weights, workers=0, progress=False)
    before = read_embeddings(out, "S1")[1]
    image = tmp_path / "S1" / "S1.tif"
    pixels = tifffile.imread(image)
    pixels[500:700, 500:700] = 255
    head, size = image.read_bytes()[:1 << 20], image.stat().st_size
    tifffile.imwrite(image, pixels)
    assert image.stat().st_size == size and image.read_bytes()[:1 << 20] == head  # only the middle changed
    with caplog.at_level(logging.INFO, logger="hgc"):
        embed_manifest(manifest, TINY, out, weights=weights, workers=0, progress=False)
    assert "slide 'S1': recomputing embeddings: input_sha256 differs" in caplog.text
    assert "slide 'S2': embeddings up to date" in caplog.text
    assert not np.array_equal(read_embeddings(out, "S1")[1], before)


def test_read_embeddings_names_what_is_missing(tiny, tmp_path):
    manifest, weights = tiny
    out = tmp_path / "e.h5"
    with pytest.raises(InputError, match="not found.*hgc embed"):
        read_embeddings(out, "S1")
    embed_manifest(manifest, TINY, out, weights=weights, workers=0, progress=False)
    with pytest.raises(InputError, match=r"slide .S9. is not in .* \(slides there: S1, S2\)"):
        read_embeddings(out, "S9")
    with h5py.File(out, "a") as f:
        f["S2"].attrs["complete"] = False
    with pytest.raises(InputError, match="incomplete"):
        read_embeddings(out, "S2")


def test_tiled_wsi_is_embedded_tile_by_tile(tmp_path, her2st_manifest, monkeypatch):
    """A whole-slide TIFF is never decoded whole, in worker processes either, and its patches give
    exactly the embeddings of the same pixels decoded from a PNG (real H&E, spots past the edge)."""
    import tifffile
    from PIL import Image

    from conftest import write_manifest, write_st_slide
    from hgc.data.image import SlideImage

    crop = read_manifest(her2st_manifest).load("B4").image.pixels()[2000:3000, 2500:3500]
    tifffile.imwrite(tmp_path / "wsi.tif", crop, tile=(128, 128), photometric="rgb")
    Image.fromarray(crop).save(tmp_path / "same.png")
    files = write_st_slide(tmp_path / "S", name="S", grid=5, pitch_px=190, image_size=(8, 8))  # spots 190..950 px
    rows = [{"slide": slide, "patient": "P", "format": "st", "microns_per_pixel": "0.5", **files, "image": image}
            for slide, image in (("WSI", tmp_path / "wsi.tif"), ("PNG", tmp_path / "same.png"))]
    manifest = write_manifest(tmp_path / "m.tsv", rows)
    decode = SlideImage._decode

    def decode_unless_tiled(self):
        assert self.path.suffix != ".tif", "the tiled WSI was decoded whole"
        return decode(self)

    monkeypatch.setattr(SlideImage, "_decode", decode_unless_tiled)
    out = tmp_path / "e.h5"
    embed_manifest(manifest, TINY, out, weights=tiny_weights(tmp_path), workers=2, batch_size=8, progress=False)
    (_, wsi), (_, png) = read_embeddings(out, "WSI"), read_embeddings(out, "PNG")
    assert wsi.shape[0] == 25 and np.isfinite(wsi).all()
    np.testing.assert_array_equal(wsi, png)


def test_context_fields_of_view_and_tta_are_cached_views_of_the_same_spots(tiny, tmp_path, caplog):
    """--context 2 appends, to each spot's features, those of a patch twice as wide around it (the
    same as embedding 2x wider patches); --tta 8 is the mean over the 8 dihedral views of each patch.
    Both are recorded and part of the cache key; the default file is untouched by neither."""
    from hgc.embed.patches import PatchBatches, PatchViews, crop_boxes, dihedral_view

    manifest, weights = tiny
    out = tmp_path / "e.h5"
    embed_manifest(manifest, TINY, out, weights=weights, workers=0, patch_um=50.0, progress=False)
    _, plain = read_embeddings(out, "S1")
    embed_manifest(manifest, TINY, tmp_path / "wide.h5", weights=weights, workers=0, patch_um=100.0, progress=False)
    _, wide = read_embeddings(tmp_path / "wide.h5", "S1")
    with caplog.at_level(logging.INFO, logger="hgc"):
        embed_manifest(manifest, TINY, out, weights=weights, workers=0, patch_um=50.0, views=PatchViews((2,)),
                       progress=False)
    assert caplog.text.count("patch_context differs (stored None, now [2.0])") == 2
    _, context = read_embeddings(out, "S1")
    d = plain.shape[1]
    assert context.shape == (plain.shape[0], 2 * d)
    np.testing.assert_array_equal(context[:, :d], plain)  # the spot's own field of view, as before
    np.testing.assert_allclose(context[:, d:], wide, rtol=1e-5, atol=1e-6)
    assert read_attrs(out)["S1"]["patch_context"].tolist() == [2.0]

    embed_manifest(manifest, TINY, out, weights=weights, workers=0, patch_um=50.0, views=PatchViews(tta=8),
                   progress=False)
    attrs, (_, tta) = read_attrs(out)["S1"], read_embeddings(out, "S1")
    assert attrs["patch_tta"] == 8 and "patch_context" not in attrs and tta.shape == plain.shape
    slide, enc = read_manifest(manifest).load("S1"), load_encoder(TINY, weights)
    spec = PatchSpec(out_px=enc.spec.input_px, um=50.0)
    batch = PatchBatches(slide.image.pixels(), crop_boxes(slide, spec), spec.out_px, 64, enc.spec.mean, enc.spec.std)[0]
    with torch.inference_mode():
        model = enc.build()
        by_view = torch.stack([model(dihedral_view(batch, i)) for i in range(8)])
    np.testing.assert_allclose(tta, by_view.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(by_view[0].numpy(), by_view[5].numpy())  # the views do differ
    np.testing.assert_allclose(by_view[0].numpy(), plain, rtol=1e-5, atol=1e-6)  # the identity view, in a larger batch


def test_dihedral_views_are_the_rotations_then_their_mirror_images():
    from hgc.embed.patches import dihedral_view

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = [dihedral_view(x, i) for i in range(8)]
    assert views[0] is x and torch.equal(views[1], torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(views[4], x.flip(-1)) and torch.equal(views[6], torch.rot90(x, 2, (-2, -1)).flip(-1))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # eight distinct views of a generic image


@pytest.mark.parametrize("views, message", [
    (dict(context=(1.0,)), "above 1"), (dict(context=(2, 2)), "given once"), (dict(context=(float("nan"),)), "above 1"),
    (dict(tta=3), "takes 1, 4, 8 views"),
])
def test_patch_views_refuse_what_they_cannot_mean(views, message):
    from hgc.embed.patches import PatchViews

    with pytest.raises(InputError, match=message):
        PatchViews(**views)


def test_a_combination_of_encoders_holds_each_ones_features_side_by_side(tmp_path):
    """`--encoder effnet-lite0+effnet-lite1`: one embedding per spot, lite0's features then
    lite1's, each what that encoder alone gives for the same patch (cut at the larger input, 240
    px, and resized to lite0's 224 for it); recorded under the combined name and fingerprint."""
    manifest = tiny_manifest(tmp_path, slides=("S1",))
    both, alone = tmp_path / "both.h5", {n: tmp_path / f"{n}.h5" for n in ("effnet-lite0", "effnet-lite1")}
    embed_manifest(manifest, "effnet-lite0+effnet-lite1", both, workers=0, patch_native_px=240, progress=False)
    for name, out in alone.items():
        embed_manifest(manifest, name, out, workers=0, patch_native_px=240, progress=False)
    _, x = read_embeddings(both, "S1")
    lite0, lite1 = (read_embeddings(alone[n], "S1")[1] for n in alone)
    assert x.shape == (9, 2560)
    np.testing.assert_allclose(x[:, :1280], lite0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x[:, 1280:], lite1, rtol=1e-4, atol=1e-5)
    attrs = read_attrs(both)["S1"]
    combined = load_encoder("effnet-lite0+effnet-lite1")
    assert attrs["encoder"] == "effnet-lite0+effnet-lite1" and attrs["weights_sha256"] == combined.weights_sha256
    assert attrs["weights_file"].count("+") == 1 and attrs["patch_px"] == 240
    assert combined.weights_sha256 != load_encoder("effnet-lite1+effnet-lite0").weights_sha256  # order matters


@pytest.mark.parametrize("name, message", [
    ("effnet-lite0+", "each once"), ("effnet-lite0+effnet-lite0", "each once"), ("effnet-lite0+nope", "unknown encoder"),
])
def test_bad_combinations_of_encoders_are_refused(name, message):
    with pytest.raises(InputError, match=message):
        load_encoder(name)


def test_a_combination_takes_no_single_weights_file(tmp_path):
    weights = tiny_weights(tmp_path)
    with pytest.raises(InputError, match="--weights names one file"):
        load_encoder("effnet-lite0+effnet-lite1", weights)
