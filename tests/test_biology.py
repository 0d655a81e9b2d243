"""Biology checks of `hgc evaluate`: gene-set and region-map files, the scores, and a real her2st run."""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import REPO, assert_one_line_error
from hgc.cli import main
from hgc.data import read_manifest
from hgc.data.genesets import GeneSet, read_gene_set_files, read_gene_sets, read_region_map
from hgc.data.slide import label_strings
from hgc.errors import InputError
from hgc.evaluate.biology import BiologySettings, auroc, signature_scores, spearman_per_gene
from hgc.evaluate.report import write_report

MARKERS = REPO / "examples" / "her2st-markers.gmt"


@pytest.fixture(scope="module")
def her2st_res(shared_data):
    return shared_data / "her2st" / "res"


def test_real_gene_set_files(her2st_res, shared_data):
    (tls,) = read_gene_sets(her2st_res / "TLS-pred" / "tls-signature.tsv.gz")
    with gzip.open(her2st_res / "TLS-pred" / "tls-signature.tsv.gz", "rt") as fh:
        table = pd.read_csv(fh, sep="\t", index_col=0)
    assert tls.name == "tls-signature" and tls.weighted
    assert tls.genes == tuple(table.index) and tls.weights == pytest.approx(table.iloc[:, 0].tolist())
    (go,) = read_gene_sets(shared_data / "her2st" / "data" / "go-sets" / "go-0034340.csv")
    assert not go.weighted and go.genes == tuple(pd.read_csv(shared_data / "her2st/data/go-sets/go-0034340.csv")["name"])
    markers = read_gene_sets(MARKERS)
    assert [s.name for s in markers] == ["TUMOUR_EPITHELIUM", "PLASMA_B", "STROMA"]
    assert "MUCL1" in markers[0].genes


def test_bad_gene_set_files(tmp_path):
    bad = tmp_path / "bad.gmt"
    bad.write_text("SET_A\tdesc\tG1\tG2\nSET_B\tno genes\n")
    with pytest.raises(InputError, match="line 2"):
        read_gene_sets(bad)
    twice = tmp_path / "twice.gmt"
    twice.write_text("SET_A\tdesc\tG1\tG2\tG3\n")
    with pytest.raises(InputError, match="named twice"):
        read_gene_set_files([twice, twice])
    weights = tmp_path / "w.tsv"
    weights.write_text("gene\tweight\nG1\t0.5\nG2\thigh\n")
    with pytest.raises(InputError, match="column 'weight'"):
        read_gene_sets(weights)
    with pytest.raises(InputError, match="does not exist"):
        read_gene_sets(tmp_path / "none.gmt")


def test_gene_tables_with_and_without_a_header(tmp_path):
    plain = tmp_path / "list.txt"
    plain.write_text("ERBB2\nKRT19\nMUCL1\n")  # one gene per line, no header: the first line is a gene
    assert read_gene_sets(plain)[0].genes == ("ERBB2", "KRT19", "MUCL1")
    weighted = tmp_path / "w.csv"
    weighted.write_text("ERBB2,0.5\nKRT19,1\n")
    assert read_gene_sets(weighted)[0].weights == (0.5, 1.0) and read_gene_sets(weighted)[0].genes[0] == "ERBB2"
    named = tmp_path / "named.tsv"
    named.write_text("symbol\tweight\nERBB2\t2\n")
    assert read_gene_sets(named)[0].genes == ("ERBB2",)


def test_her2st_region_map_with_commas_in_its_cells(her2st_res):
    """motivation.csv has unquoted commas inside names and free text; each (patient, cluster) keeps its whole name."""
    regions = read_region_map(her2st_res / "ST-cluster" / "motivation.csv", "label")
    assert regions.per_patient
    assert regions.names[("C", "0")] == "immune : B/plasma cells, endothelium"
    assert regions.names[("C", "1")] == "immune : B/plasma cells, APC"
    assert regions.names[("D", "4")] == "cancer 2"
    assert regions.names[("B", "4")] == "cancer"
    rows = (her2st_res / "ST-cluster" / "motivation.csv").read_text().strip().splitlines()[1:]
    assert len(regions.names) == len(rows)  # every row of the file
    labels = np.array(["4", "0", "9", ""], dtype=object)
    assert list(regions.regions(labels, "B")) == ["cancer", "unknown", "", ""]


