"""Readers from each on-disk format to :class:`hgc.data.Slide`.

Each format module owns its files: ``from_entry`` reads a manifest entry (``expression=False``:
its spots, positions and image without parsing counts, all embedding needs), ``input_files``
lists the files that read depends on (so caches can be keyed on their content).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..entry import SlideEntry
from ..slide import Slide
from . import h5ad, hest, image, st, visium
from ._common import entry_annotations


@dataclass(frozen=True)
class SlideFormat:
    """A manifest ``format``: how to read an entry, and which files that reads."""

    read: Callable[[SlideEntry, bool], Slide]
    input_files: Callable[[SlideEntry], list[Path]]
    #: the entry's annotation table for given spot barcodes, read alone (``hgc evaluate --annotations``)
    annotations: Callable[[SlideEntry, np.ndarray], pd.DataFrame] = entry_annotations


#: format name (manifest ``format`` column) -> its reader
FORMATS: dict[str, SlideFormat] = {
    "st": SlideFormat(st.from_entry, st.input_files,
                      lambda entry, barcodes: st.annotation_table(entry.annotations, entry.slide, barcodes)),
    "visium": SlideFormat(visium.from_entry, visium.input_files),
    "hest": SlideFormat(hest.from_entry, hest.input_files),
    "h5ad": SlideFormat(h5ad.from_entry, h5ad.input_files),
    "image": SlideFormat(image.from_entry, image.input_files),
}
