"""PyTorch Geometric implementation of the backend seam: index gathers and ``scatter``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...graph.record import relation
from .base import Backend, reverse_key
from .convert import GraphTensors, pyg_from_tensors


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
        return (k_src[op.src] * q_dst[op.dst]).sum(-1)

    def softmax(self, op: _Rel, scores: torch.Tensor) -> torch.Tensor:
        return self._softmax(scores, op.dst, num_nodes=op.n_dst)

    def weighted_sum(self, op: _Rel, v_src: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._scatter(v_src[op.src] * a.unsqueeze(-1), op.dst, dim=0, dim_size=op.n_dst, reduce="sum")
