"""Heterogeneous graphs: a target slide joined to a reference bank (similarity search, construction,
the backend-neutral store and bank files)."""
from .bank import ReferenceBank, read_bank, write_bank
from .build import build_from_manifest, build_graphs, reference_pool, target_graph
from .fold import BankGraphs, GraphConfig, GraphSet
from .knn import recall_at_k, search
from .record import RELATIONS, Relation, SlideGraph, register_relation, relation, relation_names
from .store import read_fold_info, read_graph_set, read_graphs, write_graphs

__all__ = [
    "BankGraphs",
    "GraphConfig",
    "GraphSet",
    "RELATIONS",
    "ReferenceBank",
    "Relation",
    "SlideGraph",
    "build_from_manifest",
    "build_graphs",
    "read_bank",
    "read_fold_info",
    "read_graph_set",
    "read_graphs",
    "recall_at_k",
    "reference_pool",
    "register_relation",
    "relation",
    "relation_names",
    "search",
    "target_graph",
    "write_bank",
    "write_graphs",
]