def test_region_map_without_patients_and_bad_maps(tmp_path):
    plain = tmp_path / "regions.tsv"
    plain.write_text("cluster\tregion\n1\ttumour\n2\tstroma\n")
    regions = read_region_map(plain, "cluster")
    assert list(regions.regions(np.array(["2", "1", "3"]), "any patient")) == ["stroma", "tumour", ""]
    spaced = tmp_path / "spaced.csv"  # ", " separated, one row with an extra comma in its note
    spaced.write_text("patient, cluster, region, note\nB, 01, cancer, ERBB2, high\nB, 2, stroma, low\n")
    regions = read_region_map(spaced, "label")
    # patient and key stay whole (keys read as spot labels are); the extra field joins the text columns
    assert sorted(regions.names) == [("B", "1"), ("B", "2")] and regions.names[("B", "2")] == "stroma"
    assert regions.names[("B", "1")].startswith("cancer")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="needs a key column"):
        read_region_map(bad, "cluster")
    with pytest.raises(InputError, match="name the column with --annotations"):
        BiologySettings.from_files(None, plain)


def test_scores_against_their_definitions():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pairs = score[positive][:, None] - score[~positive][None, :]
    assert auroc(score, positive) == pytest.approx(((pairs > 0) + 0.5 * (pairs == 0)).mean())
    assert np.isnan(auroc(np.full(60, 2.0) + 1e-12 * rng.random(60), positive))  # round-off is not a ranking
    a, b = rng.random((8, 3)), rng.random((8, 3))
    from scipy.stats import spearmanr

    assert spearman_per_gene(a, b) == pytest.approx([spearmanr(a[:, j], b[:, j])[0] for j in range(3)])
    x = rng.random((20, 4))
    weighted = GeneSet("w", ("G1", "G3", "G4", "MISSING"), (0.5, 2.0, -1.0, 9.0))
    s, used = signature_scores(x, ["G1", "G2", "G3", "G4"], weighted)
    assert used == 3 and s == pytest.approx(0.5 * x[:, 0] + 2.0 * x[:, 2] - x[:, 3])
    s, _ = signature_scores(x, ["G1", "G2", "G3", "G4"], GeneSet("z", ("G1", "G2", "G4")))
    z = (x - x.mean(0)) / x.std(0)
    assert s == pytest.approx(z[:, [0, 1, 3]].mean(1))
    s, used = signature_scores(x, ["G1", "G2", "G3", "G4"], GeneSet("few", ("G1", "G9")))
    assert used == 1 and np.isnan(s).all()


def test_region_agreement_needs_three_regions():
    from hgc.evaluate.biology import slide_biology

    rng = np.random.default_rng(2)
    observed, predicted = rng.random((30, 6)), rng.random((30, 6))
    genes = [f"G{i}" for i in range(6)]
    two = np.array(["a"] * 15 + ["b"] * 15, dtype=object)  # two regions: rho is only +-1, not reported
    settings = BiologySettings(annotation="region")
    row = slide_biology(settings, observed=observed, predicted=predicted, genes=genes, labels=two, patient="P")
    assert row["region_agreement"] is None
    three = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 10, dtype=object)
    row = slide_biology(settings, observed=observed, predicted=predicted, genes=genes, labels=three, patient="P")
    means = [observed[three == r].mean(0) for r in "abc"], [predicted[three == r].mean(0) for r in "abc"]
    expect = spearman_per_gene(np.array(means[0]), np.array(means[1]))
    assert row["region_agreement"]["rank_agreement"] == pytest.approx(np.nanmean(expect))


def test_label_strings():
    labels = label_strings(pd.Series([1.0, np.nan, 3.0]))  # an integer column with a gap reads as float
    assert list(labels) == ["1", "", "3"]
    assert list(label_strings(pd.Series(["tumour", None, "stroma"]))) == ["tumour", "", "stroma"]


