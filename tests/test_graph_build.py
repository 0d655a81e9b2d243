"""Graph construction and the graph store on the real her2st sections (2 patients, 6 slides)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import write_manifest
from her2st_graph_data import load_colour_embeddings, load_slides, write_embedding_file
from hgc.data.normalize import Normaliser
from hgc.data.slide import Slide
from hgc.data.splits import Fold, make_folds
from hgc.errors import InputError
from hgc.graph.build import build_graphs, reference_pool
from hgc.graph.edges import near_edges
from hgc.graph.fold import GraphConfig
from hgc.graph.record import relation_names
from hgc.graph.store import read_fold_info, read_graphs, summarize, write_graphs

GENES = "top-mean:60"  # small panel: the tests check structure, not biology


@pytest.fixture(scope="module")
def her2st(her2st_manifest):
    return load_slides(her2st_manifest), load_colour_embeddings(her2st_manifest)


def _build(her2st, protocol, shared_data, **cfg):
    slides, emb = her2st
    folds = make_folds({k: s.patient for k, s in slides.items()}, protocol)
    return build_graphs(slides, emb, folds, protocol, GraphConfig(**{"genes": GENES, **cfg}), shared_data)


@pytest.fixture(scope="module")
def kfold(her2st, shared_data):
    return _build(her2st, "patient-kfold", shared_data, genes="hist2st-her2st")


def _in_degree(edges: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(edges[1], minlength=n)


def test_patient_kfold_on_her2st(kfold):
    assert [f.info.name for f in kfold.folds] == ["patient-B", "patient-C"]
    tests = kfold.graphs(role="test")
    assert sorted(g.target for g in tests) == ["B4", "C2", "C3", "C4", "C5", "C6"]
    for g in tests:
        other = {"B": "C", "C": "B"}[g.patient]
        assert set(g.ref_patient) == {other}, g.target
        assert g.target not in set(g.ref_slide)
        assert _in_degree(g.edges["near"], g.n_spot).max() <= 5
        assert (_in_degree(g.edges["refer"], g.n_spot) == 7).all()
        assert (_in_degree(g.edges["close"], g.n_ref) == 3).all()
        assert (g.edges["close"][0] != g.edges["close"][1]).all()
        assert g.n_genes == 785 and g.spot_y.shape == (g.n_spot, 785)
        assert set(g.edges) == set(relation_names()) and all(w.dtype == np.float32 for w in g.edge_weight.values())
    # legacy ST interior spots have 8 grid neighbours of which the 5 nearest are kept
    assert np.bincount(_in_degree(tests[0].edges["near"], tests[0].n_spot)).argmax() == 5
    fold_c = kfold.folds[1]
    assert fold_c.info.self_referenced == ["B4"]
    assert fold_c.info.val == []  # a single training slide stays for training


def test_sole_training_slide_references_its_own_distant_spots(kfold):
    """Fold patient-C trains on B4 alone: B4's training graph retrieves 7 other B4 spots per spot,
    never the spot itself nor one of its spatial neighbours, and nothing of patient C."""
    (g,) = kfold.graphs(fold="patient-C", role="train")
    assert g.target == "B4" and set(g.ref_slide) == {"B4"} and set(g.ref_patient) == {"B"}
    assert (_in_degree(g.edges["refer"], g.n_spot) == 7).all()
    ref, spot = g.edges["refer"]
    assert (ref != spot).all()
    near_pairs = set(zip(*g.edges["near"]))
    assert not near_pairs & set(zip(ref, spot))
    # still the most similar admissible spots: every retrieved spot is at least as close in
    # embedding space (L1) as any spot left out, apart from the banned ones
    d = np.abs(g.spot_x[:, None, :] - g.ref_x[None, :, :]).sum(-1)
    for i in range(0, g.n_spot, 37):
        banned = {i} | {a for a, b in near_pairs if b == i}
        allowed = np.array([j for j in range(g.n_ref) if j not in banned])
        chosen = ref[spot == i]
        assert d[i, chosen].max() <= np.sort(d[i, allowed])[6] + 1e-3


def test_training_targets_use_other_training_slides_only(kfold):
    for g in kfold.graphs(role="train"):
        fold = next(f.info for f in kfold.folds if f.info.name == g.fold)
        assert set(g.ref_slide) <= set(fold.train)
        if g.target in fold.self_referenced:
            assert set(g.ref_slide) == {g.target}
        else:
            assert g.target not in set(g.ref_slide)


def test_slide_loso_gives_six_folds(her2st, shared_data):
    gs = _build(her2st, "slide-loso", shared_data)
    assert len(gs.folds) == 6
    for fg in gs.folds:
        (test,) = fg.info.test
        g = fg.graphs("test")[0]
        assert test not in set(g.ref_slide) and len(set(g.ref_slide)) == 5
    # as published, slide-loso keeps same-patient sections among a training target's references
    g = next(g for g in gs.graphs("slide-C2", "train") if g.target == "C3")
    assert "C" in set(g.ref_patient)


def test_exclude_same_patient_for_training_targets(her2st, shared_data):
    gs = _build(her2st, "slide-loso", shared_data, exclude_same_patient=True)
    for g in gs.graphs(role="train"):
        assert g.patient not in set(g.ref_patient), (g.fold, g.target)
    assert gs.folds[1].info.skipped == {}  # C targets keep B4; B4 keeps the C sections


@pytest.mark.parametrize("metric", ["l1", "cosine"])
def test_one_close_search_per_fold_equals_a_search_per_pool(her2st, metric):
    from hgc.graph.edges import _knn_edges, _search_others, close_edges, close_features

    slides, emb = her2st
    train = ["C2", "C3", "C4", "C5", "C6", "B4"]
    y = {s: np.log1p(slides[s].counts[:, :40].toarray()).astype(np.float32) for s in train}
    feats = close_features(np.concatenate([emb[s] for s in train]), np.concatenate([y[s] for s in train]), metric)
    owner = np.concatenate([np.full(slides[s].n_spots, s, dtype=object) for s in train])
    pools = [train, ["C2", "C4", "B4"], ["C3"], ["C5", "C6"]]
    config = GraphConfig(metric=metric, k_close=3)
    for pool, (edges, w) in zip(pools, close_edges(feats, owner, pools, config)):
        rows = np.flatnonzero(np.isin(owner, pool))
        direct = _knn_edges(*_search_others(feats[rows], feats[rows], np.arange(len(rows)), config), metric)
        np.testing.assert_array_equal(edges, direct[0])
        np.testing.assert_allclose(w, direct[1], rtol=1e-5)


def test_nan_embeddings_are_named(her2st, shared_data):
    slides, emb = her2st
    bad = dict(emb)
    bad["C4"] = emb["C4"].copy()
    bad["C4"][[3, 7]] = np.nan
    folds = make_folds({k: s.patient for k, s in slides.items()}, "patient-kfold")
    with pytest.raises(InputError, match=r"slide C4: embeddings of 2 spots .*" + slides["C4"].barcodes[3]):
        build_graphs(slides, bad, folds, "patient-kfold", GraphConfig(genes=GENES), shared_data)


def test_faiss_and_torch_build_the_same_graphs(kfold, her2st, shared_data):
    torch_built = _build(her2st, "patient-kfold", shared_data, genes="hist2st-her2st", knn_backend="torch")
    for a, b in zip(kfold.graphs(), torch_built.graphs()):
        for name in relation_names():
            np.testing.assert_array_equal(a.edges[name], b.edges[name])
            np.testing.assert_allclose(a.edge_weight[name], b.edge_weight[name], rtol=1e-4)


def test_store_round_trip(kfold, tmp_path):
    path = write_graphs(kfold, tmp_path / "graphs.h5")
    assert not list(tmp_path.glob("*.tmp*"))
    back = read_graphs(path)
    for a, b in zip(kfold.graphs(), back):
        assert (a.fold, a.target, a.role, a.patient) == (b.fold, b.target, b.role, b.patient)
        for f in ("spot_x", "spot_coords", "ref_x", "ref_y", "spot_y"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        for f in ("spot_barcodes", "ref_slide", "ref_patient"):
            assert list(getattr(a, f)) == list(getattr(b, f))
        for name in relation_names():
            np.testing.assert_array_equal(a.edges[name], b.edges[name])
    assert [g.target for g in read_graphs(path, fold="patient-C", role="test")] == ["C2", "C3", "C4", "C5", "C6"]
    info = read_fold_info(path)[0]
    assert info.protocol == "patient-kfold" and info.test == ["B4"] and len(info.genes) == 785
    # the stored normaliser reproduces the stored expression
    norm = Normaliser.from_dict(info.normaliser)
    slides = load_slides(Path(__file__).resolve().parents[1] / "examples" / "her2st.tsv")
    np.testing.assert_allclose(norm.transform(slides["B4"], info.genes), back[5].spot_y, rtol=1e-6)
    rows = summarize(path)
    assert rows[5] == {**rows[5], "fold": "patient-B", "target": "B4", "role": "test", "n_spot": 283,
                       "n_ref": 910, "ref_patients": ["C"]}
    # each target carries its H&E (for plots); stores written before that still load, without one
    assert back[5].image == str(slides["B4"].image.path.resolve()) and back[5].image_scale == 1.0
    import h5py

    with h5py.File(path, "r+") as f:
        for g in f["slides"].values():
            del g.attrs["image"], g.attrs["image_scale"]
    assert {(g.image, g.image_scale) for g in read_graphs(path)} == {("", 1.0)}


def test_reference_pool_refuses_leakage():
    patients = {"B4": "B", "C2": "C", "C3": "C", "D1": "D"}
    fold = Fold("patient-C", ["B4", "D1"], ["C2", "C3"])
    assert reference_pool("C2", "test", fold, patients, "patient-kfold") == ["B4", "D1"]
    assert reference_pool("B4", "train", fold, patients, "patient-kfold") == ["D1"]
    # a same-patient slide among the training slides under patient-kfold
    leaky = Fold("patient-C", ["B4", "C3"], ["C2"])
    with pytest.raises(InputError, match="leakage"):
        reference_pool("C2", "test", leaky, patients, "patient-kfold")
    with pytest.raises(InputError, match="leakage"):
        reference_pool("B4", "train", leaky, patients, "patient-kfold")
    # a test slide smuggled into the training list (Fold itself refuses to be built like that)
    with pytest.raises(InputError, match="both training and test"):
        Fold("x", ["B4", "C2"], ["C2"])
    broken = Fold("x", ["B4", "D1"], ["C2"])
    object.__setattr__(broken, "train", ["B4", "C2"])
    with pytest.raises(InputError, match="leakage"):
        reference_pool("C2", "test", broken, patients, "slide-loso")
    with pytest.raises(InputError, match="not a train slide"):
        reference_pool("C2", "train", fold, patients, "patient-kfold")
    # explicit exclusion can leave a training target without references
    assert reference_pool("C3", "train", Fold("f", ["C2", "C3"], ["B4"]), patients, "slide-loso", True) == []


def _grid_slide(array_coords, coords, platform, mpp=1.0) -> Slide:
    n = len(array_coords)
    return Slide(id="S", patient="P", barcodes=np.array([str(i) for i in range(n)], dtype=object),
                 coords=np.asarray(coords, float), counts=sp.csr_matrix(np.ones((n, 1))),
                 genes=np.array(["G"], dtype=object), microns_per_pixel=mpp, mpp_source="manifest",
                 platform=platform, array_coords=np.asarray(array_coords))


def test_near_edges_for_visium_hexagon_and_radius():
    rows, cols = np.meshgrid(np.arange(5), np.arange(10), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium: even rows use even columns
    ac = np.stack([rows[keep], cols[keep]], 1)
    coords = np.stack([ac[:, 1] * 50.0, ac[:, 0] * 86.6], 1)  # 100 µm pitch at 1 µm/px
    slide = _grid_slide(ac, coords, "visium")
    edges, w = near_edges(slide, GraphConfig())
    centre = int(np.flatnonzero((ac == [2, 4]).all(1))[0])
    nbrs = ac[edges[0, edges[1] == centre]]
    assert sorted(map(tuple, nbrs)) == [(1, 3), (1, 5), (2, 2), (2, 6), (3, 3), (3, 5)]
    assert (w == 1).all()
    radius, _ = near_edges(slide, GraphConfig(near="radius", near_radius_um=110))
    assert sorted(map(tuple, ac[radius[0, radius[1] == centre]])) == sorted(map(tuple, nbrs))
    with pytest.raises(InputError, match="array"):
        near_edges(dataclasses.replace(slide, array_coords=None), GraphConfig(near="grid"))


def test_bad_inputs_write_nothing(her2st, shared_data, tmp_path):
    from hgc.graph.build import build_from_manifest

    slides, emb = her2st
    rows = []
    for sid in ("B4", "C2", "C3"):
        s = slides[sid]
        rows.append({"slide": sid, "patient": s.patient, "format": "st", **s.source,
                     "microns_per_pixel": s.microns_per_pixel})
    manifest = write_manifest(tmp_path / "m.tsv", rows)
    out = tmp_path / "graphs.h5"
    emb_two = write_embedding_file(tmp_path / "two.h5", slides, {k: emb[k] for k in ("B4", "C2")})
    with pytest.raises(InputError, match="C3"):
        build_from_manifest(manifest, emb_two, "slide-loso", out, GraphConfig(genes=GENES), data_root=shared_data)
    shuffled = dict(slides)
    shuffled["C3"] = dataclasses.replace(slides["C3"], barcodes=np.array([f"x{b}" for b in slides["C3"].barcodes]))
    emb_bad = write_embedding_file(tmp_path / "bad.h5", shuffled, {k: emb[k] for k in ("B4", "C2", "C3")})
    with pytest.raises(InputError, match="barcodes"):
        build_from_manifest(manifest, emb_bad, "slide-loso", out, GraphConfig(genes=GENES), data_root=shared_data)
    split = tmp_path / "split.tsv"
    split.write_text("slide\tfold\trole\nB4\tf1\ttest\nC2\tf1\ttest\nC3\tf2\ttest\nB4\tf2\ttrain\n")
    with pytest.raises(InputError, match="no training slide"):
        build_from_manifest(manifest, emb_two, "split-file", out, GraphConfig(genes=GENES), split, shared_data)
    assert not out.exists() and not list(tmp_path.glob("graphs.h5*"))
    # a good build through the CLI, then inspect
    emb_all = write_embedding_file(tmp_path / "all.h5", slides, {k: emb[k] for k in ("B4", "C2", "C3")})
    from hgc.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["build-graph", str(manifest), "--embeddings", str(emb_all), "--protocol",
                               "patient-kfold", "--genes", GENES, "--out", str(out),
                               "--data-root", str(shared_data)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["graph", "inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["fold"], r["target"], r["role"], r["ref_patients"]) for r in rows] == [
        ("patient-B", "C2", "train", ["C"]), ("patient-B", "C3", "train", ["C"]),
        ("patient-B", "B4", "test", ["C"]),
        ("patient-C", "B4", "train", ["B"]),  # the fold's only training slide references itself
        ("patient-C", "C2", "test", ["B"]), ("patient-C", "C3", "test", ["B"]),
    ]
    assert all(r["edges"]["refer"] == 7 * r["n_spot"] for r in rows)
    res = runner.invoke(main, ["build-graph", str(manifest), "--embeddings", str(emb_two), "--protocol",
                               "slide-loso", "--out", str(tmp_path / "x.h5"), "--data-root", str(shared_data)])
    assert res.exit_code == 1 and "C3" in res.output and not (tmp_path / "x.h5").exists()
    res = runner.invoke(main, ["graph", "inspect", str(manifest)])
    assert res.exit_code == 1 and "HDF5" in res.output
