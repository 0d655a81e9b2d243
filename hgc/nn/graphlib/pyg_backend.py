"""PyTorch Geometric implementation of the backend seam: index gathers and ``scatter``.

The two attention kernels (:meth:`PyGBackend.dot`, :meth:`PyGBackend.weighted_sum`) are fused by
hand, as DGL's SDDMM / SpMM are: they run over chunks of edges and keep only node-level tensors
for the backward pass, which gathers again chunk by chunk. Gathering every edge's keys, queries
and values at once would hold three (edges, hidden) tensors per attention and layer — most of a
large slide's training memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...graph.record import relation
from .base import Backend, reverse_key
from .convert import GraphTensors, pyg_from_tensors

#: Elements of one chunk's gathered (edges, heads, head_dim) tensor in the fused kernels (64 MiB of float32).
EDGE_CHUNK_ELEMENTS = 1 << 24


def _chunks(n_edges: int, width: int) -> list[slice]:
    step = max(1, EDGE_CHUNK_ELEMENTS // max(1, width))
    return [slice(s, s + step) for s in range(0, n_edges, step)]


class _EdgeDot(torch.autograd.Function):
    """Per edge and head ``k[src] . q[dst]`` (edges, heads), from (n, heads, head_dim) inputs."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, q: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        out = k.new_empty((src.shape[0], k.shape[1]))
        for e in _chunks(src.shape[0], math.prod(k.shape[1:])):
            out[e] = (k[src[e]] * q[dst[e]]).sum(-1)
        ctx.save_for_backward(k, q, src, dst)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        k, q, src, dst = ctx.saved_tensors
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[0] else None
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[1] else None
        for e in _chunks(src.shape[0], math.prod(k.shape[1:])):
            g = grad[e].unsqueeze(-1)
            if grad_k is not None:
                grad_k.index_add_(0, src[e], g * q[dst[e]])
            if grad_q is not None:
                grad_q.index_add_(0, dst[e], g * k[src[e]])
        return grad_k, grad_q, None, None


class _EdgeWeightedSum(torch.autograd.Function):
    """Per destination, the sum over its in-edges of ``a[edge] * v[src]`` (n_dst, heads, head_dim)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, a: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n_dst: int
                ) -> torch.Tensor:
        out = v.new_zeros((n_dst, *v.shape[1:]))
        for e in _chunks(src.shape[0], math.prod(v.shape[1:])):
            out.index_add_(0, dst[e], v[src[e]] * a[e].unsqueeze(-1))
        ctx.save_for_backward(v, a, src, dst)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        v, a, src, dst = ctx.saved_tensors
        grad_v = torch.zeros_like(v) if ctx.needs_input_grad[0] else None
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[1] else None
        for e in _chunks(src.shape[0], math.prod(v.shape[1:])):
            g = grad[dst[e]]
            if grad_v is not None:
                grad_v.index_add_(0, src[e], g * a[e].unsqueeze(-1))
            if grad_a is not None:
                grad_a[e] = (g * v[src[e]]).sum(-1)
        return grad_v, grad_a, None, None, None


@dataclass(frozen=True)
class _Rel:
    src: torch.Tensor  # (E,) int64
    dst: torch.Tensor  # (E,) int64
    n_dst: int


class PyGBackend(Backend):
    name = "pyg"

    def __init__(self) -> None:
        from torch_geometric.utils import scatter, softmax

        self._scatter = scatter
        self._softmax = softmax

    def _build(self, name: str, t: GraphTensors) -> tuple[Any, dict[str, Any]]:
        data = pyg_from_tensors(t)
        ops: dict[str, Any] = {}
        for r in t.edge_index:
            src_t, _, dst_t = relation(r).canonical
            e = data[relation(r).canonical].edge_index
            ops[r] = _Rel(e[0], e[1], t.num_nodes[dst_t])
            ops[reverse_key(r)] = _Rel(e[1], e[0], t.num_nodes[src_t])
        return data, ops

    def mean(self, op: _Rel, h_src: torch.Tensor) -> torch.Tensor:
        return self._scatter(h_src[op.src], op.dst, dim=0, dim_size=op.n_dst, reduce="mean")

    def dot(self, op: _Rel, k_src: torch.Tensor, q_dst: torch.Tensor) -> torch.Tensor:
        return _EdgeDot.apply(k_src.contiguous(), q_dst.contiguous(), op.src, op.dst)

    def softmax(self, op: _Rel, scores: torch.Tensor) -> torch.Tensor:
        return self._softmax(scores, op.dst, num_nodes=op.n_dst)

    def weighted_sum(self, op: _Rel, v_src: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return _EdgeWeightedSum.apply(v_src.contiguous(), a.to(v_src.dtype).contiguous(), op.src, op.dst, op.n_dst)
