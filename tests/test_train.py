"""Training harness: determinism, checkpoint round trip, validation slides, leakage guard, predict/evaluate."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from _backends import require_dgl
from graph_factory import make_fold
from hgc.errors import InputError
from hgc.evaluate import write_report, writing_predictions
from hgc.train.config import FitConfig
from hgc.train.fit import fit_folds
from hgc.train.folds import check_leakage
from hgc.train.inference import load_model, predict_graph
from hgc.train.predict import predict_fold
from hgc.train.rundir import load_checkpoint, open_run

TINY = dict(epochs=3, patience=None, progress=False, model={"hidden": 16, "layers": 1})


def _cfg(**kw) -> FitConfig:
    return FitConfig(**{**TINY, "backend": "pyg", "device": "cpu", **kw})


@pytest.fixture(scope="module")
def fold():
    return make_fold(["A1", "A2", "B1", "B2"], ["C1"])


@pytest.fixture(scope="module")
def run(tmp_path_factory, fold):
    out = tmp_path_factory.mktemp("run")
    return out, fit_folds([fold], out, _cfg())


def test_fit_writes_run_and_validates_on_training_slides(run, fold):
    out, results = run
    (r,) = results
    info = json.loads((out / fold.name / "fold.json").read_text())
    assert r.val_slides and set(r.val_slides) <= set(fold.info.train)
    assert info["validation_slides"] == r.val_slides
    assert not set(info["train_slides"]) & set(r.val_slides)  # a validation slide is not trained on
    assert not set(r.val_slides) & set(fold.info.test)
    assert info["genes"] == fold.bank.genes and info["normaliser"] == fold.bank.normaliser
    history = (out / fold.name / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss") and "val_pcc" in history[0] and len(history) == 4
    assert (out / "config.json").is_file()


def test_checkpoint_round_trip(run, fold):
    out, (r,) = run
    model, backend, info = load_model(out, fold.name, device="cpu")
    (slide,) = r.val_slides
    g = next(g for g in fold.graphs("train") if g.target == slide)
    np.testing.assert_array_equal(predict_graph(model, backend.prepare(g)), r.val_predictions[slide])
    # eval predictions are deterministic (unmasked graph, no dropout)
    np.testing.assert_array_equal(predict_graph(model, backend.prepare(g)), r.val_predictions[slide])


def test_same_seed_repeats_exactly(tmp_path, run, fold):
    out, (r,) = run
    fit_folds([fold], tmp_path, _cfg())
    a, b = load_checkpoint(out / fold.name / "model.safetensors"), load_checkpoint(tmp_path / fold.name / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / fold.name / "history.csv").read_text() == (tmp_path / fold.name / "history.csv").read_text()


def test_no_validation_keeps_last_epoch_and_empty_fold_is_skipped(tmp_path, fold):
    (r,) = fit_folds([fold], tmp_path, _cfg(epochs=2, val_slides=()))
    assert r.val_slides == [] and r.best_epoch == 1 and np.isnan(r.best_val_pcc)
    assert json.loads((tmp_path / fold.name / "fold.json").read_text())["best_val_pcc"] is None
    untrainable = replace(fold, targets=[t for t in fold.targets if t.role == "test"], info=replace(fold.info, name="empty"))
    assert fit_folds([untrainable], tmp_path, _cfg()) == []
    assert not (tmp_path / "empty").exists()
    assert open_run(tmp_path).skipped.keys() == {"empty"}


def test_leakage_guard(fold):
    check_leakage(fold)
    # A test slide among a training target's references.
    key, pool = next(iter(fold.pools.items()))
    with pytest.raises(InputError, match="test slides"):
        check_leakage(replace(fold, pools={**fold.pools, key: replace(pool, slides=[*pool.slides, "C1"])}))
    # A test slide as a training target.
    test_target = next(t for t in fold.targets if t.role == "test")
    with pytest.raises(InputError, match="not a training slide"):
        check_leakage(replace(fold, targets=fold.targets + [replace(test_target, role="train")]))
    # A graph naming a pool the fold does not have.
    with pytest.raises(InputError, match="reference pool 'nope'"):
        check_leakage(replace(fold, targets=[replace(test_target, pool="nope")]))
    # A bank holding a slide that is not a training slide of the fold.
    with pytest.raises(InputError, match="bank holds slides"):
        check_leakage(replace(fold, info=replace(fold.info, train=fold.info.train[1:])))
    # Patient-level: another section of the test patient as reference is leakage; slide-level it is allowed.
    pk = make_fold(["A1", "B1", "B2", "C1"], ["A2"], protocol="patient-kfold")
    with pytest.raises(InputError, match="test patient"):
        check_leakage(pk)
    check_leakage(replace(pk, info=replace(pk.info, protocol="slide-loso")))


def test_a_fold_without_test_slides_has_nothing_to_predict(fold):
    trained_on_all = replace(fold, targets=[t for t in fold.targets if t.role == "train"],
                             info=replace(fold.info, test=[]))
    with pytest.raises(InputError, match="no test slide to predict"):
        predict_fold(trained_on_all, ["ridge"])


def test_predict_all_methods_and_evaluate(tmp_path, run, fold):
    out, _ = run
    with writing_predictions(tmp_path / "pred", protocol=fold.info.protocol) as w:
        files = [w.add(p) for p in predict_fold(fold, run=open_run(out))]
    tmp_path = tmp_path / "pred"
    assert sorted(p.relative_to(p.parents[1]).as_posix() for p in files) == [
        f"{m}/C1.h5ad" for m in ("hgc", "knn", "mean", "ridge")
    ]
    import anndata as ad

    a = ad.read_h5ad(tmp_path / "hgc" / "C1.h5ad")
    g = fold.graphs("test")[0]
    assert a.X.dtype == np.float32 and a.shape == g.spot_y.shape
    assert list(a.obs_names) == list(g.spot_barcodes) and list(a.var_names) == fold.bank.genes
    np.testing.assert_array_equal(a.layers["observed"], g.spot_y)
    np.testing.assert_array_equal(a.obsm["spatial"], g.spot_coords)
    assert a.uns["method"] == "hgc" and a.uns["protocol"] == "slide-loso" and a.uns["fold"] == fold.name
    assert len(a.uns["heg"]) == len(a.uns["hvg"]) == len(fold.bank.genes)  # 6 genes < 50
    report = write_report(tmp_path)
    assert list(report["methods"]) == ["hgc", "ridge", "knn", "mean"]
    assert report["methods"]["ridge"]["mean"]["pcc_all"] > 0.5


def test_dgl_backend_trains_and_matches_pyg(tmp_path, run, fold):
    require_dgl()  # skips on the modern stack only; HGC_STACK=dgl makes a broken DGL fail
    out, (r,) = run
    model, backend, _ = load_model(out, fold.name, backend="dgl")
    assert backend.name == "dgl"
    (slide,) = r.val_slides
    g = next(g for g in fold.graphs("train") if g.target == slide)
    np.testing.assert_allclose(predict_graph(model, backend.prepare(g)), r.val_predictions[slide], rtol=1e-4, atol=1e-5)
    (rd,) = fit_folds([fold], tmp_path, _cfg(backend="dgl", epochs=2))
    assert rd.epochs_run == 2


# --- on a real graph store: her2st, colour-statistics embeddings, patient-level folds ----------------


@pytest.fixture(scope="module")
def her2st_store(tmp_path_factory, her2st_manifest):
    from her2st_graph_data import write_her2st_store

    return write_her2st_store(her2st_manifest, tmp_path_factory.mktemp("store") / "graphs.h5")


def _cli(*args: str):
    from click.testing import CliRunner

    from hgc.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_fit_predict_evaluate_on_her2st(tmp_path, her2st_store, her2st_manifest):
    run, pred = tmp_path / "run", tmp_path / "pred"
    r = _cli("fit", her2st_store, "--out", run, "--epochs", 2, "--backend", "pyg", "--device", "cpu",
             "--hidden", 16, "--layers", 1)
    assert r.exit_code == 0, r.output
    # Fold patient-C trains on B4 alone, whose training graph references B4's own distant spots.
    assert "fold patient-B" in r.output and "fold patient-C" in r.output
    lone = json.loads((run / "patient-C" / "fold.json").read_text())
    assert lone["train_slides"] == ["B4"] and lone["validation_slides"] == []
    # ... and stops early on a band of B4's own tissue (seed 0 + fold index 1: band 1 of 5)
    assert lone["validation_block"] == {"slide": "B4", "band": 1, "n_bands": 5, "n_spots": lone["validation_block"]["n_spots"]}
    assert 40 < lone["validation_block"]["n_spots"] < 80 and lone["best_val_pcc"] is not None
    info = json.loads((run / "patient-B" / "fold.json").read_text())
    assert info["test_slides"] == ["B4"] and info["validation_slides"]
    assert not {"B4"} & set(info["train_slides"] + info["validation_slides"])
    r = _cli("predict", run, "--graphs", her2st_store, "--out", pred)
    assert r.exit_code == 0, r.output
    r = _cli("evaluate", pred, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["protocol"] == "patient-kfold" and report["space"] == "log1p"
    assert report["methods"]["hgc"]["n_slides"] == 6 and report["methods"]["knn"]["n_slides"] == 6
    assert {"metrics.json", "metrics.csv", "metrics.md"} <= {p.name for p in pred.iterdir()}
    import anndata as ad

    a = ad.read_h5ad(pred / "knn" / "B4.h5ad")
    assert a.n_obs == 283 and a.n_vars == 20 and a.uns["fold"] == "patient-B"
    assert len(a.uns["heg"]) == len(a.uns["hvg"]) == 20
    # the H&E travels from the manifest through the graph store into every prediction file
    from her2st_graph_data import load_slides

    he = load_slides(her2st_manifest)["B4"].image
    assert a.uns["image"] == str(he.path.resolve()) and a.uns["image_scale"] == he.scale
    r = _cli("plot", pred, "--slide", "B4", "--genes", a.var_names[0], "--out", tmp_path / "B4.png")
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(tmp_path / "B4.png") as fig:  # the H&E underneath: mostly pink, not a white canvas
        rgb = np.asarray(fig.convert("RGB"), dtype=float)
    assert (rgb[..., 0] - rgb[..., 1] > 20).mean() > 0.05


def test_presets_set_training_defaults_that_options_override(tmp_path, her2st_store):
    from hgc.train.config import model_config

    published = FitConfig.from_preset("spahgc-published")
    assert published.patience is None and published.preset == "spahgc-published"
    assert FitConfig.from_preset("spahgc-published", patience=7).patience == 7
    m = model_config(FitConfig.from_preset("hgc-0.1", model={"head": "published"}))
    assert (m.mask_unit, m.residual, m.head) == ("node", True, "published")  # config.model wins over the preset
    assert model_config(FitConfig()).mask_unit == "feature"
    with pytest.raises(InputError, match="preset 'nope' is unknown"):
        FitConfig(preset="nope")
    # on the command line: the preset's patience unless --patience is given; recorded in the run
    for extra, patience in (((), None), (("--patience", 3), 3)):
        run = tmp_path / f"run{len(extra)}"
        r = _cli("fit", her2st_store, "--out", run, "--epochs", 1, "--backend", "pyg", "--device", "cpu",
                 "--hidden", 16, "--layers", 1, "--fold", "patient-B", "--preset", "spahgc-published", *extra)
        assert r.exit_code == 0, r.output
        fit_record = open_run(run).record["fit"]
        assert fit_record["preset"] == "spahgc-published" and fit_record["patience"] == patience
        info = json.loads((run / "patient-B" / "fold.json").read_text())
        assert info["model"]["head"] == "published" and info["model"]["hidden"] == 16
    model, _, _ = load_model(run, "patient-B", backend="pyg")
    assert model.cfg.mask_unit == "feature"


def test_a_lone_slide_holds_out_a_band_that_no_edge_carries(her2st_store):
    from hgc.train.folds import BLOCK_BANDS, hold_out_block, load_folds

    fold = next(f for f in load_folds(her2st_store) if f.name == "patient-C")
    (graph,) = fold.graphs("train")
    assert graph.target == "B4" and graph.target in fold.info.self_referenced
    held, block = hold_out_block(graph, seed=7)
    assert block.band == 7 % BLOCK_BANDS and 0 < block.rows.sum() < graph.n_spot / 3
    band = np.flatnonzero(block.rows)
    refer, close = held.edges["refer"], held.edges["close"]
    assert not np.isin(refer[0], band).any()  # no reference from the band
    assert not (np.isin(close[0], band) | np.isin(close[1], band)).any()
    assert np.isin(refer[1], band).any()  # the band's spots still retrieve (other) references
    np.testing.assert_array_equal(held.edges["near"], graph.edges["near"])
    assert held.edge_weight["refer"].shape[0] == refer.shape[1]
    assert hold_out_block(fold.graphs("test")[0], seed=0) is None  # another slide's references: nothing held out


def test_cli_fit_refuses_tampered_store(tmp_path, her2st_store):
    import shutil

    import h5py

    bad = tmp_path / "tampered.h5"

    def tamper(pool: str, edit) -> str:
        shutil.copy(her2st_store, bad)
        with h5py.File(bad, "r+") as f:
            pools = f["folds/patient-B/pools"]
            key = next(k for k in pools if k.startswith(pool) and "C3" in json.loads(pools[k].attrs["slides"]))
            pools[key].attrs["slides"] = json.dumps(edit(json.loads(pools[key].attrs["slides"])))
        r = _cli("fit", bad, "--out", tmp_path / "run", "--epochs", 1, "--backend", "pyg", "--device", "cpu")
        assert r.exit_code == 1 and not (tmp_path / "run").exists()
        return r.output

    def with_b4(slides):  # the test slide B4 slipped in for C3
        return ["B4" if s == "C3" else s for s in slides]

    assert "test slides ['B4']" in tamper("pool", with_b4)
    assert "B4" in (out := tamper("bank", with_b4)) and "not the fold's training slides" in out, out
    assert "in its order" in tamper("pool", lambda slides: slides[::-1])  # close edges would misalign
    assert not (tmp_path / "run" / "patient-B" / "model.safetensors").exists()


# --- the whole pipeline on four tiny legacy-ST sections -------------------------------------------


def test_run_pipeline_caches_steps(tmp_path, caplog):
    import logging

    from conftest import write_manifest, write_st_slide
    from hgc.evaluate.report import json_safe
    from hgc.train.pipeline import run_pipeline

    rows = []
    for i, (name, patient) in enumerate([("S1", "P1"), ("S2", "P1"), ("S3", "P2")]):
        files = write_st_slide(tmp_path / name, name=name, grid=3, pitch_px=60, image_size=(240, 240), seed=i)
        rows.append({"slide": name, "patient": patient, "format": "st", "microns_per_pixel": "0.8", **files})
    manifest = write_manifest(tmp_path / "m.tsv", rows)
    out = tmp_path / "run"
    cfg = _cfg(epochs=1)
    args = (manifest, "slide-loso", "top-mean:5", "effnet-lite0", out)
    report = run_pipeline(*args, fit_config=cfg, device="cpu", progress=False)
    assert list(report["methods"]) == ["hgc", "ridge", "knn", "mean"]
    assert all(m["n_slides"] == 3 for m in report["methods"].values())
    # the report says how the image features were made, from the embeddings' own record
    (features,) = report["features"]
    assert features["encoder"] == "effnet-lite0" and features["patch_um"] == 112.0 and features["patch_px"] == 224
    assert "Image features: encoder effnet-lite0 (weights sha256 " in (out / "predictions" / "metrics.md").read_text()
    with caplog.at_level(logging.INFO, logger="hgc.train.pipeline"):
        again = run_pipeline(*args, fit_config=cfg, device="cpu", progress=False)
    assert caplog.text.count("up to date") == 4 and json_safe(again) == json_safe(report)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hgc.train.pipeline"):  # other training settings, via the CLI
        r = _cli("run", manifest, "--protocol", "slide-loso", "--genes", "top-mean:5", "--encoder", "effnet-lite0",
                 "--out", out, "--epochs", 2,
                 "--backend", "pyg", "--device", "cpu", "--hidden", 16, "--layers", 1, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "| hgc |" in r.output and "Protocol: slide-loso" in r.output
    for step in ("embed: up to date", "graphs: up to date", "fit: running", "predict: running"):
        assert step in caplog.text


def test_predict_refuses_run_fitted_on_other_genes(tmp_path, run, fold):
    import shutil

    out, _ = run
    shutil.copytree(out, tmp_path / "run")
    path = tmp_path / "run" / fold.name / "fold.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "genes": info["genes"][::-1]}))
    with pytest.raises(InputError, match="other genes"):
        predict_fold(fold, methods=["hgc"], run=open_run(tmp_path / "run"))


def test_seed_ensemble_averages_members_and_writes_their_spread(tmp_path, fold):
    from hgc.evaluate import read_prediction
    from hgc.nn import Ensemble
    from hgc.train.fit import member_seed
    from hgc.train.inference import predict_with_spread

    out = tmp_path / "ens"
    (r,) = fit_folds([fold], out, _cfg(ensemble=3))
    info = json.loads((out / fold.name / "fold.json").read_text())
    assert info["ensemble"] == 3 and [m["seed"] for m in info["members"]] == [member_seed(0, k) for k in range(3)]
    model, backend, _ = load_model(out, fold.name)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    (g,) = fold.graphs("test")
    prepared = backend.prepare(g)
    mean, spread = predict_with_spread(model, prepared)
    members = np.stack([predict_graph(m, prepared) for m in model.members])
    np.testing.assert_allclose(mean, members.mean(0), atol=1e-6)
    np.testing.assert_allclose(spread, members.std(0), atol=1e-6)
    assert (spread > 0).mean() > 0.99  # seeds differ, so members disagree
    # the validation score is the ensemble's own (members' mean prediction on the validation slide)
    slide = r.val_slides[0]
    val = next(x for x in fold.graphs("train") if x.target == slide)
    from hgc.evaluate.metrics import nan_mean, pearson_per_gene

    val_pcc = nan_mean(pearson_per_gene(val.spot_y, predict_graph(model, backend.prepare(val))))
    assert r.best_val_pcc == pytest.approx(val_pcc, abs=1e-5)
    files = predict_fold(fold, ["hgc", "ridge"], open_run(out))
    by = {p.method: p for p in files}
    np.testing.assert_allclose(by["hgc"].uncertainty, spread, atol=1e-6)
    assert by["ridge"].uncertainty is None
    with writing_predictions(tmp_path / "pred", protocol=fold.info.protocol, methods=["hgc", "ridge"]) as w:
        for p in files:
            w.add(p)
    np.testing.assert_allclose(read_prediction(tmp_path / "pred" / "hgc" / f"{g.target}.h5ad").uncertainty, spread,
                               atol=1e-6)
    assert read_prediction(tmp_path / "pred" / "ridge" / f"{g.target}.h5ad").uncertainty is None
    with pytest.raises(InputError, match="ensemble"):
        _cfg(ensemble=0)
