"""SpaHGC's contract with the trainer: deterministic unmasked inference, relation checks,
seeded training views, BGRL's EMA target, InfoNCE, ablations and checkpoints (real her2st graph)."""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch

from _backends import her2st_graph, one_torch_thread  # noqa: F401 (autouse fixture)
from hgc.errors import InputError
from hgc.graph.record import relation_names
from hgc.nn import ModelConfig, SpaHGC, get_backend
from hgc.nn.contrastive import ema_momentum
from hgc.train.presets import PRESETS

SMALL = dict(hidden=32, layers=2, heads=4, predictor_hidden=32, proj_dim=16)


@pytest.fixture(scope="module")
def graph(her2st_manifest, shared_data):
    return her2st_graph(her2st_manifest, shared_data)


@pytest.fixture(scope="module")
def be():
    return get_backend("auto")  # DGL on the dgl stack, PyG on the modern one


@pytest.fixture(scope="module")
def pg(graph, be):
    return be.prepare(graph)


def _model(graph, be, fit_basis: bool = True, **opts) -> SpaHGC:
    """The model as training builds it: with a low-rank head (the default) fitted to the references."""
    dims = (graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes)
    model = SpaHGC(ModelConfig(**{**SMALL, **opts}), *dims, be, seed=0)
    if fit_basis:
        model.fit_gene_basis(torch.as_tensor(graph.ref_y))
    return model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_inference_is_deterministic_unmasked_and_mode_independent(graph, be, pg):
    model = _model(graph, be, dropout=0.5)
    model.train()
    a = model(pg)
    b = model(pg)
    model.eval()
    c = model(pg)
    assert a.shape == (graph.n_spot, graph.n_genes)
    assert torch.equal(a, b) and torch.equal(a, c)  # no dropout, no masking, in either mode
    h, y = model.encoder(be, pg)
    assert torch.equal(model.head(be, pg, h, y), c)  # forward is the unmasked encoder + head
    mask = {"spot": torch.zeros(graph.n_spot, dtype=torch.bool), "ref": torch.ones(graph.n_ref, dtype=torch.bool)}
    h, y = model.encoder(be, pg, mask)
    assert not torch.allclose(model.head(be, pg, h, y), c)  # a masked view would differ


def test_unknown_and_missing_relations_are_errors(graph, be, pg):
    renamed = dataclasses.replace(graph, edges={**graph.edges, "neighbour": graph.edges["near"]})
    with pytest.raises(InputError, match="neighbour"):
        be.prepare(renamed)
    model = _model(graph, be)
    # a prepared graph smuggling an unknown relation past prepare() is refused by the model too
    smuggled = dataclasses.replace(pg, tensors=dataclasses.replace(
        pg.tensors, edge_index={**pg.tensors.edge_index, "neighbour": pg.edge_index["near"]}))
    with pytest.raises(InputError, match="does not know"):
        model(smuggled)
    no_near = be.prepare(dataclasses.replace(
        graph, edges={k: v for k, v in graph.edges.items() if k != "near"},
        edge_weight={k: v for k, v in graph.edge_weight.items() if k != "near"}))
    with pytest.raises(InputError, match=r"lacks relations \['near'\]"):
        model(no_near)
    with pytest.raises(InputError, match="unknown"):
        ModelConfig(relations=("near", "nearby"))


def test_ablation_ignores_a_relation_explicitly(graph, be, pg):
    model = _model(graph, be, relations=("refer", "close"))
    rewired = dataclasses.replace(graph, edges={**graph.edges, "near": graph.edges["near"][:, ::-1]})
    no_near = dataclasses.replace(
        graph, edges={k: v for k, v in graph.edges.items() if k != "near"},
        edge_weight={k: v for k, v in graph.edge_weight.items() if k != "near"})
    out = model(pg)
    assert torch.equal(out, model(be.prepare(rewired))) and torch.equal(out, model(be.prepare(no_near)))
    assert model.head.pool is not None  # refer still pools in the head
    spot_only = _model(graph, be, relations=("near",))
    assert spot_only.head.pool is None
    other_refs = dataclasses.replace(graph, ref_y=graph.ref_y + 1.0)
    assert torch.equal(spot_only(pg), spot_only(be.prepare(other_refs)))  # refs unreachable


def test_feature_sizes_are_checked(graph, be, pg):
    model = SpaHGC(ModelConfig(**SMALL), graph.spot_x.shape[1] + 1, graph.ref_x.shape[1], graph.n_genes, be)
    with pytest.raises(InputError, match="feature sizes"):
        model(pg)
    with pytest.raises(InputError, match="no spot expression"):
        _model(graph, be).training_loss(be.prepare(dataclasses.replace(graph, spot_y=None)))


