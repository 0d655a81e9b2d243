"""The one seam between the SpaHGC model and a graph library (DGL or PyTorch Geometric).

The model is written once against four relational primitives. Each backend implements them with
its library's fused kernels (one scatter/gather per relation, no Python loops over nodes or
edges):

- :meth:`Backend.mean` — mean of source features over each destination's in-edges (0 if none);
- :meth:`Backend.dot` — per-edge, per-head dot product of source keys and destination queries;
- :meth:`Backend.softmax` — softmax of edge scores over each destination's in-edges;
- :meth:`Backend.weighted_sum` — per-destination sum of source values weighted per edge and head.

Operands are looked up by relation key: the relation name (``"near"``, ``"refer"``, ``"close"``)
for its canonical direction, :func:`reverse_key` of it for the reverse (``refer`` is used both ways).
A :class:`PreparedGraph` holds the library graph and these operands, built once per graph by
:meth:`Backend.prepare` (and once per augmented view by :meth:`Backend.drop_edges`), not per layer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch

from ...errors import InputError
from ...graph.record import SlideGraph
from .convert import GraphTensors, graph_tensors


def reverse_key(relation: str) -> str:
    """Operand key of ``relation`` traversed from destination to source."""
    return f"rev_{relation}"


@dataclass(eq=False)
class PreparedGraph:
    """One graph ready for the model under one backend: tensors, library graph, operands."""

    backend: str
    name: str  # "slide 'X' (fold 'F')", for error messages
    tensors: GraphTensors
    graph: Any  # the library's own graph object (DGLHeteroGraph or HeteroData)
    ops: dict[str, Any]  # relation key -> backend operand (see module docstring)

    @property
    def relations(self) -> tuple[str, ...]:
        return tuple(self.tensors.edge_index)

    @property
    def x(self) -> dict[str, torch.Tensor]:
        return self.tensors.x

    @property
    def ref_y(self) -> torch.Tensor:
        return self.tensors.y["ref"]

    @property
    def spot_y(self) -> torch.Tensor | None:
        return self.tensors.y.get("spot")

    @property
    def num_nodes(self) -> dict[str, int]:
        return self.tensors.num_nodes

    @property
    def edge_index(self) -> dict[str, torch.Tensor]:
        return self.tensors.edge_index


class Backend(ABC):
    """Relational message passing on a :class:`PreparedGraph`; see the module docstring."""

    name: ClassVar[str]

    # Backends are stateless singletons in effect: copies and pickles of a model share them.
    def __deepcopy__(self, memo: dict) -> "Backend":
        return self

    def __reduce__(self) -> tuple:
        return (type(self), ())

    def prepare(
        self, g: SlideGraph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> PreparedGraph:
        """Check ``g``, move it to ``device`` and build the library graph once."""
        name = f"slide '{g.target}' (fold '{g.fold}')"
        return self._assemble(name, graph_tensors(g, device, dtype))

    def drop_edges(self, pg: PreparedGraph, keep: Mapping[str, torch.Tensor]) -> PreparedGraph:
        """The same graph keeping only the edges where ``keep[relation]`` (bool (E,)) is true.

        Relations not in ``keep`` keep all their edges. Dropped edges are gone from the library
        graph, so they carry no message in either direction.
        """
        unknown = set(keep) - set(pg.relations)
        if unknown:
            raise InputError(f"cannot drop edges of relations {sorted(unknown)}: {pg.name} has {list(pg.relations)}")
        t = pg.tensors
        t = replace(
            t,
            edge_index={r: e[:, keep[r]] if r in keep else e for r, e in t.edge_index.items()},
            edge_weight={r: w[keep[r]] if r in keep else w for r, w in t.edge_weight.items()},
        )
        return self._assemble(pg.name, t)

    def _assemble(self, name: str, t: GraphTensors) -> PreparedGraph:
        graph, ops = self._build(name, t)
        return PreparedGraph(self.name, name, t, graph, ops)

    @abstractmethod
    def _build(self, name: str, t: GraphTensors) -> tuple[Any, dict[str, Any]]:
        """The library graph around ``t`` and the operand of every relation key."""

    @abstractmethod
    def mean(self, op: Any, h_src: torch.Tensor) -> torch.Tensor:
        """(n_dst, ...) mean of ``h_src`` rows over each destination's in-edges (0 if none)."""

    @abstractmethod
    def dot(self, op: Any, k_src: torch.Tensor, q_dst: torch.Tensor) -> torch.Tensor:
        """(E, H) dot products of (n_src, H, D) keys and (n_dst, H, D) queries along each edge."""

    @abstractmethod
    def softmax(self, op: Any, scores: torch.Tensor) -> torch.Tensor:
        """(E, H) softmax of edge scores over the in-edges of each destination."""

    @abstractmethod
    def weighted_sum(self, op: Any, v_src: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(n_dst, H, D) sum over in-edges of (n_src, H, D) values times (E, H) weights."""
