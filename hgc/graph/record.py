"""The backend-neutral record of one heterogeneous graph (one target slide in one fold).

Producers (:mod:`hgc.graph.build`, :mod:`hgc.graph.store`) and consumers (:mod:`hgc.nn`,
:mod:`hgc.train`) share only this record, so graphs built once train under DGL or PyG alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

#: How a relation's messages are computed (:mod:`hgc.nn.layers` implements each kind once):
#: ``mean`` -- a linear map of the mean of the sources' states (SAGE's neighbour term), to the
#: destinations only; ``attention`` -- multi-head cross attention of the destinations over their
#: sources and, on the same edges, of the sources back over their destinations.
KINDS: tuple[str, ...] = ("mean", "attention")
NODE_TYPES: tuple[str, ...] = ("spot", "ref")


@dataclass(frozen=True)
class Relation:
    """One edge type of the graph: ``src`` nodes send along it to ``dst`` nodes, by ``kind``.

    Edges of a relation between references only (``src == dst == "ref"``) belong to the
    reference pool and are shared by every target joined to it; the others belong to the target.
    """

    src: str
    name: str
    dst: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"relation '{self.name}': kind '{self.kind}' is unknown; expected one of {list(KINDS)}")
        bad = [t for t in (self.src, self.dst) if t not in NODE_TYPES]
        if bad:
            raise InputError(f"relation '{self.name}': node types {bad} are unknown; expected {list(NODE_TYPES)}")

    @property
    def canonical(self) -> tuple[str, str, str]:
        """The (source type, name, destination type) triple DGL and PyG key edge types by."""
        return (self.src, self.name, self.dst)

    @property
    def of_references(self) -> bool:
        return self.src == self.dst == "ref"


#: The relation table: relation names are the contract between builder, store and model; a graph
#: carrying a relation that is not here is an error, never a silent skip. Extend it with
#: :func:`register_relation`.
RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("spot", "near", "spot", "mean"),
    Relation("ref", "refer", "spot", "attention"),
    Relation("ref", "close", "ref", "mean"),
)}
#: The retrieval relation: each spot's most similar references, which the model's head pools over.
RETRIEVAL = "refer"


def relation_names() -> tuple[str, ...]:
    """The known relations' names, in table order (the order graphs and layers use)."""
    return tuple(RELATIONS)


def relation(name: str) -> Relation:
    """The table entry of relation ``name``; an unknown name is an :class:`InputError`."""
    try:
        return RELATIONS[name]
    except KeyError:
        raise InputError(f"relation '{name}' is unknown; known relations: {list(RELATIONS)}") from None


def register_relation(rel: Relation) -> None:
    """Add ``rel`` to the relation table (builders that make its edges, and models that use it,
    need nothing else); re-registering a name with another definition is refused."""
    known = RELATIONS.get(rel.name)
    if known is not None and known != rel:
        raise InputError(f"relation '{rel.name}' is already defined as {known}")
    RELATIONS[rel.name] = rel


def unregister_relation(name: str) -> None:
    """Remove a relation added by :func:`register_relation` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise InputError(f"relation '{name}' is built in and cannot be removed")
    RELATIONS.pop(name, None)


_BUILT_IN = frozenset(RELATIONS)


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


def write_edges(group, edges: dict[str, np.ndarray], edge_weight: dict[str, np.ndarray]) -> None:
    """Store relations' edges in an HDF5 group: ``<name>`` (2, E) int64 and ``<name>_weight`` (E,) float32."""
    for name, e in edges.items():
        group.create_dataset(name, data=np.asarray(e, np.int64))
        group.create_dataset(f"{name}_weight", data=np.asarray(edge_weight[name], np.float32))


def read_edges(group, of_references: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The edges :func:`write_edges` stored in ``group`` of the known relations among references
    (``of_references``) or of a target; unknown datasets are left alone."""
    names = [r.name for r in RELATIONS.values() if r.of_references == of_references and r.name in group]
    return {n: group[n][()] for n in names}, {n: group[f"{n}_weight"][()] for n in names}