@pytest.mark.parametrize(("contrast", "supervise"),
                         [("bgrl", "view1"), ("infonce", "view1"), ("none", "view1"), ("bgrl", "clean")])
def test_training_loss_is_seeded_and_has_its_parts(graph, be, pg, contrast, supervise):
    model = _model(graph, be, contrast=contrast, supervise=supervise)
    l1, p1 = model.training_loss(pg, _gen(7))
    l2, p2 = model.training_loss(pg, _gen(7))
    l3, _ = model.training_loss(pg, _gen(8))
    assert set(p1) == {"loss", "mse", "pcc", "contrast_spot", "contrast_ref"}
    assert p1 == p2 and p1["loss"] != float(l3.detach())
    c = model.cfg
    assert p1["loss"] == pytest.approx(
        p1["mse"] + c.lambda_pcc * (1 - p1["pcc"]) + c.lambda_spot * p1["contrast_spot"] + c.lambda_ref * p1["contrast_ref"],
        rel=1e-5)
    if contrast == "none":
        assert p1["contrast_spot"] == p1["contrast_ref"] == 0.0
    else:
        assert p1["contrast_spot"] > 0 and p1["contrast_ref"] > 0
    l1.backward()
    trained = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.mask_token")]
    assert all(p.grad is not None for p in trained)


def test_bgrl_target_is_an_ema_of_the_online_encoder(graph, be, pg):
    model = _model(graph, be, ema_momentum=0.9)
    online = dict(model.encoder.named_parameters())
    target = dict(model.target.named_parameters())
    assert all(torch.equal(online[k], target[k]) and not target[k].requires_grad for k in online)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in target.items()}
    loss, _ = model.training_loss(pg, _gen())
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())  # target under no_grad
    opt.step()
    model.update_target()
    for k in online:
        torch.testing.assert_close(target[k], 0.9 * before[k] + 0.1 * online[k].detach())
    assert int(model.ema_step) == 1
    assert ema_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert ema_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert ema_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert ema_momentum(0.99, 50, None) == 0.99


def test_infonce_and_none_have_no_target(graph, be, pg):
    for contrast in ("infonce", "none"):
        model = _model(graph, be, contrast=contrast)
        assert not hasattr(model, "target")
        model.update_target()  # a no-op, so trainers can call it unconditionally


