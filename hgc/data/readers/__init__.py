"""Readers from each on-disk format to :class:`hgc.data.Slide`."""
from __future__ import annotations

from collections.abc import Callable

from ..manifest import SlideEntry
from ..slide import Slide
from . import h5ad, hest, st, visium

#: format name (manifest ``format`` column) -> reader of one manifest entry
READERS: dict[str, Callable[[SlideEntry], Slide]] = {
    "st": st.from_entry,
    "visium": visium.from_entry,
    "hest": hest.from_entry,
    "h5ad": h5ad.from_entry,
}
