"""Gene-set files (signatures, pathways) and region maps: the inputs of ``hgc evaluate``'s biology checks.

No gene-set database is bundled; users pass files in the layouts the field uses:

* GMT (``.gmt``): one set per line, ``name<TAB>description<TAB>gene<TAB>gene...`` (MSigDB's format).
* A table (CSV/TSV, optionally gzipped) of one set named after the file: the genes in a column
  named ``gene``, ``symbol`` or ``name`` (the her2st GO sets), else the first column; a numeric
  ``weight`` column, or a numeric second column, makes it a weighted signature (the her2st TLS
  signature is gene, weight with no header name).

A region map names the tissue region of each annotation value, e.g. her2st's
``res/ST-cluster/motivation.csv`` (patient, cluster, annotated as).
"""
from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .slide import label_strings

_GENE_COLUMNS = ("gene", "symbol", "name", "gene_symbol")
_WEIGHT_COLUMNS = ("weight", "score", "coefficient")
_REGION_COLUMNS = ("region", "annotated as", "annotation", "tissue")


@dataclass(frozen=True)
class GeneSet:
    """A named list of genes; ``weights`` (same length) makes the score a weighted sum."""

    name: str
    genes: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    source: str = ""

    @property
    def weighted(self) -> bool:
        return self.weights is not None


def _open_text(path: Path, what: str = "gene-set file") -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def _read_gmt(path: Path) -> list[GeneSet]:
    sets = []
    for line_no, line in enumerate(_open_text(path).splitlines(), 1):
        fields = [f.strip() for f in line.rstrip("\n").split("\t")]
        if not any(fields):
            continue
        genes = tuple(g for g in fields[2:] if g)
        if not fields[0] or not genes:
            raise InputError(f"gene-set file {path}, line {line_no}: a GMT line is name, description, then genes "
                             "(tab-separated); this one has no name or no gene")
        sets.append(GeneSet(fields[0], genes, source=str(path)))
    if not sets:
        raise InputError(f"gene-set file {path} holds no gene set")
    return sets


def _is_header(row: list[str]) -> bool:
    """Whether a gene table's first row names its columns (else it is the first gene): an empty or
    known first cell, or, with a second column, a cell there that is not a weight."""
    if not row[0] or row[0].lower() in _GENE_COLUMNS:
        return True
    if len(row) > 1:
        return pd.to_numeric(pd.Series([row[1]]), errors="coerce").isna().all() and row[1] != ""
    return False


