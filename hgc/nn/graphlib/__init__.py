"""The graph-library seam in one place: SpaHGC's four relational primitives (:mod:`.base`), their
DGL and PyG implementations (:mod:`.dgl_backend`, :mod:`.pyg_backend`), the conversion of a
backend-neutral :class:`~hgc.graph.record.SlideGraph` into either library's graph
(:mod:`.convert`), and :func:`get_backend`, which picks one. Nothing outside :mod:`hgc.nn` imports
DGL or PyG.
"""
from __future__ import annotations

import logging

import torch

from ..._optional import require
from ..config import check_backend
from .base import Backend, PreparedGraph, reverse_key
from .convert import import_dgl
from .dgl_backend import DGLBackend, dgl_available, dgl_supports
from .pyg_backend import PyGBackend

log = logging.getLogger(__name__)

__all__ = ["Backend", "PreparedGraph", "dgl_supports", "get_backend", "reverse_key"]


def get_backend(name: str = "auto", device: str | torch.device | None = None) -> Backend:
    """The backend called ``name``; ``auto`` is DGL when it imports (and, if ``device`` is given,
    can place graphs there: PyPI's DGL wheels are CPU-only), else PyG."""
    check_backend(name)
    if name == "auto":
        name = "dgl" if dgl_available() and (device is None or dgl_supports(device)) else "pyg"
        log.debug("graph backend auto -> %s", name)
    if name == "dgl":
        import_dgl("the DGL graph backend")
        return DGLBackend()
    require("torch_geometric", "the PyG graph backend")
    return PyGBackend()