@pytest.mark.parametrize("gene_rank", [10, None])
def test_training_reduces_the_loss(graph, be, pg, gene_rank):
    model = _model(graph, be, gene_rank=gene_rank)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = _gen(0)
    losses = []
    for _ in range(25):
        loss, parts = model.training_loss(pg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target()
        losses.append(parts["mse"])
    # a low-rank head starts at the training mean, so it has less to gain in 25 steps
    assert np.mean(losses[-5:]) < (0.95 if gene_rank else 0.7) * np.mean(losses[:5])


def test_checkpoint_and_config_round_trip(graph, be, pg):
    model = _model(graph, be, contrast="bgrl")
    cfg = ModelConfig.from_dict(model.cfg.to_dict())
    assert cfg == model.cfg
    twin = SpaHGC(cfg, graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes, be, seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    twin.load_state_dict(torch.load(buf))
    assert any(k.startswith("target.") for k in model.state_dict()) and "ema_step" in model.state_dict()
    assert torch.equal(twin(pg), model(pg))
    assert torch.equal(copy.deepcopy(model)(pg), model(pg))
    assert torch.equal(pickle.loads(pickle.dumps(model))(pg), model(pg))
    with pytest.raises(InputError, match="unknown options"):
        ModelConfig.from_dict({"hidden": 8, "hiden": 8})
    for bad in (dict(hidden=30, heads=4), dict(mask_ref=1.5), dict(contrast="simclr"), dict(dropout=1.0),
                dict(supervise="masked"), dict(lambda_pcc=-1.0), dict(ema_total_steps=0)):
        with pytest.raises(InputError):
            ModelConfig(**bad)
    assert ModelConfig().relations == relation_names()


def test_published_choices_build_train_and_differ_from_hgc(graph, be, pg):
    opts = dict(PRESETS["spahgc-published"].model)
    model = _model(graph, be, **opts)
    assert isinstance(model.encoder.layers[0].norm["spot"], torch.nn.Identity)  # no post-LayerNorm
    assert model.encoder.expr is not None and model.head.kind == "published"
    l1, p1 = model.training_loss(pg, _gen(5))
    _, p2 = model.training_loss(pg, _gen(5))
    assert p1 == p2 and p1["contrast_spot"] > 0
    l1.backward()
    # feature masks zero entries: the mask tokens are unused, every other parameter learns
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == {"encoder.mask_token.spot", "encoder.mask_token.ref"}
    model.eval()
    assert torch.equal(model(pg), model(pg))
    assert not torch.allclose(model(pg), _model(graph, be, **PRESETS["hgc-0.1"].model)(pg))


def test_feature_masks_zero_entries_not_rows(graph, be, pg):
    from hgc.nn.masking import make_views

    v1, v2 = make_views(be, pg, {"spot": 0.1, "ref": 0.9}, {}, _gen(2), unit="feature")
    assert v1.mask["spot"].shape == pg.x["spot"].shape
    assert v1.mask["ref"].shape == (graph.n_ref, graph.ref_x.shape[1] + graph.n_genes)
    model = _model(graph, be, mask_unit="feature")
    seen = []
    hook = model.encoder.inp["spot"].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model.encoder(be, pg, v1.mask)
    hook.remove()
    x = pg.x["spot"]
    assert torch.equal(seen[0], x.masked_fill(v1.mask["spot"], 0.0))


@pytest.mark.parametrize(("option", "value"), [("head", "mlp"), ("mask_unit", "spot"), ("expression", "log"),
                                               ("attention_logits", "relu"), ("input_block", "conv"),
                                               ("attention_dropout", 1.0)])
def test_unknown_model_choices_are_refused(option, value):
    with pytest.raises(InputError, match=option):
        ModelConfig(**{option: value})


def test_low_rank_head_predicts_in_the_span_of_the_training_expression(graph, be, pg):
    assert ModelConfig().gene_rank == 10  # hgc's default head
    with pytest.raises(InputError, match="no gene basis: call SpaHGC.fit_gene_basis"):
        _model(graph, be, fit_basis=False, gene_rank=3)(pg)
    model = _model(graph, be, fit_basis=False, gene_rank=3)
    y = torch.as_tensor(graph.ref_y)
    model.fit_gene_basis(y)
    axes, mean = model.head.gene_axes, model.head.gene_mean
    assert axes.shape == (3, graph.n_genes)
    torch.testing.assert_close(axes @ axes.T, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal axes
    torch.testing.assert_close(mean, y.mean(0))
    pred = model(pg).detach()
    centred = pred - mean
    torch.testing.assert_close(centred @ axes.T @ axes, centred, atol=1e-4, rtol=0)
    # the basis travels in the checkpoint
    twin = _model(graph, be, fit_basis=False, gene_rank=3)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(pg), model(pg))
    # a rank at or above the number of genes is the full rank
    full = _model(graph, be, gene_rank=graph.n_genes)
    assert not full.head.low_rank and full.head.out.out_features == graph.n_genes
    with pytest.raises(InputError, match="gene_rank"):
        ModelConfig(gene_rank=0)


def test_supervised_terms_ignore_held_out_rows(graph, be, pg):
    model = _model(graph, be)
    rows = torch.zeros(graph.n_spot, dtype=torch.bool)
    rows[: graph.n_spot // 2] = True
    _, a = model.training_loss(pg, _gen(3), rows=rows)
    other = graph.spot_y.copy()
    other[graph.n_spot // 2 :] += 5.0  # change only the held-out spots' expression
    _, b = model.training_loss(be.prepare(dataclasses.replace(graph, spot_y=other)), _gen(3), rows=rows)
    assert a == b
    _, c = model.training_loss(pg, _gen(3))
    assert c["mse"] != a["mse"]


def test_stored_configs_without_newer_options_rebuild_the_network_they_described():
    from hgc.nn.config import BEFORE_OPTION

    old = {k: v for k, v in ModelConfig(hidden=64).to_dict().items() if k not in BEFORE_OPTION}
    cfg = ModelConfig.from_stored(old)
    assert cfg.hidden == 64 and all(getattr(cfg, k) == v for k, v in BEFORE_OPTION.items())
    assert ModelConfig.from_stored({**old, "head": "published"}).head == "published"  # stored values win
    with pytest.raises(InputError, match="unknown options"):
        ModelConfig.from_stored({**old, "heads_per_layer": 2})


@pytest.mark.parametrize("preset", ["hgc", "hgc-0.1"])  # dropout on the input only / after every layer too
def test_checkpointed_layers_change_no_number(graph, be, pg, preset):
    """Recomputing each layer in the backward pass replays its dropout masks: the same loss, the
    same gradients, and the generator left where the plain step leaves it."""
    def step(checkpoint: bool):
        model = _model(graph, be, **{**PRESETS[preset].model, "checkpoint_layers": checkpoint, "attention_dropout": 0.1})
        gen = _gen(3)
        loss, parts = model.training_loss(pg, gen)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return parts, grads, torch.rand(4, generator=gen)

    (p1, g1, after1), (p2, g2, after2) = step(False), step(True)
    assert p1 == pytest.approx(p2, rel=1e-6) and g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(after1, after2)
