"""Lazy imports of optional packages, with an install hint naming the hgc extra."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

_EXTRA_OF = {
    "dgl": "dgl",
    "torch_geometric": "pyg",
    "faiss": "faiss",
    "tifffile": "wsi",
    "openslide": "wsi",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or explain which extra to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_OF.get(module.split(".")[0])
        hint = f"pip install 'hgc[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{module}', which is not importable "
            f"({exc}). Install it with: {hint}"
        ) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
