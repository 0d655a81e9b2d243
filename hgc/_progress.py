"""Progress bars that show on a terminal and stay silent in logs, pipes and tests."""
from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm`` with ``disable=None`` (off when stderr is not a TTY) unless told otherwise."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
