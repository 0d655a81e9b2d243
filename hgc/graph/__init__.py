"""Heterogeneous graphs: similarity search, construction, and the backend-neutral store."""
from .build import GraphConfig, GraphSet, build_from_manifest, build_graphs, reference_pool
from .knn import recall_at_k, search
from .record import CANONICAL, RELATION_NAMES, RELATIONS, SlideGraph
from .store import read_fold_info, read_graph_set, read_graphs, write_graphs

__all__ = [
    "CANONICAL",
    "GraphConfig",
    "GraphSet",
    "RELATIONS",
    "RELATION_NAMES",
    "SlideGraph",
    "build_from_manifest",
    "build_graphs",
    "read_fold_info",
    "read_graph_set",
    "read_graphs",
    "recall_at_k",
    "reference_pool",
    "search",
    "write_graphs",
]
