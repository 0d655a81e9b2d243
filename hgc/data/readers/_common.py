"""Small helpers every slide reader needs, so each format states only what is specific to it."""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ...errors import HgcError, InputError

if TYPE_CHECKING:
    from ..entry import SlideEntry
    from ..slide import Slide

log = logging.getLogger(__name__)


def require_file(path: Path, slide: str, what: str) -> Path:
    """``path`` if it is a file; otherwise an error that says which file the slide lacks."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"slide '{slide}': {what} not found: {path} (expected a file there)")
    return path


@contextlib.contextmanager
def reading(path: Path | str, slide: str, what: str,
            errors: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Turn a failure while parsing ``path`` into one InputError naming the slide and the file.

    Parsers (pandas, scipy, h5py, gzip) raise dozens of exception types for damaged, truncated or
    mistyped files (``EOFError`` for a cut ``.gz``, ``UnicodeDecodeError``, ``zlib.error`` ...);
    the user only needs to know which file is unreadable and why. Around hgc's own code, pass the
    narrower ``errors`` its data can cause, so a programming error still shows as one.
    """
    try:
        yield
    except HgcError:
        raise
    except errors as exc:  # noqa: BLE001 - a parser failure is a property of the file
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"slide '{slide}': cannot read {what} {path} ({type(exc).__name__}: {text})") from None


def numeric_columns(table: pd.DataFrame, columns: Sequence[str], path: Path | str, slide: str,
                    row_name: str = "row") -> pd.DataFrame:
    """``columns`` of ``table`` as float64, or an error naming the first non-numeric cell.

    Empty cells count as missing (NaN) here; callers decide whether a missing value is allowed.
    ``row_name`` says what a row is in the message ("spot", "barcode"); the table's index labels it.
    """
    out = pd.DataFrame(index=table.index)
    for col in columns:
        raw = table[col]
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise InputError(
                f"slide '{slide}': {path} has a non-numeric {col} '{raw.iloc[i]}' at {row_name} "
                f"{table.index[i]} ({int(bad.sum())} such value(s)); expected plain numbers such as 12.5"
            )
        out[col] = values.astype(np.float64)
    return out


def existing(paths: Sequence[Path | None]) -> list[Path]:
    """The given paths that are files (for the list of a slide's input files)."""
    return [Path(p) for p in paths if p is not None and Path(p).is_file()]


def make_unique(names: np.ndarray, slide: str, source: Path | str) -> np.ndarray:
    """Gene symbols made unique the way anndata does (second 'X' -> 'X-1', third -> 'X-2').

    Several Ensembl ids share one symbol; downstream code indexes genes by symbol, so repeats
    must be renamed deterministically (first occurrence keeps its name) and reported.
    """
    names = np.asarray(names, dtype=object)
    dup = pd.Index(names).duplicated(keep="first")
    if not dup.any():
        return names
    out = names.copy()
    taken = set(names.tolist())
    counter: dict[str, int] = defaultdict(int)
    renamed = []
    for i in np.flatnonzero(dup):  # only the (few) repeated symbols are visited
        base = out[i]
        while True:
            counter[base] += 1
            candidate = f"{base}-{counter[base]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        out[i] = candidate
        renamed.append(base)
    log.warning(
        "slide %s: %d duplicate gene symbols in %s made unique with -1, -2 suffixes (%s)",
        slide, len(renamed), source, ", ".join(sorted(set(renamed))[:10])
        + (" ..." if len(set(renamed)) > 10 else ""),
    )
    return out


def annotation_table(path: Path, slide_id: str, barcodes: np.ndarray) -> pd.DataFrame:
    """A per-spot label table (CSV or TSV; a ``barcode`` column or the first column holds barcodes)
    indexed by ``barcodes``; spots without a row get missing values."""
    require_file(path, slide_id, "annotation table")
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except (OSError, ValueError) as exc:
        raise InputError(f"slide '{slide_id}': cannot read annotation table {path}: {exc}") from exc
    key = next((c for c in table.columns if str(c).strip().lower() == "barcode"), table.columns[0])
    table = table.set_index(table[key].astype(str)).drop(columns=[key])
    table = table[~table.index.duplicated()].reindex(pd.Index(np.asarray(barcodes).astype(str), name="barcode"))
    if table.notna().any(axis=1).sum() == 0:
        raise InputError(
            f"slide '{slide_id}': no barcode of annotation table {path} matches a spot of the slide "
            f"(first column '{key}' should hold spot barcodes like '{barcodes[0]}')"
        )
    return table


def entry_annotations(entry: "SlideEntry", barcodes: np.ndarray) -> pd.DataFrame:
    """The entry's annotation table for spots ``barcodes``, read alone (formats that join on barcodes)."""
    assert entry.annotations is not None
    return annotation_table(entry.annotations, entry.slide, barcodes)


def attach_annotations(slide: "Slide", path: Path) -> None:
    """Join the annotation table at ``path`` (:func:`annotation_table`) onto ``slide.annotations``."""
    table = annotation_table(path, slide.id, slide.barcodes)
    if slide.annotations is not None:
        table = slide.annotations.join(table, rsuffix="_annotation")
    slide.annotations = table
