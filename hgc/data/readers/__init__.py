"""Readers from each on-disk format to :class:`hgc.data.Slide`."""
from __future__ import annotations

from collections.abc import Callable

from ..manifest import SlideEntry
from ..slide import Slide
from . import st


def _lazy(module: str) -> Callable[[SlideEntry], Slide]:
    def read(entry: SlideEntry) -> Slide:
        import importlib

        return importlib.import_module(f"{__name__}.{module}").from_entry(entry)

    return read


#: format name (manifest ``format`` column) -> reader of one manifest entry
READERS: dict[str, Callable[[SlideEntry], Slide]] = {
    "st": st.from_entry,
    "visium": _lazy("visium"),
    "hest": _lazy("hest"),
    "h5ad": _lazy("h5ad"),
}
