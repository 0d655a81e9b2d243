"""SpaHGC's building blocks, written once against the :class:`~hgc.nn.backend.Backend` seam.

Per layer and node type ``t``::

    out_t = lin_self_t(h_t) + mean over relations r into t of msg_r
    h_t   = LeakyReLU(out_t)            (optionally: dropout, a residual and a post-LayerNorm)

``msg_near = lin_near(mean of spot neighbours)``, ``msg_close = lin_close(mean of ref neighbours)``
(SAGE-style), ``msg_refer`` = multi-head cross attention of each spot over the references it retrieved
(keys/values from the refs' ``[hidden, expression]``, per-destination softmax), and
``msg_rev_refer`` = attention of each reference over the spots that retrieved it. Averaging per-
relation SAGE outputs that each carry their own root weight equals one shared root weight per node
type plus the mean of the neighbour messages, which is what is computed (fewer parameters, same
function class).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .backend import Backend, PreparedGraph, reverse_key

if TYPE_CHECKING:
    from .model import ModelConfig

Dropout = Callable[[torch.Tensor], torch.Tensor]


def no_dropout(x: torch.Tensor) -> torch.Tensor:
    return x


ATTENTION_LOGITS = ("scaled", "leaky")


class CrossAttention(nn.Module):
    """Multi-head attention of destination queries over their in-edges' source keys/values.

    ``logits="scaled"``: softmax of ``q.k / sqrt(d)`` (transformer form); ``"leaky"``: of
    ``LeakyReLU(q.k / sqrt(d))`` (GAT-like, the published code's form).
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


class RelationalLayer(nn.Module):
    """One heterogeneous message-passing layer over the relations of ``cfg``.

    ``expr_dim`` is the width of the references' expression input to the ``refer`` attention:
    the genes (``cfg.expression="raw"``) or the hidden size (``"embedded"``, then LayerNorm-ed
    per layer, as the published code does).
    """

    def __init__(self, cfg: "ModelConfig", expr_dim: int) -> None:
        super().__init__()
        hidden, heads, relations = cfg.hidden, cfg.heads, cfg.relations
        self.relations = relations
        self.residual = cfg.residual
        self.self_lin = nn.ModuleDict({t: nn.Linear(hidden, hidden) for t in ("spot", "ref")})
        self.neigh = nn.ModuleDict({r: nn.Linear(hidden, hidden) for r in ("near", "close") if r in relations})
        if "refer" in relations:
            kv = hidden + expr_dim
            self.refer = CrossAttention(hidden, kv, hidden, heads, cfg.attention_logits, cfg.negative_slope)
            self.refer_rev = CrossAttention(kv, hidden, hidden, heads, cfg.attention_logits, cfg.negative_slope)
            self.expr_norm = nn.LayerNorm(expr_dim) if cfg.expression == "embedded" else nn.Identity()
        self.act = nn.LeakyReLU(cfg.negative_slope)
        self.norm = nn.ModuleDict(
            {t: nn.LayerNorm(hidden) if cfg.layer_norm else nn.Identity() for t in ("spot", "ref")}
        )

    def forward(
        self,
        backend: Backend,
        g: PreparedGraph,
        h: dict[str, torch.Tensor],
        ref_y: torch.Tensor,
        dropout: Dropout = no_dropout,
        attention_dropout: Dropout = no_dropout,
    ) -> dict[str, torch.Tensor]:
        msgs: dict[str, list[torch.Tensor]] = {"spot": [], "ref": []}
        if "near" in self.relations:
            msgs["spot"].append(self.neigh["near"](backend.mean(g.ops["near"], h["spot"])))
        if "close" in self.relations:
            msgs["ref"].append(self.neigh["close"](backend.mean(g.ops["close"], h["ref"])))
        if "refer" in self.relations:
            ref_kv = torch.cat([h["ref"], self.expr_norm(ref_y)], dim=1)
            msgs["spot"].append(self.refer(backend, g.ops["refer"], h["spot"], ref_kv, attention_dropout))
            msgs["ref"].append(
                self.refer_rev(backend, g.ops[reverse_key("refer")], ref_kv, h["spot"], attention_dropout)
            )
        out = {}
        for t, hs in h.items():
            z = self.self_lin[t](hs)
            if msgs[t]:
                z = z + torch.stack(msgs[t]).mean(0)
            z = dropout(self.act(z))
            out[t] = self.norm[t](hs + z if self.residual else z)
        return out


INPUT_BLOCKS = ("linear", "mlp")
EXPRESSION_INPUTS = ("raw", "embedded")


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


class Encoder(nn.Module):
    """Input maps (linear, or :class:`InputMLP`), mask tokens and the stack of relational layers (online or EMA target)."""

    def __init__(self, cfg: "ModelConfig", spot_dim: int, ref_dim: int, n_genes: int) -> None:
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
            h = layer(backend, g, h, ref_y, layer_dropout, attention_dropout)
        return h, ref_y


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Node masks (n,) replace rows by the mask token; feature masks (n, d) zero entries."""
    if mask.dim() == 1:
        return torch.where(mask.unsqueeze(1), token, x)
    return x.masked_fill(mask, 0.0)


HEADS = ("hgc", "published")


class Head(nn.Module):
    """Attention pooling of each spot over its retrieved references plus a linear skip -> genes.

    ``"hgc"``: ``genes = out(LeakyReLU(skip(h_spot) + pool(h_spot over [h_ref, y_ref])))``; the
    nonlinearity keeps the skip path from collapsing into the output layer. ``"published"``:
    ``t = skip(h_spot)``, ``genes = out(t + pool(t over h_ref))`` (references' hidden states only).
    Without ``refer`` (an ablation) only the skip path remains. With ``cfg.gene_rank`` r the last
    map is low-rank: ``genes = mean + out(z) @ axes``, with the mean and the r leading principal
    axes of the training expression (:meth:`fit_gene_basis`, kept as buffers in the checkpoint).
    """

    def __init__(self, cfg: "ModelConfig", n_genes: int, expr_dim: int) -> None:
        super().__init__()
        hidden, self.kind = cfg.hidden, cfg.head
        rank = cfg.gene_rank if cfg.gene_rank is not None and cfg.gene_rank < n_genes else None  # else: full rank
        kv = hidden + expr_dim if self.kind == "hgc" else hidden
        use_refer = "refer" in cfg.relations
        self.pool = CrossAttention(hidden, kv, hidden, cfg.heads, cfg.attention_logits, cfg.negative_slope) if use_refer else None
        self.skip = nn.Linear(hidden, hidden)
        self.act = nn.LeakyReLU(cfg.negative_slope)
        self.out = nn.Linear(hidden, rank or n_genes)
        self.low_rank = rank is not None
        self.basis_fitted = not self.low_rank  # a low-rank output needs its basis: fitted or loaded
        if self.low_rank:
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
                z = z + self.pool(backend, g.ops["refer"], z, h["ref"])
        else:
            z = self.skip(h["spot"])
            if self.pool is not None:
                z = z + self.pool(backend, g.ops["refer"], h["spot"], torch.cat([h["ref"], ref_y], dim=1))
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
