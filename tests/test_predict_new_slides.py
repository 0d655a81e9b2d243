"""Predicting slides that have only H&E with a trained model bundle: one graph builder, two entry
points (a cross-validation fold, and a model applied to a new slide), and the output users read."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, tiny_st_project, write_manifest
from hgc.cli import main
from hgc.data import read_manifest
from hgc.errors import InputError
from hgc.train.config import FitConfig

FIT = FitConfig(backend="pyg", device="cpu", epochs=3, patience=None, progress=False, model={"hidden": 16, "layers": 2})
C_SLIDES = ("C2", "C3", "C4", "C5", "C6")


def _without_counts(manifest: Path, folder: Path, slide: str, keep_spots=None) -> Path:
    """A manifest row for ``slide`` with its image and spot table only (spots restricted to ``keep_spots``)."""
    import pandas as pd

    entry = read_manifest(manifest).entry(slide)
    spots = pd.read_csv(entry.paths["spots"], sep="\t")
    if keep_spots is not None:
        ids = spots["x"].astype(str) + "x" + spots["y"].astype(str)
        spots = spots[ids.isin(set(keep_spots))]
    folder.mkdir(parents=True, exist_ok=True)
    spots.to_csv(folder / f"{slide}_spots.tsv", sep="\t", index=False)
    row = {"slide": slide, "patient": entry.patient, "format": "st", "spots": folder / f"{slide}_spots.tsv",
           "image": entry.paths["image"], "microns_per_pixel": entry.microns_per_pixel}
    return write_manifest(folder / "targets.tsv", [row])


def test_a_trained_model_predicts_a_new_slide_as_cross_validation_does(tmp_path, her2st_manifest):
    """A model trained on C2-C6 predicts B4 from its image and spot table alone exactly as the
    patient-kfold fold that holds B4 out does (same training slides, validation slide and seed)."""
    from her2st_graph_data import load_colour_embeddings, load_slides
    from hgc.data.splits import make_folds
    from hgc.graph import GraphConfig, build_graphs, write_graphs
    from hgc.graph.build import align_embeddings
    from hgc.train.apply import SlidePredictor
    from hgc.train.fit import fit_folds
    from hgc.train.folds import load_folds
    from hgc.train.predict import predict_fold
    from hgc.train.rundir import open_model, open_run

    slides, emb = load_slides(her2st_manifest), load_colour_embeddings(her2st_manifest)
    config = GraphConfig(genes="top-mean:30")
    methods = ["hgc", "knn", "ridge"]

    cv = build_graphs(slides, emb, make_folds({s: v.patient for s, v in slides.items()}, "patient-kfold"),
                      "patient-kfold", config)
    (fold,) = load_folds(write_graphs(cv, tmp_path / "cv.h5"), ["patient-B"])
    fit_folds([fold], tmp_path / "cv", FIT)
    expected = {p.method: dict(zip(p.barcodes, p.predicted)) for p in predict_fold(fold, methods, open_run(tmp_path / "cv"))}

    train = {s: slides[s] for s in C_SLIDES}
    alone = build_graphs(train, emb, make_folds({s: "C" for s in C_SLIDES}, "all"), "all", config)
    (model_fold,) = load_folds(write_graphs(alone, tmp_path / "all.h5"))
    assert model_fold.info.test == [] and model_fold.bank.slides == list(C_SLIDES)
    fit_folds([model_fold], tmp_path / "model", replace(FIT, val_slides=tuple(fold.info.val)))
    bundle = open_model(tmp_path / "model")
    assert bundle.bank().n_ref == sum(slides[s].n_spots for s in C_SLIDES)
    assert bundle.info["image_mpp"] == pytest.approx(max(slides[s].microns_per_pixel for s in C_SLIDES))

    b4 = read_manifest(_without_counts(her2st_manifest, tmp_path / "t", "B4", slides["B4"].barcodes)).load("B4")
    assert not b4.has_expression and b4.n_spots == slides["B4"].n_spots == 283
    x = align_embeddings(b4, slides["B4"].barcodes, emb["B4"], "colour embeddings")
    got = SlidePredictor(bundle, methods).predict(b4, x)
    for method in methods:
        want = np.stack([expected[method][b] for b in b4.barcodes])
        pred, spread = got[method]
        np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5, err_msg=method)
        assert spread is None  # one model per bundle here, so no ensemble spread
    assert np.abs(got["hgc"][0]).max() > 0.1  # a real prediction, not zeros


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`hgc train` on three tiny slides, and a fourth slide with spots and an image but no counts."""
    root = tmp_path_factory.mktemp("trained")
    manifest = tiny_st_project(root / "data")
    r = CliRunner().invoke(main, ["train", str(manifest), "--genes", "top-mean:5", "--encoder", "effnet-lite0",
                                  "--out", str(root / "model"), "--epochs", "2", "--hidden", "8", "--layers", "1",
                                  "--backend", "pyg", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    new = tiny_st_project(root / "new", ids=(("N1", "P9"),), grid=4)
    rows = [line.split("\t") for line in new.read_text().splitlines()]
    i = rows[0].index("counts")
    new.write_text("\n".join("\t".join(row[:i] + row[i + 1:]) for row in rows) + "\n")
    return manifest, root / "model", new


def test_predict_new_slides_writes_what_scanpy_reads(tmp_path, trained):
    import anndata as ad

    _, model, targets = trained
    out = tmp_path / "pred"
    r = CliRunner().invoke(main, ["predict", str(model), str(targets), "--out", str(out), "--methods", "hgc,knn",
                                  "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "predictions.json").read_text())
    assert record["protocol"] == "new-slide" and sorted(record["files"]) == ["hgc", "knn"]
    a = ad.read_h5ad(out / "hgc" / "N1.h5ad")
    bundle = json.loads((model / "model" / "all" / "fold.json").read_text())
    assert a.n_obs == 16 and list(a.var_names) == bundle["genes"] and "observed" not in a.layers
    assert {"array_row", "array_col"} <= set(a.obs.columns)
    entry = a.uns["spatial"]["N1"]
    assert entry["images"]["hires"].ndim == 3 and entry["images"]["hires"].dtype == np.uint8
    scale = entry["scalefactors"]["tissue_hires_scalef"]
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 / 0.8)  # ST spots at 0.8 µm/px
    assert (a.obsm["spatial"] * scale).max() < max(entry["images"]["hires"].shape)  # spots fall on the image
    assert a.uns["model"]["reference_slides"].tolist() == ["S1", "S2", "S3"]
    assert (tmp_path / "pred.embeddings.h5").is_file()  # the targets' embeddings, cached beside the output
    assert_one_line_error(CliRunner().invoke(main, ["evaluate", str(out)]), "no prediction", "observed expression")


def test_scanpy_draws_a_prediction_over_its_hires_image_without_arguments(tmp_path, trained):
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    _, model, targets = trained
    out = tmp_path / "pred"
    assert CliRunner().invoke(main, ["predict", str(model), str(targets), "--out", str(out), "--device", "cpu",
                                     "--no-progress"]).exit_code == 0
    a = ad.read_h5ad(out / "hgc" / "N1.h5ad")
    (ax,) = sc.pl.spatial(a, color=a.var_names[0], show=False)
    assert ax.get_images()  # the hires H&E is drawn under the spots
    (spots,) = ax.collections  # one circle per spot, in hires-image pixels
    centres = np.array([path.get_extents().get_points().mean(axis=0) for path in spots.get_paths()])
    hires = a.uns["spatial"]["N1"]["images"]["hires"]
    scale = a.uns["spatial"]["N1"]["scalefactors"]["tissue_hires_scalef"]
    assert len(centres) == a.n_obs
    np.testing.assert_allclose(np.sort(centres, axis=0), np.sort(a.obsm["spatial"] * scale, axis=0), atol=0.5)
    assert (centres[:, 0] <= hires.shape[1]).all() and (centres[:, 1] <= hires.shape[0]).all()
    plt.close("all")


def test_new_slides_with_counts_are_scored(tmp_path, trained):
    """A target manifest with counts (here a training slide's twin under another id) gets its
    observed expression in the model's space, and `hgc evaluate` scores the prediction."""
    manifest, model, _ = trained
    twin = tmp_path / "twin.tsv"
    lines = manifest.read_text().splitlines()
    twin.write_text("\n".join([lines[0], lines[1].replace("S1\tP1", "S1-again\tP7", 1)]) + "\n")
    out = tmp_path / "pred"
    assert CliRunner().invoke(main, ["predict", str(model), str(twin), "--out", str(out), "--methods", "hgc,mean",
                                     "--device", "cpu", "--no-progress"]).exit_code == 0
    report = json.loads(CliRunner().invoke(main, ["evaluate", str(out), "--json"]).output)
    assert report["protocol"] == "new-slide" and report["methods"]["hgc"]["n_slides"] == 1


def test_bad_models_and_targets_are_one_line(tmp_path, trained):
    manifest, model, targets = trained
    bundle = model / "model" / "all"

    def predict(model_dir, target_manifest, *extra):
        return CliRunner().invoke(main, ["predict", str(model_dir), str(target_manifest), "--out", str(tmp_path / "p"),
                                         "--device", "cpu", "--no-progress", *extra])

    assert_one_line_error(predict(bundle, manifest), "slide 'S1' is one of the model's reference slides")
    other = tmp_path / "other-encoder"
    shutil.copytree(bundle, other)
    info = json.loads((other / "fold.json").read_text())
    (other / "fold.json").write_text(json.dumps({**info, "encoder": {**info["encoder"], "weights_sha256": "0" * 64}}))
    assert_one_line_error(predict(other, targets), "weights 000000000000", "--weights")
    newer = tmp_path / "newer"
    shutil.copytree(bundle, newer)
    (newer / "fold.json").write_text(json.dumps({**info, "format_version": 9}))
    assert_one_line_error(predict(newer, targets), "version 9", "upgrade hgc")
    assert_one_line_error(CliRunner().invoke(main, ["predict", str(model), "--out", str(tmp_path / "p")]),
                          "give either TARGETS")
    assert not (tmp_path / "p").exists()
    with pytest.raises(InputError, match="name one of them"):
        from hgc.train.rundir import open_model

        open_model(_cv_run(tmp_path, manifest))


def _cv_run(tmp_path: Path, manifest: Path) -> Path:
    """A cross-validation run folder (three folds): not one model."""
    out = tmp_path / "cv"
    r = CliRunner().invoke(main, ["run", str(manifest), "--protocol", "slide-loso", "--genes", "top-mean:5",
                                  "--encoder", "effnet-lite0", "--out", str(out), "--epochs", "1", "--hidden", "8",
                                  "--layers", "1", "--backend", "pyg", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def test_a_scan_coarser_than_the_training_images_is_warned_about(her2st_manifest):
    from hgc.train.apply import resolution_gap

    b4 = read_manifest(her2st_manifest).load("B4")  # 0.6889 µm/px
    info = {"image_mpp": 0.6982, "encoder": {"patch_um": 112.0}}  # trained on the C sections
    assert resolution_gap(b4, info) is None
    coarse = replace(b4, microns_per_pixel=3.2)  # the same section scanned at a lower magnification
    message = resolution_gap(coarse, info)
    assert "3.20 µm per pixel, 4.6x coarser than the 0.70 µm/px" in message and "--patch-mpp 3.20" in message
    assert resolution_gap(coarse, {**info, "encoder": {"patch_mpp": 3.2}}) is None  # trained at its resolution
    assert resolution_gap(coarse, {"encoder": {}}) is None  # a model that does not record it: nothing to say


def test_a_model_trained_with_context_and_tta_embeds_new_slides_the_same_way(tmp_path):
    """The fields of view and test-time augmentation a model was trained with travel in its bundle:
    `hgc predict` embeds the new slide with them (same width, same recorded views), unasked."""
    import h5py

    from embed_helpers import TINY, tiny_weights

    manifest, weights = tiny_st_project(tmp_path / "data"), tiny_weights(tmp_path)
    r = CliRunner().invoke(main, ["train", str(manifest), "--genes", "top-mean:5", "--encoder", TINY, "--weights",
                                  str(weights), "--context", "2", "--tta", "4", "--out", str(tmp_path / "model"),
                                  "--epochs", "1", "--hidden", "8", "--layers", "1", "--backend", "pyg",
                                  "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "model" / "model" / "all"
    encoder = json.loads((bundle / "fold.json").read_text())["encoder"]
    assert encoder["patch_context"] == [2.0] and encoder["patch_tta"] == 4
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "with fields of view 2 times as wide, each the mean over its 4 rotations\n" in card  # no mirror images
    new = tiny_st_project(tmp_path / "new", ids=(("N1", "P9"),), grid=4)
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "model"), str(new), "--out", str(tmp_path / "pred"),
                                  "--weights", str(weights), "--methods", "hgc", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "pred.embeddings.h5") as f, h5py.File(tmp_path / "model" / "embeddings.h5") as g:
        assert f["N1"].attrs["patch_context"].tolist() == [2.0] and f["N1"].attrs["patch_tta"] == 4
        assert f["N1/embeddings"].shape[1] == g["S1/embeddings"].shape[1] == 2 * _encoder_width(TINY)
    bad = CliRunner().invoke(main, ["embed", str(new), "--out", str(tmp_path / "x.h5"), "--context", "2,one"])
    assert bad.exit_code != 0 and "comma-separated multiples of the patch width" in bad.output
    assert_one_line_error(CliRunner().invoke(main, ["embed", str(new), "--out", str(tmp_path / "x.h5"),
                                                    "--context", "0.5"]), "above 1")


def _encoder_width(encoder: str) -> int:
    from hgc.embed.registry import build_model, get_spec

    return build_model(get_spec(encoder)).num_features
