"""DGL implementation of the backend seam: ``dgl.ops`` fused kernels on per-relation views."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch

from ..._optional import available
from ...errors import InputError
from ...graph.record import relation
from .base import Backend, reverse_key
from .convert import GraphTensors, dgl_from_tensors, import_dgl


class DGLBackend(Backend):
    name = "dgl"

    def __init__(self) -> None:
        self._dgl = import_dgl("the DGL graph backend")

    def _build(self, name: str, t: GraphTensors) -> tuple[Any, dict[str, Any]]:
        device = t.x["spot"].device
        if not dgl_supports(device):
            raise InputError(
                f"the installed DGL ({self._dgl.__version__}) cannot place {name} on {device} "
                "(PyPI's DGL wheels are CPU-only); use the PyG backend for GPU training"
            )
        hg = dgl_from_tensors(t, name)
        ops: dict[str, Any] = {}
        for r in t.edge_index:
            unit = hg[relation(r).canonical]  # a one-relation view sharing hg's structure
            ops[r] = unit
            ops[reverse_key(r)] = self._dgl.reverse(unit)
        return hg, ops

    def mean(self, op: Any, h_src: torch.Tensor) -> torch.Tensor:
        return self._dgl.ops.copy_u_mean(op, h_src)

    def dot(self, op: Any, k_src: torch.Tensor, q_dst: torch.Tensor) -> torch.Tensor:
        return self._dgl.ops.u_dot_v(op, k_src, q_dst).squeeze(-1)

    def softmax(self, op: Any, scores: torch.Tensor) -> torch.Tensor:
        return self._dgl.ops.edge_softmax(op, scores)

    def weighted_sum(self, op: Any, v_src: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._dgl.ops.u_mul_e_sum(op, v_src, a.unsqueeze(-1))


def dgl_available() -> bool:
    os.environ.setdefault("DGLBACKEND", "pytorch")
    return available("dgl")


def dgl_supports(device: str | torch.device) -> bool:
    """Whether the installed DGL can build graphs on ``device`` (CPU always; CUDA only in CUDA builds)."""
    device = torch.device(device)
    return device.type == "cpu" or _dgl_supports(str(device))


@lru_cache(maxsize=None)
def _dgl_supports(device: str) -> bool:
    dgl = import_dgl("the DGL graph backend")
    try:
        dgl.graph((torch.tensor([0]), torch.tensor([0])), device=device)
    except Exception:  # DGL raises its own DGLError (or a CUDA error) for an unsupported device
        return False
    return True
