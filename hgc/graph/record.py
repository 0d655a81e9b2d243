"""The backend-neutral record of one heterogeneous graph (one target slide in one fold).

Producers (:mod:`hgc.graph.build`, :mod:`hgc.graph.store`) and consumers (:mod:`hgc.nn`,
:mod:`hgc.train`) share only this record, so graphs built once train under DGL or PyG alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Canonical edge types. Relation names are the contract between builder and model: a graph
#: carrying a relation the model does not know is an error, never a silent skip.
RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("spot", "near", "spot"),
    ("ref", "refer", "spot"),
    ("ref", "close", "ref"),
)
RELATION_NAMES: tuple[str, ...] = tuple(r[1] for r in RELATIONS)
CANONICAL: dict[str, tuple[str, str, str]] = {r[1]: r for r in RELATIONS}


@dataclass(eq=False)
class SlideGraph:
    """Nodes, features and edges of one target slide's graph.

    ``edges[name]`` is a (2, E) int64 array of (source, destination) node indices for the
    relation ``name`` (see :data:`RELATIONS` for the node types), ``edge_weight[name]`` its
    (E,) float32 weights (similarity for ``refer``/``close``, 1/distance-free ones for ``near``).
    ``spot_y`` is the target's normalised expression, known for training targets (and for test
    targets when observed, used only for evaluation).
    """

    fold: str
    target: str
    role: str  # "train" or "test"
    patient: str
    spot_x: np.ndarray  # (n, d) float32 image embeddings
    spot_coords: np.ndarray  # (n, 2) float64 pixel (x, y)
    spot_barcodes: np.ndarray  # (n,) str
    ref_x: np.ndarray  # (m, d) float32
    ref_y: np.ndarray  # (m, G) float32, normalised expression
    ref_slide: np.ndarray  # (m,) str
    ref_patient: np.ndarray  # (m,) str
    edges: dict[str, np.ndarray] = field(default_factory=dict)
    edge_weight: dict[str, np.ndarray] = field(default_factory=dict)
    spot_y: np.ndarray | None = None  # (n, G) float32
    image: str = ""  # the target's H&E file, when known
    image_scale: float = 1.0

    @property
    def n_spot(self) -> int:
        return int(self.spot_x.shape[0])

    @property
    def n_ref(self) -> int:
        return int(self.ref_x.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.ref_y.shape[1])
