"""SpaHGC's building blocks, written once against the :class:`~hgc.nn.backend.Backend` seam.

Per layer and node type ``t``::

    out_t = lin_self_t(h_t) + mean over relations r into t of msg_r
    h_t   = LayerNorm(h_t + dropout(LeakyReLU(out_t)))        (residual / norm switchable)

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
from typing import Callable

import torch
from torch import nn

from .backend import Backend, PreparedGraph, reverse_key

Dropout = Callable[[torch.Tensor], torch.Tensor]


def no_dropout(x: torch.Tensor) -> torch.Tensor:
    return x


class CrossAttention(nn.Module):
    """Multi-head attention of destination queries over their in-edges' source keys/values."""

    def __init__(self, q_dim: int, kv_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q = nn.Linear(q_dim, hidden)
        self.k = nn.Linear(kv_dim, hidden)
        self.v = nn.Linear(kv_dim, hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, backend: Backend, op: object, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        shape = (-1, self.heads, self.head_dim)
        q = self.q(q_in).view(shape)
        k = self.k(kv_in).view(shape)
        v = self.v(kv_in).view(shape)
        a = backend.softmax(op, backend.dot(op, k, q) / math.sqrt(self.head_dim))
        return self.o(backend.weighted_sum(op, v, a).reshape(q_in.shape[0], -1))


class RelationalLayer(nn.Module):
    """One heterogeneous message-passing layer over the relations it was built for."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        n_genes: int,
        relations: tuple[str, ...],
        negative_slope: float,
        residual: bool,
        layer_norm: bool,
    ) -> None:
        super().__init__()
        self.relations = relations
        self.residual = residual
        self.self_lin = nn.ModuleDict({t: nn.Linear(hidden, hidden) for t in ("spot", "ref")})
        self.neigh = nn.ModuleDict({r: nn.Linear(hidden, hidden) for r in ("near", "close") if r in relations})
        if "refer" in relations:
            self.refer = CrossAttention(hidden, hidden + n_genes, hidden, heads)
            self.refer_rev = CrossAttention(hidden + n_genes, hidden, hidden, heads)
        self.act = nn.LeakyReLU(negative_slope)
        self.norm = nn.ModuleDict(
            {t: nn.LayerNorm(hidden) if layer_norm else nn.Identity() for t in ("spot", "ref")}
        )

    def forward(
        self,
        backend: Backend,
        g: PreparedGraph,
        h: dict[str, torch.Tensor],
        ref_y: torch.Tensor,
        dropout: Dropout = no_dropout,
    ) -> dict[str, torch.Tensor]:
        msgs: dict[str, list[torch.Tensor]] = {"spot": [], "ref": []}
        if "near" in self.relations:
            msgs["spot"].append(self.neigh["near"](backend.mean(g.ops["near"], h["spot"])))
        if "close" in self.relations:
            msgs["ref"].append(self.neigh["close"](backend.mean(g.ops["close"], h["ref"])))
        if "refer" in self.relations:
            ref_kv = torch.cat([h["ref"], ref_y], dim=1)
            msgs["spot"].append(self.refer(backend, g.ops["refer"], h["spot"], ref_kv))
            msgs["ref"].append(self.refer_rev(backend, g.ops[reverse_key("refer")], ref_kv, h["spot"]))
        out = {}
        for t, hs in h.items():
            z = self.self_lin[t](hs)
            if msgs[t]:
                z = z + torch.stack(msgs[t]).mean(0)
            z = dropout(self.act(z))
            out[t] = self.norm[t](hs + z if self.residual else z)
        return out


class Encoder(nn.Module):
    """Input projections, mask tokens and the stack of relational layers (online or EMA target)."""

    def __init__(
        self,
        spot_dim: int,
        ref_dim: int,
        n_genes: int,
        hidden: int,
        layers: int,
        heads: int,
        relations: tuple[str, ...],
        negative_slope: float,
        residual: bool,
        layer_norm: bool,
    ) -> None:
        super().__init__()
        self.ref_dim = ref_dim
        self.inp = nn.ModuleDict({"spot": nn.Linear(spot_dim, hidden), "ref": nn.Linear(ref_dim + n_genes, hidden)})
        # Learned replacement rows for masked nodes (GraphMAE-style), zero-initialised.
        self.mask_token = nn.ParameterDict(
            {"spot": nn.Parameter(torch.zeros(spot_dim)), "ref": nn.Parameter(torch.zeros(ref_dim + n_genes))}
        )
        self.layers = nn.ModuleList(
            RelationalLayer(hidden, heads, n_genes, relations, negative_slope, residual, layer_norm)
            for _ in range(layers)
        )

    def forward(
        self,
        backend: Backend,
        g: PreparedGraph,
        mask: dict[str, torch.Tensor] | None = None,
        dropout: Dropout = no_dropout,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Hidden states per node type, and the (masked) ref expression the layers saw."""
        x = {"spot": g.x["spot"], "ref": torch.cat([g.x["ref"], g.ref_y], dim=1)}
        if mask is not None:
            x = {t: torch.where(mask[t].unsqueeze(1), self.mask_token[t], xt) for t, xt in x.items()}
        ref_y = x["ref"][:, self.ref_dim :]
        h = {t: dropout(self.inp[t](xt)) for t, xt in x.items()}
        for layer in self.layers:
            h = layer(backend, g, h, ref_y, dropout)
        return h, ref_y


class Head(nn.Module):
    """Attention pooling of each spot over its retrieved references plus a linear skip -> genes.

    ``genes = out(LeakyReLU(skip(h_spot) + pool(h_spot over [h_ref, y_ref])))``; the nonlinearity
    keeps the skip path from collapsing into the output layer. Without ``refer`` (an ablation)
    only the skip path remains.
    """

    def __init__(self, hidden: int, heads: int, n_genes: int, use_refer: bool, negative_slope: float) -> None:
        super().__init__()
        self.pool = CrossAttention(hidden, hidden + n_genes, hidden, heads) if use_refer else None
        self.skip = nn.Linear(hidden, hidden)
        self.act = nn.LeakyReLU(negative_slope)
        self.out = nn.Linear(hidden, n_genes)

    def forward(self, backend: Backend, g: PreparedGraph, h: dict[str, torch.Tensor], ref_y: torch.Tensor) -> torch.Tensor:
        z = self.skip(h["spot"])
        if self.pool is not None:
            z = z + self.pool(backend, g.ops["refer"], h["spot"], torch.cat([h["ref"], ref_y], dim=1))
        return self.out(self.act(z))


def mlp(d_in: int, d_hidden: int, d_out: int, negative_slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(negative_slope), nn.Linear(d_hidden, d_out))
