"""Augmented views for masked graph contrastive learning, drawn from one ``torch.Generator``.

Definition (SpaHGC's "complementary random feature masks", made precise):

- **Node feature masks are complementary.** For each node type ``t`` with ratio ``r_t``, view 1
  masks a uniformly random set of exactly ``round(r_t * n_t)`` nodes and view 2 masks exactly the
  other nodes, so every node is seen unmasked by exactly one view. With SpaHGC's ratios (spot 0.1,
  ref 0.9) view 1 is image-driven (most spots visible, most references hidden) and view 2 is
  reference-driven; the agreement loss ties the two modalities together. A masked node's whole
  input row (for ``ref``: embedding *and* expression, wherever the model reads them) is replaced by
  a learned mask token of its node type.
- **Edges are dropped per relation, independently in each view**: exactly
  ``round(p_rel * E_rel)`` uniformly random edges of relation ``rel`` are removed from the library
  graph, so they carry no message in either direction (``refer`` is used both ways).
- **Or feature masks** (``unit="feature"``, the published code's form): every input entry of every
  node is masked independently with probability ``r_t`` in view 1 and view 2 masks exactly the
  other entries; masked entries are set to zero, so each node is partly seen by both views.

Random numbers come only from the generator the trainer passes (see :func:`on_device`), so a
seeded generator reproduces the views exactly under either backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .graphlib import Backend, PreparedGraph


@dataclass(eq=False)
class View:
    """One augmented view: a graph with dropped edges and the nodes whose features are masked."""

    graph: PreparedGraph
    #: node type -> (n,) bool (True: the row is replaced by the mask token) or, for feature masks,
    #: (n, d) bool (True: the entry is zeroed)
    mask: dict[str, torch.Tensor] | None


def on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator that draws on ``device``: ``generator`` itself, or one seeded from it.

    Keeps every random draw on the device of the tensors it shapes (no host-device copies per
    layer) while staying a deterministic function of the trainer's generator. ``None`` means
    torch's global generator of that device.
    """
    if generator is None or _same_device(generator.device, device):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=on_device(generator, device), device=device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.rand(shape, generator=on_device(generator, device), device=device, dtype=dtype)


def random_subset(n: int, ratio: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n,) bool with exactly ``round(ratio * n)`` uniformly random True entries."""
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    chosen[randperm(n, generator, device)[: round(ratio * n)]] = True
    return chosen


def complementary_masks(
    shapes: Mapping[str, tuple[int, int]],
    ratios: Mapping[str, float],
    generator: torch.Generator | None,
    device: torch.device,
    unit: str = "node",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """View 1 masks ``ratios[t]`` of each node type's nodes (or entries), view 2 exactly the rest.

    ``shapes[t]`` is (nodes, input features) of node type ``t``.
    """
    if unit == "node":
        m1 = {t: random_subset(shapes[t][0], ratios[t], generator, device) for t in ratios}
    else:
        m1 = {t: rand(tuple(shapes[t]), generator, device, torch.float32) < ratios[t] for t in ratios}
    return m1, {t: ~m for t, m in m1.items()}


def drop_edges(
    backend: Backend, g: PreparedGraph, ratios: Mapping[str, float], generator: torch.Generator | None
) -> PreparedGraph:
    """``g`` without ``round(ratios[rel] * E_rel)`` random edges of each listed relation."""
    keep = {
        r: ~random_subset(g.edge_index[r].shape[1], p, generator, g.edge_index[r].device)
        for r, p in ratios.items()
        if p > 0
    }
    return backend.drop_edges(g, keep) if keep else g


def make_views(
    backend: Backend,
    g: PreparedGraph,
    mask_ratios: Mapping[str, float],
    drop_ratios: Mapping[str, float],
    generator: torch.Generator | None,
    second: bool = True,
    unit: str = "node",
) -> tuple[View, View | None]:
    """Two views of ``g``: complementary node (or feature) masks, independently dropped edges.

    With ``second=False`` (no contrast term) view 2 is not built; view 1 is drawn identically.
    """
    device = g.x["spot"].device
    n_spot, d_spot = g.x["spot"].shape
    shapes = {"spot": (n_spot, d_spot), "ref": (g.num_nodes["ref"], g.x["ref"].shape[1] + g.ref_y.shape[1])}
    m1, m2 = complementary_masks(shapes, mask_ratios, generator, device, unit)
    v1 = View(drop_edges(backend, g, drop_ratios, generator), m1)
    return v1, (View(drop_edges(backend, g, drop_ratios, generator), m2) if second else None)
