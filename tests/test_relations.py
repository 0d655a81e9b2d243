"""Relations are data: a relation added to the table (here a toy fourth one, spot -> ref) is built
into the model, carries messages under DGL and PyG alike, is dropped in training views, survives
the graph store, and is checked like the built-in ones, with nothing in ``hgc.nn`` changed."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _backends import backend, dgl_importable, one_torch_thread  # noqa: F401 (autouse fixture)
from graph_factory import make_fold
from hgc.errors import InputError
from hgc.graph import GraphSet, read_graph_set, write_graphs
from hgc.graph.record import Relation, register_relation, relation_names, unregister_relation
from hgc.nn import ModelConfig, SpaHGC

SMALL = dict(hidden=16, layers=2, heads=2, predictor_hidden=16, proj_dim=8, dropout=0.0, gene_rank=None)


@pytest.fixture(params=["mean", "attention"])
def toy(request):
    """A fourth relation 'toy' (spot -> ref) of each message kind, removed again afterwards."""
    rel = Relation("spot", "toy", "ref", request.param)
    register_relation(rel)
    yield rel
    unregister_relation("toy")


def _toy_edges(n_spot: int, n_ref: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n_spot, 3 * n_ref), np.repeat(np.arange(n_ref), 3)]).astype(np.int64)


def _with_toy(graph, seed: int = 0):
    e = _toy_edges(graph.n_spot, graph.n_ref, seed)
    return dataclasses.replace(graph, edges={**graph.edges, "toy": e},
                               edge_weight={**graph.edge_weight, "toy": np.ones(e.shape[1], np.float32)})


def _model(graph, name: str, **opts) -> SpaHGC:
    dims = (graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes)
    return SpaHGC(ModelConfig(**{**SMALL, **opts}), *dims, backend(name), seed=0)


@pytest.mark.parametrize("name", ["pyg", "dgl"])
def test_a_registered_relation_is_built_trained_and_carries_messages(toy, name):
    graph = _with_toy(make_fold(["A1", "A2", "B1"], ["C1"]).graphs("test")[0])
    model = _model(graph, name, drop={"toy": 0.5})
    assert model.cfg.relations == ("near", "refer", "close", "toy") == relation_names()
    assert type(model.encoder.layers[0].convs["toy"]).__name__ == {"mean": "MeanMessages",
                                                                   "attention": "AttentionMessages"}[toy.kind]
    be = model.backend
    pred = model(be.prepare(graph))
    other = model(be.prepare(_with_toy(graph, seed=1)))  # the same graph with other toy edges
    assert pred.shape == (graph.n_spot, graph.n_genes) and torch.isfinite(pred).all()
    assert not torch.allclose(pred, other)  # the relation's messages reach the predictions
    without = _model(graph, name, relations=("near", "refer", "close"))
    assert "toy" not in without.encoder.layers[0].convs
    assert torch.equal(without(be.prepare(graph)), without(be.prepare(_with_toy(graph, seed=1))))
    loss, parts = model.training_loss(be.prepare(graph), torch.Generator().manual_seed(0))
    loss.backward()
    toy_grads = [p.grad for p in model.encoder.layers[0].convs["toy"].parameters()]
    assert np.isfinite(parts["loss"]) and all(g is not None and g.abs().sum() > 0 for g in toy_grads)
    assert model.cfg.drop_ratios == {"near": 0.0, "refer": 0.0, "close": 0.0, "toy": 0.5}  # unnamed: none dropped


def test_dgl_and_pyg_agree_on_a_registered_relation(toy):
    if not dgl_importable():
        backend("dgl")  # skips on the modern stack, fails on the dgl one
    graph = _with_toy(make_fold(["A1", "A2", "B1"], ["C1"]).graphs("test")[0])
    a = _model(graph, "dgl")
    b = _model(graph, "pyg")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(a.backend.prepare(graph)), b(b.backend.prepare(graph)), rtol=1e-4, atol=1e-5)


def test_a_registered_relation_survives_the_graph_store(toy, tmp_path):
    fold = make_fold(["A1", "A2", "B1"], ["C1"])
    for t in fold.targets:
        n_ref = len(fold.bank.rows(fold.references(t).slides))
        t.edges["toy"] = _toy_edges(len(fold.slides[t.target].barcodes), n_ref, 0)
        t.edge_weight["toy"] = np.ones(t.edges["toy"].shape[1], np.float32)
    path = write_graphs(GraphSet(fold.config, "slide-loso", dict(fold.slides), [fold]), tmp_path / "g.h5")
    back = read_graph_set(path).folds[0]
    for t, u in zip(fold.targets, back.targets):
        np.testing.assert_array_equal(u.edges["toy"], t.edges["toy"])
    assert set(back.graphs("test")[0].edges) == {"near", "refer", "close", "toy"}


def test_relations_are_checked_against_the_table(toy):
    graph = make_fold(["A1", "A2", "B1"], ["C1"]).graphs("test")[0]
    model = _model(graph, "pyg")
    with pytest.raises(InputError, match=r"lacks relations \['toy'\]"):
        model(model.backend.prepare(graph))  # the model uses 'toy', the graph has none
    with pytest.raises(InputError, match="already defined"):
        register_relation(Relation("ref", "toy", "spot", "mean"))
    with pytest.raises(InputError, match="kind 'sum' is unknown"):
        Relation("spot", "toy2", "spot", "sum")
    with pytest.raises(InputError, match=r"drop\) name relations \['tyo'\]"):
        ModelConfig(drop={"tyo": 0.5})
    unregister_relation("toy")
    with pytest.raises(InputError, match=r"relations \['toy'\] that hgc does not know"):
        backend("pyg").prepare(_with_toy(graph))
    with pytest.raises(InputError, match="built in"):
        unregister_relation("near")
    register_relation(toy)  # for the fixture's teardown


def test_checkpoints_and_configs_from_before_the_relation_table_load():
    """hgc <= 0.2 named layer parameters per relation by hand and stored drop_<relation> options."""
    graph = make_fold(["A1", "A2", "B1"], ["C1"]).graphs("test")[0]
    model = _model(graph, "pyg")
    old_names = {"convs.near.lin.": "neigh.near.", "convs.close.lin.": "neigh.close.",
                 "convs.refer.forward_attn.": "refer.", "convs.refer.reverse_attn.": "refer_rev."}
    old = {}
    for key, value in model.state_dict().items():
        for new, before in old_names.items():
            key = key.replace(f".{new}", f".{before}")
        old[key] = value
    assert any(".neigh.near." in k for k in old) and not any(".convs." in k for k in old)
    fresh = SpaHGC(model.cfg, graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes, model.backend, seed=1)
    fresh.load_state_dict(old)  # strict: every old name found its place
    pg = model.backend.prepare(graph)
    assert torch.equal(fresh(pg), model(pg))
    cfg = ModelConfig.from_stored({"drop_near": 0.2, "drop_refer": 0.3, "drop_close": 0.1})
    assert cfg.drop == {"near": 0.2, "refer": 0.3, "close": 0.1}