def test_biology_on_real_her2st_predictions(her2st_predictions, her2st_res, tmp_path):
    """Cluster annotations, the TLS signature and marker sets on the six sections, baselines beside observed."""
    pred = tmp_path / "pred"
    shutil.copytree(her2st_predictions, pred)
    settings = BiologySettings.from_files("label", her2st_res / "ST-cluster" / "motivation.csv",
                                          [her2st_res / "TLS-pred" / "tls-signature.tsv.gz", MARKERS],
                                          genes=["MUCL1", "CD74"])
    report = write_report(pred, biology=settings, manifest=read_manifest(REPO / "examples" / "her2st.tsv"))
    bio = report["biology"]
    observed = {r["slide"]: r for r in bio["observed"]["per_slide"]}
    assert sorted(observed) == ["B4", "C2", "C3", "C4", "C5", "C6"]
    b4 = observed["B4"]
    assert set(b4["region_agreement"]["regions"]) == {"breast glands 1", "breast glands 2", "cancer",
                                                      "immune : APC, myeloid", "immune : innate"}
    assert b4["tumour_spots"] == b4["region_agreement"]["regions"]["cancer"]
    panel = set((REPO.parent / "shared/data/gene_panels/her2st_hist2st_785.txt").read_text().split())
    tls = read_gene_sets(her2st_res / "TLS-pred" / "tls-signature.tsv.gz")[0]
    assert b4["signatures"]["tls-signature"]["n_genes_used"] == len(set(tls.genes) & panel)
    # observed tumour-marker scores separate the annotated cancer regions (the ceiling is real biology)
    assert bio["observed"]["mean"]["signatures"]["TUMOUR_EPITHELIUM"]["auroc"] > 0.75
    knn = report["methods"]["knn"]["biology"]
    assert -1 <= knn["mean"]["rank_agreement"] <= 1
    assert set(knn["per_slide"][0]["region_agreement"]["genes"]) == {"MUCL1", "CD74"}
    mean = report["methods"]["mean"]["biology"]["mean"]  # a constant prediction ranks nothing
    assert np.isnan(mean["rank_agreement"]) and np.isnan(mean["signatures"]["TUMOUR_EPITHELIUM"]["pcc"])
    written = json.loads((pred / "metrics.json").read_text())
    assert written["biology"]["annotation"] == "label"
    assert "| observed | — |" in (pred / "metrics.md").read_text()


def test_cli_evaluate_biology_and_errors(her2st_predictions, her2st_res, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(her2st_predictions, pred)
    manifest = str(REPO / "examples" / "her2st.tsv")
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(pred), "--signatures", str(MARKERS)])
    assert res.exit_code == 0, res.output
    assert "TUMOUR_EPITHELIUM PCC" in res.output and "tumour AUROC" not in res.output  # no regions given
    res = runner.invoke(main, ["evaluate", str(pred), "--annotations", "label"])
    assert_one_line_error(res, "no per-spot column 'label'", "--manifest")
    res = runner.invoke(main, ["evaluate", str(pred), "--annotations", "nope", "--manifest", manifest])
    assert_one_line_error(res, "no annotation column 'nope'", "label")
    res = runner.invoke(main, ["evaluate", str(pred), "--annotations", "label", "--manifest", manifest,
                               "--tumour-regions", "canc(er"])
    assert_one_line_error(res, "not a regular expression")


def test_annotations_read_alone_and_written_beside_predictions(her2st_manifest):
    """`Manifest.annotations` gives the table a full read attaches, and new-slide predictions carry it as text."""
    from her2st_graph_data import load_slides
    from hgc.train.apply import spot_obs

    slide = load_slides(her2st_manifest)["B4"]
    alone = read_manifest(her2st_manifest).annotations("B4", slide.barcodes)
    pd.testing.assert_frame_equal(alone, slide.annotations)
    obs = spot_obs(slide)
    assert list(obs["label"]) == list(label_strings(slide.annotations["label"]))
    assert set(obs["label"]) <= {"", "0", "1", "2", "3", "4", "5"} and "ids" in obs
