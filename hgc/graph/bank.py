"""The reference bank: the spots a target slide's ``refer`` edges point at, and what using them needs.

A bank holds, per reference spot, its image embedding, its normalised expression and its slide,
patient and barcode; for the whole bank the genes, the fitted normaliser, the edges of the
relations among references (``close``) and the encoder that made the embeddings. A cross-validation fold's test
slides are predicted from the bank of its training slides; a trained model carries the bank of all
its training slides (``bank.h5`` beside its weights), so a new slide is joined to exactly the
references the model was validated with.

File layout (HDF5, written whole or not at all)::

    /            attrs: format="hgc-bank", format_version, hgc_version, genes (JSON), normaliser (JSON),
                        encoder (JSON: name, weights_sha256, patch_um, patch_px, patch_mode), slides (JSON)
    /x           (m, d) float32 embeddings
    /y           (m, G) float32 normalised expression
    /slide, /patient, /barcode   (m,) UTF-8
    /<relation>  edges of each relation among references (``close``): (2, E) int64 [neighbour, reference],
    /<relation>_weight (E,) float32
    /coords      (m, 2) float64 pixel positions on their slides (optional)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from .._outputs import atomic_h5
from .._records import open_h5
from ..errors import InputError
from .record import read_edges, write_edges

FORMAT = "hgc-bank"
FORMAT_VERSION = 1
_REBUILD = "train the model again with `hgc train` or `hgc fit`"


@dataclass(eq=False)
class ReferenceBank:
    """Reference spots (rows grouped by slide, in ``slides`` order) and their shared metadata."""

    x: np.ndarray  # (m, d) float32
    y: np.ndarray  # (m, G) float32
    slide: np.ndarray  # (m,) str
    patient: np.ndarray  # (m,) str
    barcode: np.ndarray  # (m,) str
    genes: list[str]
    normaliser: dict[str, Any]
    edges: dict[str, np.ndarray]  # relations among references (``close``) -> (2, E) int64 [source, destination]
    edge_weight: dict[str, np.ndarray]  # -> (E,) float32
    encoder: dict[str, Any] = field(default_factory=dict)
    coords: np.ndarray | None = None  # (m, 2) float64 pixel positions on their slides (None in older banks)

    _spans: dict[str, slice] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = self.x.shape[0]
        shapes = {"y": self.y.shape[0], "slide": len(self.slide), "patient": len(self.patient), "barcode": len(self.barcode)}
        bad = {k: v for k, v in shapes.items() if v != m}
        if self.x.ndim != 2 or bad or self.y.shape[1:] != (len(self.genes),):
            raise InputError(f"reference bank arrays do not match: {m} embeddings, {shapes}, "
                             f"{self.y.shape[1:]} expression columns for {len(self.genes)} genes")
        if self.coords is not None and np.shape(self.coords) != (m, 2):
            raise InputError(f"reference bank has {np.shape(self.coords)} spot positions for {m} spots")
        for name, e in self.edges.items():
            if e.size and (e.min() < 0 or e.max() >= m):
                raise InputError(f"reference bank '{name}' edges index references outside [0, {m})")
        slide = np.asarray(self.slide).astype(str)
        starts = np.flatnonzero(np.r_[True, slide[1:] != slide[:-1]]) if m else np.zeros(0, np.int64)
        self._spans = {str(slide[a]): slice(int(a), int(b)) for a, b in zip(starts, np.r_[starts[1:], m])}
        if len(self._spans) != len(starts):
            raise InputError("reference bank rows are not grouped by slide (each slide's spots must be contiguous)")

    @property
    def n_ref(self) -> int:
        return int(self.x.shape[0])

    @property
    def slides(self) -> list[str]:
        return list(self._spans)

    @property
    def patients(self) -> list[str]:
        return list(dict.fromkeys(map(str, self.patient)))

    def rows(self, slides: Sequence[str]) -> np.ndarray:
        """Indices of the rows of ``slides``, slide by slide in the order given."""
        spans = [self._spans[s] for s in slides]
        return np.concatenate([np.arange(r.start, r.stop) for r in spans]) if spans else np.zeros(0, np.int64)

    def nbytes(self) -> int:
        edges = sum(a.nbytes for a in [*self.edges.values(), *self.edge_weight.values()])
        return int(self.x.nbytes + self.y.nbytes + edges + 64 * self.n_ref)


def write_bank(bank: ReferenceBank, path: str | Path) -> Path:
    """Write ``bank`` to ``path`` atomically."""
    import h5py

    path = Path(path)
    strings = h5py.string_dtype()
    with atomic_h5(path, bank.nbytes()) as f:
        f.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "hgc_version": __version__,
            "genes": json.dumps(list(bank.genes)), "normaliser": json.dumps(bank.normaliser),
            "encoder": json.dumps(bank.encoder), "slides": json.dumps(bank.slides),
        })
        f.create_dataset("x", data=np.ascontiguousarray(bank.x, np.float32))
        f.create_dataset("y", data=np.ascontiguousarray(bank.y, np.float32))
        for name in ("slide", "patient", "barcode"):
            f.create_dataset(name, data=np.asarray(getattr(bank, name)).astype(str).astype(object), dtype=strings)
        write_edges(f, bank.edges, bank.edge_weight)
        if bank.coords is not None:
            f.create_dataset("coords", data=np.asarray(bank.coords, np.float64))
    return path


def read_bank(path: str | Path) -> ReferenceBank:
    """The bank stored at ``path``; a missing, foreign, newer or damaged file is one InputError."""
    with open_h5(path, "reference bank", FORMAT, FORMAT_VERSION, _REBUILD, _REBUILD) as f:
        return ReferenceBank(
            x=f["x"][()], y=f["y"][()],
            slide=f["slide"].asstr()[()].astype(object), patient=f["patient"].asstr()[()].astype(object),
            barcode=f["barcode"].asstr()[()].astype(object),
            genes=list(json.loads(f.attrs["genes"])), normaliser=dict(json.loads(f.attrs["normaliser"])),
            **dict(zip(("edges", "edge_weight"), read_edges(f, of_references=True))),
            encoder=dict(json.loads(f.attrs["encoder"])),
            coords=f["coords"][()] if "coords" in f else None,
        )