def _read_table(path: Path) -> GeneSet:
    stem = re.sub(r"\.(tsv|csv|txt)$", "", path.name.removesuffix(".gz"), flags=re.IGNORECASE)
    lines = _open_text(path).splitlines()
    sep = "\t" if lines and "\t" in lines[0] else ","  # a one-column list has neither: any separator reads it
    try:
        table = pd.read_csv(io.StringIO("\n".join(lines)), sep=sep, dtype=str, header=None, skip_blank_lines=True)
    except (ValueError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read gene-set file {path}: {exc}") from None
    first = [str(v).strip() if isinstance(v, str) else "" for v in table.iloc[0]] if len(table) else []
    if first and _is_header(first):
        table = table.iloc[1:].set_axis(first, axis=1)
    if table.empty:
        raise InputError(f"gene-set file {path} holds no gene")
    lower = {str(c).strip().lower(): c for c in table.columns}
    gene_col = next((lower[c] for c in _GENE_COLUMNS if c in lower), table.columns[0])
    rest = [c for c in table.columns if c != gene_col]
    weight_col = next((lower[c] for c in _WEIGHT_COLUMNS if c in lower), None)
    if weight_col is None and len(rest) == 1 and pd.to_numeric(table[rest[0]], errors="coerce").notna().all():
        weight_col = rest[0]
    genes = table[gene_col].fillna("").str.strip()
    keep = genes != ""
    weights = None
    if weight_col is not None:
        values = pd.to_numeric(table[weight_col], errors="coerce")
        if values[keep].isna().any():
            raise InputError(f"gene-set file {path}: column '{weight_col}' must hold a number for every gene")
        weights = tuple(float(w) for w in values[keep])
    return GeneSet(stem, tuple(genes[keep]), weights, source=str(path))


def read_gene_sets(path: str | Path) -> list[GeneSet]:
    """Every gene set of a GMT file, or the one set of a gene table (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"gene-set file {path} does not exist")
    if path.name.removesuffix(".gz").lower().endswith(".gmt"):
        return _read_gmt(path)
    return [_read_table(path)]


def read_gene_set_files(paths) -> list[GeneSet]:
    """The sets of several files; two sets of one name are refused (reports are keyed by name)."""
    sets = [s for p in paths for s in read_gene_sets(p)]
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"gene sets {repeated} are named twice among {[str(p) for p in paths]}; rename one")
    return sets


@dataclass(frozen=True)
class RegionMap:
    """Annotation value (per patient, when the table has a patient column) -> region name."""

    names: dict[tuple[str, str], str]  # (patient or "", value) -> region
    per_patient: bool
    source: str

    def regions(self, labels: np.ndarray, patient: str) -> np.ndarray:
        """The region of each label ("" where the label is missing or not in the map)."""
        key = patient if self.per_patient else ""
        values, inverse = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        return np.array([self.names.get((key, v), "") for v in values], dtype=object)[inverse]


def _read_prose_table(path: Path) -> pd.DataFrame:
    """A small CSV/TSV whose free-text cells may hold unquoted commas (her2st's motivation.csv does:
    "immune : APC, B-cell, T-cell"). In a row with more fields than the header, a field that starts
    with a space continues the one before it, as a comma in prose does, and any fields still left
    over belong to the last column."""
    import csv

    text = _open_text(path, "region map").splitlines()
    if not text:
        raise InputError(f"region map {path} is empty")
    delimiter = "\t" if "\t" in text[0] else ","
    rows = list(csv.reader(text, delimiter=delimiter))
    header = [h.strip() for h in rows[0]]
    # fields merge only into the region and free-text columns, never into the key or patient
    first_text = min((i for i, h in enumerate(header) if h.lower() in _REGION_COLUMNS), default=len(header) - 1)
    records = []
    for line_no, row in enumerate(rows[1:], 2):
        if len(row) > len(header):
            merged: list[str] = []
            for i, f in enumerate(row):  # merge while the row would still be too long without it
                if len(merged) > first_text and f[:1].isspace() and len(merged) + len(row) - i > len(header):
                    merged[-1] += delimiter + f
                else:
                    merged.append(f)
            # what is still too long belongs to the last (free-text) column
            row = merged[:len(header) - 1] + [delimiter.join(merged[len(header) - 1:])]
        if any(f.strip() for f in row):
            records.append(row + [""] * (len(header) - len(row)))
    return pd.DataFrame(records, columns=header, dtype=str)


def read_region_map(path: str | Path, column: str) -> RegionMap:
    """A table mapping values of the annotation ``column`` to region names.

    Its key column is named ``column``, ``cluster``, ``label`` or ``value``; the name column
    ``region``, ``annotated as``, ``annotation`` or ``tissue``; an optional ``patient`` column makes
    the map per patient (her2st numbers its clusters per patient).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"region map {path} does not exist")
    table = _read_prose_table(path)
    lower = {str(c).strip().lower(): c for c in table.columns}
    key_names = list(dict.fromkeys((column.lower(), "cluster", "label", "value")))
    key = next((lower[c] for c in key_names if c in lower), None)
    name = next((lower[c] for c in _REGION_COLUMNS if c in lower), None)
    if key is None or name is None:
        raise InputError(
            f"region map {path} needs a key column ({', '.join(map(repr, key_names))}) and a region "
            f"column ({', '.join(repr(c) for c in _REGION_COLUMNS)}); found {', '.join(map(str, table.columns))}"
        )
    patient = lower.get("patient")
    keys = label_strings(table[key].str.strip())  # as spot labels are read: "01" and "1.0" are label 1
    names = {}
    for value, row in zip(keys, table.itertuples(index=False)):
        values = dict(zip(table.columns, row))
        region = str(values[name] or "").strip()
        owner = str(values[patient]).strip() if patient is not None else ""
        if value and region and region.lower() != "nan":
            names[(owner, value)] = region
    if not names:
        raise InputError(f"region map {path} maps no value to a region")
    return RegionMap(names, patient is not None, str(path))
