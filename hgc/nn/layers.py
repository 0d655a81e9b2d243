"""SpaHGC's building blocks, written once against the :class:`~hgc.nn.graphlib.Backend` seam.

Per layer and node type ``t``::

    out_t = lin_self_t(h_t) + mean over the messages into t
    h_t   = LeakyReLU(out_t)            (optionally: dropout, a residual and a post-LayerNorm)

Each relation of the table (:data:`hgc.graph.record.RELATIONS`) gets the message module of its
kind (:data:`RELATION_KINDS`), like PyG's ``HeteroConv`` / DGL's ``HeteroGraphConv``: ``mean``
relations (``near``, ``close``) send ``lin_r(mean of source states)`` (SAGE-style) to their
destinations; ``attention`` relations (``refer``) send multi-head cross attention of each
destination over its sources and of each source back over its destinations. Nodes that know their
expression (references) attend with ``[hidden, expression]`` (the expression embedded and
LayerNorm-ed per layer, as the published code does). :func:`group_by_destination` collects the
messages per node type. Averaging per-relation SAGE outputs that each carry their own root weight
equals one shared root weight per node type plus the mean of the neighbour messages, which is what
is computed (fewer parameters, same function class).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..graph.record import NODE_TYPES, RETRIEVAL, Relation, relation
from .config import ModelConfig
from .graphlib import Backend, PreparedGraph, reverse_key
from .masking import rand

Dropout = Callable[[torch.Tensor], torch.Tensor]


def no_dropout(x: torch.Tensor) -> torch.Tensor:
    return x


class RandomDropout:
    """Dropout with rate ``p`` whose masks come from ``generator`` (None: torch's global one), so a
    seed fixes them and a layer run again for checkpointing can replay them."""

    def __init__(self, generator: torch.Generator | None, p: float) -> None:
        self.generator, self.p = generator, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        keep = rand(tuple(x.shape), self.generator, x.device, x.dtype) >= self.p
        return x * keep / (1 - self.p)


def checkpointed(layer: nn.Module, dropouts: Iterable[Dropout], *args: object) -> dict[str, torch.Tensor]:
    """``layer(*args)`` keeping only its inputs for the backward pass, which runs it again.

    The rerun draws the same dropout masks: the dropouts' generators are set back to their state
    at the first run and afterwards returned to where they were, so checkpointing changes memory
    and time, not a single number.
    """
    from torch.utils.checkpoint import checkpoint

    generators = list({id(d.generator): d.generator for d in dropouts
                       if isinstance(d, RandomDropout) and d.generator is not None}.values())
    start = [g.get_state() for g in generators]
    runs = 0

    def run(*inputs):
        nonlocal runs
        runs += 1
        if runs == 1:
            return layer(*inputs)
        now = [g.get_state() for g in generators]
        for g, state in zip(generators, start):
            g.set_state(state)
        try:
            return layer(*inputs)
        finally:
            for g, state in zip(generators, now):
                g.set_state(state)

    return checkpoint(run, *args, use_reentrant=False)


class CrossAttention(nn.Module):
    """Multi-head attention of destination queries over their in-edges' source keys/values.

    Parameters
    ----------
    q_dim, kv_dim : int
        Widths of the destinations' query input and the sources' key/value input.
    hidden : int
        Output width (``heads`` heads of ``hidden // heads``).
    logits : {"scaled", "leaky"}
        Softmax of ``q.k / sqrt(d)`` (transformer form) or of ``LeakyReLU(q.k / sqrt(d))``
        (GAT-like, the published code's form), per destination over its in-edges.

    Shapes
    ------
    ``q_in`` (n_dst, q_dim), ``kv_in`` (n_src, kv_dim) -> (n_dst, hidden); a destination
    without in-edges gets ``o(0)``.
    """

    def __init__(
        self, q_dim: int, kv_dim: int, hidden: int, heads: int, logits: str = "scaled", negative_slope: float = 0.2
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.leaky = negative_slope if logits == "leaky" else None
        self.q = nn.Linear(q_dim, hidden)
        self.k = nn.Linear(kv_dim, hidden)
        self.v = nn.Linear(kv_dim, hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(
        self, backend: Backend, op: object, q_in: torch.Tensor, kv_in: torch.Tensor, dropout: Dropout = no_dropout
    ) -> torch.Tensor:
        """(n_dst, hidden); ``dropout`` acts on the attention weights."""
        shape = (-1, self.heads, self.head_dim)
        q = self.q(q_in).view(shape)
        k = self.k(kv_in).view(shape)
        v = self.v(kv_in).view(shape)
        scores = backend.dot(op, k, q) / math.sqrt(self.head_dim)
        if self.leaky is not None:
            scores = F.leaky_relu(scores, self.leaky)
        a = dropout(backend.softmax(op, scores))
        return self.o(backend.weighted_sum(op, v, a).reshape(q_in.shape[0], -1))


#: Node types whose attention inputs carry their expression beside their hidden state.
EXPRESSION_NODES = ("ref",)

Messages = Iterable[tuple[str, torch.Tensor]]  # (destination node type, (n_dst, hidden) message)


class MeanMessages(nn.Module):
    """``kind="mean"``: ``lin(mean of the sources' states)`` to each destination (0 without in-edges).

    Shapes
    ------
    ``h[rel.src]`` (n_src, hidden) -> one message (n_dst, hidden) for ``rel.dst``.
    """

    def __init__(self, rel: Relation, hidden: int, widths: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.rel = rel
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, backend: Backend, g: PreparedGraph, h: dict[str, torch.Tensor],
                att_in: dict[str, torch.Tensor], attention_dropout: Dropout) -> Messages:
        yield self.rel.dst, self.lin(backend.mean(g.ops[self.rel.name], h[self.rel.src]))


class AttentionMessages(nn.Module):
    """``kind="attention"``: cross attention of destinations over their sources (``forward_attn``)
    and, over the same edges reversed, of sources over their destinations (``reverse_attn``).

    Shapes
    ------
    ``att_in[t]`` (n_t, widths[t]) for both ends -> messages (n_dst, hidden) for ``rel.dst`` and
    (n_src, hidden) for ``rel.src``.
    """

    def __init__(self, rel: Relation, hidden: int, widths: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.rel = rel
        src, dst = widths[rel.src], widths[rel.dst]
        self.forward_attn = CrossAttention(dst, src, hidden, cfg.heads, cfg.attention_logits, cfg.negative_slope)
        self.reverse_attn = CrossAttention(src, dst, hidden, cfg.heads, cfg.attention_logits, cfg.negative_slope)

    def forward(self, backend: Backend, g: PreparedGraph, h: dict[str, torch.Tensor],
                att_in: dict[str, torch.Tensor], attention_dropout: Dropout) -> Messages:
        r = self.rel
        yield r.dst, self.forward_attn(backend, g.ops[r.name], att_in[r.dst], att_in[r.src], attention_dropout)
        yield r.src, self.reverse_attn(backend, g.ops[reverse_key(r.name)], att_in[r.src], att_in[r.dst],
                                       attention_dropout)


#: The message module of each relation kind (:data:`hgc.graph.record.KINDS`).
RELATION_KINDS: dict[str, type[nn.Module]] = {"mean": MeanMessages, "attention": AttentionMessages}


def group_by_destination(messages: Messages) -> dict[str, list[torch.Tensor]]:
    """Messages collected per destination node type (every node type present, maybe empty)."""
    grouped: dict[str, list[torch.Tensor]] = {t: [] for t in NODE_TYPES}
    for t, m in messages:
        grouped[t].append(m)
    return grouped


class RelationalLayer(nn.Module):
    """One heterogeneous message-passing layer over the relations of ``cfg``, one module each.

    Parameters
    ----------
    cfg : ModelConfig
        Sizes, the relations (each gets the module of its kind, :data:`RELATION_KINDS`), and the
        residual / LayerNorm / activation choices.
    expr_dim : int
        Width of the references' expression input to the attention relations: the genes
        (``cfg.expression="raw"``) or the hidden size (``"embedded"``, then LayerNorm-ed per
        layer, as the published code does).

    Shapes
    ------
    ``h[t]`` (n_t, hidden) per node type and ``ref_y`` (n_ref, expr_dim) -> ``h[t]`` (n_t, hidden).
    """

    def __init__(self, cfg: ModelConfig, expr_dim: int) -> None:
        super().__init__()
        hidden = cfg.hidden
        self.residual = cfg.residual
        # mean relations first: the parameter order of hgc <= 0.2, so a seed still initialises the same network
        rels = sorted((relation(r) for r in cfg.relations), key=lambda r: r.kind != "mean")
        self.self_lin = nn.ModuleDict({t: nn.Linear(hidden, hidden) for t in NODE_TYPES})
        widths = {t: hidden + expr_dim if t in EXPRESSION_NODES else hidden for t in NODE_TYPES}
        self.convs = nn.ModuleDict({r.name: RELATION_KINDS[r.kind](r, hidden, widths, cfg) for r in rels})
        self.attends = any(r.kind == "attention" for r in rels)
        if self.attends:
            self.expr_norm = nn.LayerNorm(expr_dim) if cfg.expression == "embedded" else nn.Identity()
        self.act = nn.LeakyReLU(cfg.negative_slope)
        self.norm = nn.ModuleDict(
            {t: nn.LayerNorm(hidden) if cfg.layer_norm else nn.Identity() for t in NODE_TYPES}
        )
        self._register_load_state_dict_pre_hook(_rename_before_relation_table)

    def forward(
        self,
        backend: Backend,
        g: PreparedGraph,
        h: dict[str, torch.Tensor],
        ref_y: torch.Tensor,
        dropout: Dropout = no_dropout,
        attention_dropout: Dropout = no_dropout,
    ) -> dict[str, torch.Tensor]:
        att_in = h
        if self.attends:
            att_in = {t: torch.cat([h[t], self.expr_norm(ref_y)], dim=1) if t in EXPRESSION_NODES else h[t]
                      for t in h}
        msgs = group_by_destination(m for conv in self.convs.values()
                                    for m in conv(backend, g, h, att_in, attention_dropout))
        out = {}
        for t, hs in h.items():
            z = self.self_lin[t](hs)
            if msgs[t]:
                z = z + torch.stack(msgs[t]).mean(0)
            z = dropout(self.act(z))
            out[t] = self.norm[t](hs + z if self.residual else z)
        return out


#: Parameter names of layers saved before the relation table (hgc <= 0.2): one prefix each.
_OLD_PREFIXES = (("neigh.near.", "convs.near.lin."), ("neigh.close.", "convs.close.lin."),
                 ("refer_rev.", "convs.refer.reverse_attn."), ("refer.", "convs.refer.forward_attn."))


def _rename_before_relation_table(state_dict: dict, prefix: str, *args) -> None:
    """Let checkpoints written before the relation table load into today's layer."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _OLD_PREFIXES:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


class InputMLP(nn.Module):
    """The published code's input block: ``Linear -> LeakyReLU -> dropout -> Linear -> LayerNorm -> LeakyReLU``."""

    def __init__(self, d_in: int, hidden: int, negative_slope: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, hidden, bias=False)
        self.lin2 = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor, dropout: Dropout) -> torch.Tensor:
        return self.act(self.norm(self.lin2(dropout(self.act(self.lin(x))))))


class GraphEncoder(nn.Module):
    """Input maps (linear, or :class:`InputMLP`), mask tokens and the stack of relational layers
    (the online encoder, or BGRL's EMA target).

    Shapes
    ------
    ``g.x["spot"]`` (n_spot, spot_dim), ``g.x["ref"]`` (n_ref, ref_dim) and ``g.ref_y``
    (n_ref, n_genes), with optional masks -> hidden states ``h[t]`` (n_t, hidden) and the
    references' expression as the layers saw it (n_ref, expr_dim).
    """

    def __init__(self, cfg: ModelConfig, spot_dim: int, ref_dim: int, n_genes: int) -> None:
        super().__init__()
        hidden = cfg.hidden
        self.ref_dim = ref_dim
        self.dropout_layers = cfg.dropout_layers
        dims = {"spot": spot_dim, "ref": ref_dim + n_genes}
        self.inp = nn.ModuleDict({
            t: nn.Linear(d, hidden) if cfg.input_block == "linear" else InputMLP(d, hidden, cfg.negative_slope)
            for t, d in dims.items()
        })
        # Learned replacement rows for masked nodes (GraphMAE-style), zero-initialised; feature
        # masks zero the masked entries instead.
        self.mask_token = nn.ParameterDict(
            {"spot": nn.Parameter(torch.zeros(spot_dim)), "ref": nn.Parameter(torch.zeros(ref_dim + n_genes))}
        )
        self.expr = nn.Linear(n_genes, hidden, bias=False) if cfg.expression == "embedded" else None
        self.expr_dim = hidden if self.expr is not None else n_genes
        self.layers = nn.ModuleList(RelationalLayer(cfg, self.expr_dim) for _ in range(cfg.layers))
        self.checkpoint_layers = cfg.checkpoint_layers

    def forward(
        self,
        backend: Backend,
        g: PreparedGraph,
        mask: dict[str, torch.Tensor] | None = None,
        dropout: Dropout = no_dropout,
        attention_dropout: Dropout = no_dropout,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Hidden states per node type, and the (masked, maybe embedded) ref expression the layers saw."""
        x = {"spot": g.x["spot"], "ref": torch.cat([g.x["ref"], g.ref_y], dim=1)}
        if mask is not None:
            x = {t: _apply_mask(xt, mask[t], self.mask_token[t]) for t, xt in x.items()}
        ref_y = x["ref"][:, self.ref_dim :]
        if self.expr is not None:
            ref_y = self.expr(ref_y)
        h = {t: self.inp[t](xt, dropout) if isinstance(self.inp[t], InputMLP) else dropout(self.inp[t](xt))
             for t, xt in x.items()}
        layer_dropout = dropout if self.dropout_layers else no_dropout
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                h = checkpointed(layer, (layer_dropout, attention_dropout), backend, g, h, ref_y, layer_dropout,
                                 attention_dropout)
            else:
                h = layer(backend, g, h, ref_y, layer_dropout, attention_dropout)
        return h, ref_y


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Node masks (n,) replace rows by the mask token; feature masks (n, d) zero entries."""
    if mask.dim() == 1:
        return torch.where(mask.unsqueeze(1), token, x)
    return x.masked_fill(mask, 0.0)


class Head(nn.Module):
    """Attention pooling of each spot over its retrieved references plus a linear skip -> genes.

    ``"hgc"``: ``genes = out(LeakyReLU(skip(h_spot) + pool(h_spot over [h_ref, y_ref])))``; the
    nonlinearity keeps the skip path from collapsing into the output layer. ``"published"``:
    ``t = skip(h_spot)``, ``genes = out(t + pool(t over h_ref))`` (references' hidden states only).
    Without the retrieval relation ``refer`` (an ablation) only the skip path remains. With
    ``cfg.gene_rank`` r the last map is low-rank: ``genes = mean + out(z) @ axes``, with the mean and the r leading principal
    axes of the training expression (:meth:`fit_gene_basis`, kept as buffers in the checkpoint).

    Shapes
    ------
    ``h[t]`` (n_t, hidden), ``ref_y`` (n_ref, expr_dim) -> (n_spot, n_genes).
    """

    def __init__(self, cfg: ModelConfig, n_genes: int, expr_dim: int) -> None:
        super().__init__()
        hidden, self.kind = cfg.hidden, cfg.head
        rank = cfg.gene_rank if cfg.gene_rank is not None and cfg.gene_rank < n_genes else None  # else: full rank
        kv = hidden + expr_dim if self.kind == "hgc" else hidden
        pools = RETRIEVAL in cfg.relations
        self.pool = CrossAttention(hidden, kv, hidden, cfg.heads, cfg.attention_logits, cfg.negative_slope) if pools else None
        self.skip = nn.Linear(hidden, hidden)
        self.act = nn.LeakyReLU(cfg.negative_slope)
        self.out = nn.Linear(hidden, rank or n_genes)
        self.low_rank = rank is not None
        self.basis_fitted = not self.low_rank  # a low-rank output needs its basis: fitted or loaded
        if rank is not None:
            self.register_buffer("gene_mean", torch.zeros(n_genes))
            self.register_buffer("gene_axes", torch.zeros(rank, n_genes))
            self.register_load_state_dict_post_hook(Head._basis_loaded)

    @staticmethod
    def _basis_loaded(module: "Head", incompatible) -> None:
        missing = {k.rsplit(".", 1)[-1] for k in incompatible.missing_keys}
        module.basis_fitted = module.basis_fitted or not missing & {"gene_mean", "gene_axes"}

    @torch.no_grad()
    def fit_gene_basis(self, y: torch.Tensor) -> None:
        """Set the low-rank output's mean and axes from training expression ``y`` (spots x genes)."""
        mean = y.mean(0)
        _, _, vh = torch.linalg.svd((y - mean).double(), full_matrices=False)
        self.gene_mean.copy_(mean)
        self.gene_axes.copy_(vh[: self.gene_axes.shape[0]])
        self.basis_fitted = True

    def forward(self, backend: Backend, g: PreparedGraph, h: dict[str, torch.Tensor], ref_y: torch.Tensor) -> torch.Tensor:
        if self.kind == "published":
            z = self.skip(h["spot"])
            if self.pool is not None:
                z = z + self.pool(backend, g.ops[RETRIEVAL], z, h["ref"])
        else:
            z = self.skip(h["spot"])
            if self.pool is not None:
                z = z + self.pool(backend, g.ops[RETRIEVAL], h["spot"], torch.cat([h["ref"], ref_y], dim=1))
            z = self.act(z)
        out = self.out(z)
        if not self.low_rank:
            return out
        if not self.basis_fitted:
            raise InputError(f"the model's low-rank gene head (gene_rank {self.gene_axes.shape[0]}) has no gene basis: "
                             "call SpaHGC.fit_gene_basis(training expression) before using it, or load a checkpoint")
        return self.gene_mean + out @ self.gene_axes


def mlp(d_in: int, d_hidden: int, d_out: int, negative_slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(negative_slope), nn.Linear(d_hidden, d_out))
