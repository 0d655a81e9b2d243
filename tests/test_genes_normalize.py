"""Gene panels and expression normalisation: fitted on training slides only, missing genes reported."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from her2st_graph_data import load_slides
from hgc.data.genes import GenePanel, expression_matrix, panel_coverage, resolve_panel
from hgc.data.normalize import Normaliser, make_normaliser
from hgc.data.slide import Slide
from hgc.errors import InputError


def _slide(sid: str, counts, genes) -> Slide:
    counts = np.asarray(counts, dtype=float)
    return Slide(id=sid, patient="P", barcodes=np.array([f"{sid}-{i}" for i in range(len(counts))], dtype=object),
                 coords=np.zeros((len(counts), 2)), counts=sp.csr_matrix(counts),
                 genes=np.array(genes, dtype=object), microns_per_pixel=1.0, mpp_source="manifest")


A = _slide("A", [[1, 0, 9, 0], [3, 2, 1, 4]], ["G1", "G2", "G3", "G4"])
B = _slide("B", [[0, 5, 2], [8, 5, 0]], ["G3", "G2", "G1"])


def test_published_panels_and_files(shared_data, tmp_path):
    assert len(resolve_panel("hist2st-her2st", shared_data)) == 785
    assert len(resolve_panel("hist2st-cscc", shared_data)) == 171
    with pytest.raises(InputError, match="hgc data fetch hist2st-panels"):
        resolve_panel("hist2st-her2st", tmp_path)
    f = tmp_path / "mine.txt"
    f.write_text("# my genes\nERBB2\n\nKRT19\n")
    assert resolve_panel(str(f), None).genes == ("ERBB2", "KRT19")
    f.write_text("ERBB2\nERBB2\n")
    with pytest.raises(InputError, match="more than once"):
        resolve_panel(str(f), None)
    for bad in ("top-mean:x", "hvg:0", "nonsense"):
        with pytest.raises(InputError):
            resolve_panel(bad, None, [A])
    with pytest.raises(InputError, match="training slides"):
        resolve_panel("top-mean:2", None)


def test_data_driven_panels_use_genes_common_to_training_slides():
    # G4 exists only on A: never chosen; means over all spots of A and B: G1 1.5, G2 3, G3 4.5
    assert resolve_panel("top-mean:3", None, [A, B]).genes == ("G3", "G2", "G1")
    assert resolve_panel("top-mean:1", None, [A]).genes == ("G3",)
    with pytest.raises(InputError, match="share only 3"):
        resolve_panel("top-mean:4", None, [A, B])
    hvg = resolve_panel("hvg:2", None, [A, B])
    lib = np.concatenate([A.counts.sum(1).A1, B.counts.sum(1).A1])
    raw = np.concatenate([expression_matrix(A, ["G1", "G2", "G3"])[0], expression_matrix(B, ["G1", "G2", "G3"])[0]])
    var = np.log1p(raw / lib[:, None] * 1e4).var(0)
    assert hvg.genes == tuple(np.array(["G1", "G2", "G3"])[np.argsort(-var, kind="stable")[:2]])


def test_expression_matrix_zero_fills_and_reports(caplog):
    raw, missing = expression_matrix(B, ["G1", "G4", "G2"])
    np.testing.assert_array_equal(raw, [[2, 0, 5], [0, 0, 5]])
    assert raw.dtype == np.float32 and missing == ["G4"]
    with caplog.at_level(logging.WARNING):
        cov = panel_coverage(GenePanel("p", ["G1", "G4"]), [A, B])
    assert cov == {"A": [], "B": ["G4"]} and "slide B lacks 1 of the 2 genes" in caplog.text


def test_log1p_uses_library_size_over_all_genes():
    y = make_normaliser("log1p").transform(A, ["G1"])
    np.testing.assert_allclose(y[:, 0], np.log1p([1 / 10 * 1e4, 3 / 10 * 1e4]), rtol=1e-6)
    empty = _slide("E", [[0, 0]], ["G1", "G2"])
    assert make_normaliser("log1p").transform(empty, ["G1"])[0, 0] == 0
    assert Normaliser.from_dict(make_normaliser("log1p").to_dict()).transform(A, ["G1"]).tolist() == y.tolist()


def test_log10_minmax_is_fitted_on_training_slides_only():
    genes = ["G1", "G2"]
    norm = make_normaliser("log10-minmax").fit([A], genes)
    ya = norm.transform(A, genes)
    np.testing.assert_allclose(ya.min(0), [0, 0]) and np.testing.assert_allclose(ya.max(0), [1, 1])
    yb = norm.transform(B, genes)  # test slide: not re-fitted, may leave [0, 1]
    expected = (np.log10(np.array([[2, 5], [0, 5]]) + 1) - np.log10([2, 1])) / (np.log10([4, 3]) - np.log10([2, 1]))
    np.testing.assert_allclose(yb, expected, rtol=1e-5)
    again = Normaliser.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.transform(B, genes), yb)
    const = make_normaliser("log10-minmax").fit([_slide("C", [[1, 2], [1, 3]], genes)], genes)
    assert (const.transform(B, genes)[:, 0] == 0).all()  # constant on training -> 0
    with pytest.raises(InputError, match="before fit"):
        make_normaliser("log10-minmax").transform(A, genes)
    with pytest.raises(InputError, match="fitted on"):
        norm.transform(A, ["G2", "G1"])
    with pytest.raises(InputError, match="unknown"):
        make_normaliser("zscore")


def test_her2st_panel_on_real_slides(her2st_manifest, shared_data):
    slides = load_slides(her2st_manifest)
    panel = resolve_panel("hist2st-her2st", shared_data)
    assert panel_coverage(panel, slides.values()) == {s: [] for s in slides}
    top = resolve_panel("top-mean:250", None, [slides[s] for s in ("C2", "C3", "C4", "C5", "C6")])
    assert len(top) == 250 and {"ERBB2", "KRT19"} & set(top.genes)
    y = make_normaliser("log1p").transform(slides["B4"], top.genes)
    assert y.shape == (283, 250) and np.isfinite(y).all() and y.max() > 5
