"""Augmentations are applied for real: complementary masks, exact edge drops, no message on dropped edges."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _backends import backend, her2st_graph, one_torch_thread  # noqa: F401 (autouse fixture)
from hgc.nn import ModelConfig, SpaHGC
from hgc.nn.layers import RelationalLayer
from hgc.nn.masking import complementary_masks, make_views

SMALL = dict(hidden=16, layers=2, heads=2, predictor_hidden=16, proj_dim=8)


@pytest.fixture(scope="module")
def graph(her2st_manifest, shared_data):
    return her2st_graph(her2st_manifest, shared_data)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_complementary_masks_have_exact_sizes():
    shapes = {"spot": (187, 8), "ref": (545, 12)}
    m1, m2 = complementary_masks(shapes, {"spot": 0.1, "ref": 0.9}, _gen(), torch.device("cpu"))
    assert m1["spot"].shape == (187,) and m1["ref"].shape == (545,)
    assert int(m1["spot"].sum()) == round(0.1 * 187) and int(m1["ref"].sum()) == round(0.9 * 545)
    for t in ("spot", "ref"):
        assert torch.equal(m2[t], ~m1[t])  # every node is masked in exactly one view


def test_feature_masks_are_complementary_per_entry():
    shapes = {"spot": (400, 50), "ref": (300, 60)}
    m1, m2 = complementary_masks(shapes, {"spot": 0.1, "ref": 0.9}, _gen(), torch.device("cpu"), unit="feature")
    assert m1["spot"].shape == (400, 50) and m1["ref"].shape == (300, 60)
    assert abs(float(m1["spot"].float().mean()) - 0.1) < 0.01 and abs(float(m1["ref"].float().mean()) - 0.9) < 0.01
    for t in ("spot", "ref"):
        assert torch.equal(m2[t], ~m1[t])  # every entry is masked in exactly one view
    # nodes are partly masked, not whole rows: each spot keeps entries in view 1, each ref in view 2
    assert bool((~m1["spot"]).any(1).all()) and bool((~m2["ref"]).any(1).all())


@pytest.mark.parametrize("name", ["pyg", "dgl"])
def test_views_differ_as_configured_and_are_reproducible(graph, name):
    be = backend(name)
    pg = be.prepare(graph)
    drops = {"near": 0.2, "refer": 0.5, "close": 0.0}
    v1, v2 = make_views(be, pg, {"spot": 0.1, "ref": 0.9}, drops, _gen(1))
    for rel, p in drops.items():
        e = graph.edges[rel].shape[1]
        for v in (v1, v2):
            assert v.graph.edge_index[rel].shape[1] == e - round(p * e)
        kept = [{tuple(c) for c in v.graph.edge_index[rel].T.tolist()} for v in (v1, v2)]
        assert (kept[0] != kept[1]) == (p > 0)  # views drop edges independently
        assert kept[0] <= {tuple(c) for c in graph.edges[rel].T.tolist()}
    assert torch.equal(v1.mask["spot"], ~v2.mask["spot"]) and v1.mask["ref"].float().mean() > 0.85
    w1, w2 = make_views(be, pg, {"spot": 0.1, "ref": 0.9}, drops, _gen(1))
    assert torch.equal(w1.mask["ref"], v1.mask["ref"])
    assert torch.equal(w2.graph.edge_index["near"], v2.graph.edge_index["near"])


def _dropped_sources(full: torch.Tensor, kept: torch.Tensor, n_dst: int) -> tuple[int, int]:
    """A (source, destination) pair linked only by a dropped edge (and not a self pair)."""
    full_pairs = {tuple(c) for c in full.T.tolist()}
    kept_pairs = {tuple(c) for c in kept.T.tolist()}
    for s, d in sorted(full_pairs - kept_pairs):
        if s != d:
            return s, d
    raise AssertionError("no dropped edge found")


@pytest.mark.parametrize("name", ["pyg", "dgl"])
@pytest.mark.parametrize("rel", ["near", "refer", "close"])
def test_dropped_edges_carry_no_message(graph, name, rel):
    be = backend(name)
    pg = be.prepare(graph, dtype=torch.float64)
    keep = torch.rand(graph.edges[rel].shape[1], generator=_gen(2)) > 0.5
    view = be.drop_edges(pg, {rel: keep})
    torch.manual_seed(0)
    layer = RelationalLayer(ModelConfig(hidden=8, heads=2), graph.n_genes).double()
    h = {"spot": torch.randn(graph.n_spot, 8, dtype=torch.float64), "ref": torch.randn(graph.n_ref, 8, dtype=torch.float64)}
    src_t, dst_t = {"near": ("spot", "spot"), "refer": ("ref", "spot"), "close": ("ref", "ref")}[rel]
    s, d = _dropped_sources(pg.edge_index[rel], view.edge_index[rel], pg.num_nodes[dst_t])

    def out(g, hs):
        return layer(be, g, hs, pg.ref_y)

    bumped = {**h, src_t: h[src_t].clone()}
    bumped[src_t][s] += 10.0
    with torch.no_grad():
        base_view, bump_view = out(view, h), out(view, bumped)
        base_full, bump_full = out(pg, h), out(pg, bumped)
    assert torch.equal(base_view[dst_t][d], bump_view[dst_t][d])  # the dropped edge s->d is silent
    assert not torch.allclose(base_full[dst_t][d], bump_full[dst_t][d])  # ...and it spoke before
    if rel == "refer":  # the reverse direction is dropped too: d no longer updates ref s
        bumped = {**h, "spot": h["spot"].clone()}
        bumped["spot"][d] += 10.0
        with torch.no_grad():
            assert torch.equal(out(view, h)["ref"][s], out(view, bumped)["ref"][s])
            assert not torch.equal(out(pg, h)["ref"][s], out(pg, bumped)["ref"][s])


def _perturbed(graph, **arrays):
    rng = np.random.default_rng(5)
    return dataclasses.replace(
        graph, **{k: (getattr(graph, k) + rng.normal(size=getattr(graph, k).shape)).astype(np.float32) for k in arrays})


@pytest.mark.parametrize("name", ["pyg", "dgl"])
def test_training_views_apply_masks_and_drops_for_real(graph, name):
    """With every ref masked or every refer edge dropped, view 1's loss ignores the references;
    with every spot masked it ignores the spot images. Inference on the same graph does not."""
    be = backend(name)
    dims = (graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes)
    other_refs = _perturbed(graph, ref_x=True, ref_y=True)
    other_spots = _perturbed(graph, spot_x=True)
    cases = [
        (dict(mask_spot=0.0, mask_ref=1.0, drop={"near": 0.0, "refer": 0.0, "close": 0.0}), other_refs),
        (dict(mask_spot=0.0, mask_ref=0.0, drop={"near": 0.0, "refer": 1.0, "close": 0.0}), other_refs),
        (dict(mask_spot=1.0, mask_ref=0.0, drop={"near": 0.0, "refer": 0.0, "close": 0.0}), other_spots),
    ]
    for opts, other in cases:
        for contrast in ("none", "bgrl"):
            model = SpaHGC(ModelConfig(contrast=contrast, dropout=0.0, **opts, **SMALL), *dims, be, seed=0)
            model.fit_gene_basis(torch.as_tensor(graph.ref_y))
            a, b = be.prepare(graph), be.prepare(other)
            _, pa = model.training_loss(a, _gen(3))
            _, pb = model.training_loss(b, _gen(3))
            assert (pa["mse"], pa["pcc"]) == pytest.approx((pb["mse"], pb["pcc"]), abs=1e-6), opts
            with torch.no_grad():
                assert not torch.allclose(model(a), model(b)), opts  # inference sees everything
        clean = SpaHGC(ModelConfig(contrast="none", supervise="clean", **opts, **SMALL), *dims, be, seed=0)
        clean.fit_gene_basis(torch.as_tensor(graph.ref_y))
        _, pa = clean.training_loss(a, _gen(3))
        _, pb = clean.training_loss(b, _gen(3))
        assert pa["mse"] != pytest.approx(pb["mse"], abs=1e-6), opts  # "clean" supervises unmasked
