"""The backend seam: DGL and PyG primitives and the whole model agree on a real her2st graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _backends import backend, dgl_importable, her2st_graph, one_torch_thread, require_dgl  # noqa: F401 (autouse fixture)
from hgc.errors import InputError, MissingDependencyError
from hgc.nn import ModelConfig, SpaHGC, get_backend
from hgc.nn.graphlib import dgl_supports, reverse_key
from hgc.train.presets import PRESETS

SMALL = dict(hidden=32, layers=2, heads=4, predictor_hidden=32, proj_dim=16)


@pytest.fixture(scope="module")
def graph(her2st_manifest, shared_data):
    return her2st_graph(her2st_manifest, shared_data)


def test_get_backend_names():
    assert get_backend("auto").name == ("dgl" if dgl_importable() else "pyg")
    assert get_backend("pyg").name == "pyg"
    assert get_backend("auto", device="cpu").name == get_backend("auto").name
    if dgl_importable() and not dgl_supports("cuda"):  # PyPI's CPU-only DGL: auto uses PyG on GPUs
        assert get_backend("auto", device="cuda").name == "pyg"
    with pytest.raises(InputError, match="unknown graph backend 'torch'"):
        get_backend("torch")
    if not dgl_importable():
        with pytest.raises(MissingDependencyError, match="dgl"):
            get_backend("dgl")


def _numpy_mean(e: np.ndarray, h: np.ndarray, n_dst: int) -> np.ndarray:
    out = np.zeros((n_dst, h.shape[1]))
    np.add.at(out, e[1], h[e[0]])
    deg = np.bincount(e[1], minlength=n_dst)
    return out / np.maximum(deg, 1)[:, None]


@pytest.mark.parametrize("name", ["pyg", "dgl"])
def test_primitives_match_a_numpy_reference(graph, name):
    be = backend(name)
    pg = be.prepare(graph, dtype=torch.float64)
    rng = np.random.default_rng(0)
    n = {"spot": graph.n_spot, "ref": graph.n_ref}
    for rel, (src_t, dst_t) in {"near": ("spot", "spot"), "close": ("ref", "ref"), "refer": ("ref", "spot")}.items():
        e = graph.edges[rel]
        for key, ee, s, d in ((rel, e, src_t, dst_t), (reverse_key(rel), e[::-1], dst_t, src_t)):
            h = rng.normal(size=(n[s], 3))
            got = be.mean(pg.ops[key], torch.from_numpy(h)).numpy()
            np.testing.assert_allclose(got, _numpy_mean(ee, h, n[d]), rtol=1e-12, atol=1e-12)
            scores = torch.from_numpy(rng.normal(size=(ee.shape[1], 2)))
            a = be.softmax(pg.ops[key], scores)
            sums = np.zeros((n[d], 2))
            np.add.at(sums, ee[1], a.numpy())
            has_in = np.bincount(ee[1], minlength=n[d]) > 0
            np.testing.assert_allclose(sums[has_in], 1.0, rtol=1e-12)
            v = torch.from_numpy(rng.normal(size=(n[s], 2, 3)))
            want = np.zeros((n[d], 2, 3))
            np.add.at(want, ee[1], v.numpy()[ee[0]] * a.numpy()[:, :, None])
            np.testing.assert_allclose(be.weighted_sum(pg.ops[key], v, a).numpy(), want, rtol=1e-12, atol=1e-12)
            q = torch.from_numpy(rng.normal(size=(n[d], 2, 3)))
            want_dot = (v.numpy()[ee[0]] * q.numpy()[ee[1]]).sum(-1)
            np.testing.assert_allclose(be.dot(pg.ops[key], v, q).numpy(), want_dot, rtol=1e-12, atol=1e-12)


def test_fused_pyg_attention_kernels_have_exact_gradients_over_chunks(monkeypatch):
    """The hand-fused dot / weighted sum (chunks of edges, no per-edge tensor kept) against
    torch's numerical gradient, with chunks far smaller than the edge count, on a random graph
    with repeated edges and a destination without any."""
    import hgc.nn.graphlib.pyg_backend as pyg_backend

    monkeypatch.setattr(pyg_backend, "EDGE_CHUNK_ELEMENTS", 64)  # 10 edges per chunk at 2 heads x 3 dims
    be = get_backend("pyg")
    gen = torch.Generator().manual_seed(0)
    n_src, n_dst, n_edges = 12, 9, 57
    op = pyg_backend._Rel(torch.randint(0, n_src, (n_edges,), generator=gen),
                          torch.randint(0, n_dst - 1, (n_edges,), generator=gen), n_dst)
    k = torch.randn(n_src, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    q = torch.randn(n_dst, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.rand(n_edges, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, q: be.dot(op, k, q), (k, q))
    assert torch.autograd.gradcheck(lambda v, a: be.weighted_sum(op, v, a), (k, a))
    torch.testing.assert_close(be.dot(op, k, q), (k[op.src] * q[op.dst]).sum(-1))


def _outputs_and_grads(model: SpaHGC, pg, seed: int):
    pred = model(pg)
    model.zero_grad()
    loss, _ = model.training_loss(pg, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return pred.detach(), loss.detach(), grads


@pytest.mark.parametrize(("contrast", "preset"), [("bgrl", "hgc"), ("infonce", "hgc"), ("bgrl", "hgc-0.1")])
def test_same_weights_same_outputs_and_gradients_under_dgl_and_pyg(graph, contrast, preset):
    """Agreement to 1e-5 absolute in float64 (measured ~1e-15) and float32 (measured ~6e-7)."""
    require_dgl()
    cfg = ModelConfig(contrast=contrast, **{**PRESETS[preset].model, **SMALL})
    dims = (graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes)
    for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-5)):
        pyg, dgl = get_backend("pyg"), get_backend("dgl")
        m_pyg = SpaHGC(cfg, *dims, pyg, seed=3).to(dtype)
        m_pyg.fit_gene_basis(torch.as_tensor(graph.ref_y))  # the low-rank head's basis, if it has one
        m_dgl = SpaHGC(cfg, *dims, dgl, seed=4).to(dtype)
        m_dgl.load_state_dict(m_pyg.state_dict())  # the same weights, loaded across backends
        p1, l1, g1 = _outputs_and_grads(m_pyg, pyg.prepare(graph, dtype=dtype), seed=11)
        p2, l2, g2 = _outputs_and_grads(m_dgl, dgl.prepare(graph, dtype=dtype), seed=11)
        torch.testing.assert_close(p1, p2, rtol=0, atol=tol)
        torch.testing.assert_close(l1, l2, rtol=0, atol=tol)
        assert g1.keys() == g2.keys() and len(g1) > 20
        for k in g1:
            torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
