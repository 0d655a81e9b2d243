"""SlideGraph -> DGL / PyG conversions on a real her2st graph: round trips and identical tensors."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from _backends import dgl_importable, her2st_graph, one_torch_thread, require_dgl  # noqa: F401 (autouse fixture)
from hgc.errors import InputError, MissingDependencyError
from hgc.graph.record import RELATIONS
from hgc.nn.graphlib.convert import to_dgl, to_pyg


@pytest.fixture(scope="module")
def graph(her2st_manifest, shared_data):
    return her2st_graph(her2st_manifest, shared_data)


def test_real_graph_has_all_relations(graph):
    assert set(graph.edges) == set(RELATIONS)
    assert graph.n_spot == 187 and graph.spot_y is not None


def test_pyg_round_trip(graph):
    data = to_pyg(graph)
    np.testing.assert_array_equal(data["spot"].x.numpy(), graph.spot_x)
    np.testing.assert_array_equal(data["spot"].y.numpy(), graph.spot_y)
    np.testing.assert_array_equal(data["ref"].x.numpy(), graph.ref_x)
    np.testing.assert_array_equal(data["ref"].y.numpy(), graph.ref_y)
    assert set(data.edge_types) == {r.canonical for r in RELATIONS.values()}
    for name, canon in ((r.name, r.canonical) for r in RELATIONS.values()):
        np.testing.assert_array_equal(data[canon].edge_index.numpy(), graph.edges[name])
        np.testing.assert_array_equal(data[canon].edge_weight.numpy(), graph.edge_weight[name])
    assert data["spot"].num_nodes == graph.n_spot and data["ref"].num_nodes == graph.n_ref


def test_dgl_round_trip(graph):
    require_dgl()
    hg = to_dgl(graph)
    assert set(hg.canonical_etypes) == {r.canonical for r in RELATIONS.values()}
    assert hg.num_nodes("spot") == graph.n_spot and hg.num_nodes("ref") == graph.n_ref
    np.testing.assert_array_equal(hg.nodes["spot"].data["x"].numpy(), graph.spot_x)
    np.testing.assert_array_equal(hg.nodes["spot"].data["y"].numpy(), graph.spot_y)
    np.testing.assert_array_equal(hg.nodes["ref"].data["x"].numpy(), graph.ref_x)
    np.testing.assert_array_equal(hg.nodes["ref"].data["y"].numpy(), graph.ref_y)
    for name, canon in ((r.name, r.canonical) for r in RELATIONS.values()):
        src, dst = hg.edges(etype=canon, order="eid")
        np.testing.assert_array_equal(np.stack([src.numpy(), dst.numpy()]), graph.edges[name])
        np.testing.assert_array_equal(hg.edges[canon].data["w"].numpy(), graph.edge_weight[name])


def test_dgl_and_pyg_carry_identical_tensors(graph):
    require_dgl()
    hg, data = to_dgl(graph, dtype=torch.float64), to_pyg(graph, dtype=torch.float64)
    for nt in ("spot", "ref"):
        for key in ("x", "y"):
            a, b = hg.nodes[nt].data[key], data[nt][key]
            assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)
    for canon in (r.canonical for r in RELATIONS.values()):
        assert torch.equal(torch.stack(hg.edges(etype=canon, order="eid")), data[canon].edge_index)
        assert torch.equal(hg.edges[canon].data["w"], data[canon].edge_weight)


def test_graph_without_spot_y(graph):
    g = dataclasses.replace(graph, spot_y=None)
    assert "y" not in to_pyg(g)["spot"]
    if dgl_importable():
        assert "y" not in to_dgl(g).nodes["spot"].data


@pytest.mark.parametrize("convert", ["pyg", "dgl"])
def test_unknown_relation_and_bad_edges_are_input_errors(graph, convert):
    if convert == "dgl":
        require_dgl()
    fn = {"pyg": to_pyg, "dgl": to_dgl}[convert]
    renamed = dataclasses.replace(graph, edges={**graph.edges, "spot_near": graph.edges["near"]})
    with pytest.raises(InputError, match=r"spot_near.*does not know|does not know.*spot_near|relations \['spot_near'\]"):
        fn(renamed)
    bad = graph.edges["refer"].copy()
    bad[0, 0] = graph.n_ref  # a ref index one past the end
    with pytest.raises(InputError, match="source indices"):
        fn(dataclasses.replace(graph, edges={**graph.edges, "refer": bad}))
    with pytest.raises(InputError, match="edge_weight"):
        fn(dataclasses.replace(graph, edge_weight={**graph.edge_weight, "near": graph.edge_weight["near"][:-1]}))


def test_dgl_tests_fail_rather_than_skip_on_the_dgl_stack(monkeypatch):
    import sys

    import _backends

    monkeypatch.setattr(_backends, "dgl_importable", lambda: False)
    monkeypatch.setitem(sys.modules, "dgl", None)  # make `import dgl` fail
    monkeypatch.setenv("HGC_STACK", "dgl")
    with pytest.raises(MissingDependencyError, match="dgl"):
        require_dgl()
    monkeypatch.setenv("HGC_STACK", "modern")
    with pytest.raises(pytest.skip.Exception, match="DGL is not installable on this stack"):
        require_dgl()


def test_dgl_stack_really_has_dgl():
    """On the dgl stack DGL tests must run, never skip."""
    if os.environ.get("HGC_STACK") != "dgl":
        pytest.skip("only meaningful with HGC_STACK=dgl")
    assert dgl_importable()
