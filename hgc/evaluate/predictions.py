"""Prediction files and prediction folders: the format ``hgc predict`` writes and ``hgc evaluate`` reads.

One ``.h5ad`` per slide per method, at ``PRED_DIR/<method>/<slide>.h5ad`` (the slide id through
:func:`hgc._outputs.safe_name`). Everything needed to score a file travels inside it (observed
expression, the training-chosen HEG/HVG gene indices, the normalisation), so every method -- the
model and each baseline -- is scored by the same code on the same genes.

A prediction folder is written whole (:func:`writing_predictions`): files go to a temporary
folder, the completion record ``predictions.json`` (format, version, which file holds which
method and slide) is written last, and the folder replaces the previous one only then. Readers
require the record and read exactly the files it lists, so stale or half-written files are
never scored.
"""
from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._outputs import (
    atomic_dir,
    check_replaceable_folder,
    command_line,
    is_temporary,
    output_lock,
    require_free_space,
    safe_name,
    write_text,
)
from .._records import check_format_version
from ..errors import InputError

log = logging.getLogger(__name__)

FORMAT = "hgc-predictions"
FORMAT_VERSION = 1
RECORD = "predictions.json"
#: Files ``hgc evaluate`` adds to a prediction folder.
REPORT_FILES = ("metrics.json", "metrics.csv", "metrics.md")
_REPREDICT = "write it again with `hgc predict`"


@dataclass
class Prediction:
    """One method's prediction for one slide, with what is needed to score it."""

    method: str
    slide: str
    fold: str
    patient: str
    protocol: str
    normalisation: dict[str, Any]  # the fitted normaliser's to_dict(); "name" names the space
    genes: np.ndarray  # (G,) str
    barcodes: np.ndarray  # (n,) str
    coords: np.ndarray  # (n, 2) float64 pixel (x, y)
    predicted: np.ndarray  # (n, G) float32, normalised space
    observed: np.ndarray | None  # (n, G) float32, same space
    heg: np.ndarray  # gene indices chosen on the fold's training slides
    hvg: np.ndarray
    image: str = ""  # the slide's H&E file, for `hgc plot`
    image_scale: float = 1.0
    obs: dict[str, np.ndarray] = field(default_factory=dict)  # more per-spot columns (array_row, virtual, ...)
    spatial: dict[str, Any] | None = None  # uns["spatial"][slide] in scanpy's Visium layout (see spatial_entry)
    model: dict[str, Any] = field(default_factory=dict)  # the model bundle that predicted: id, path, references
    uncertainty: np.ndarray | None = None  # (n, G) float32: spread of a seed ensemble's members
    features: dict[str, Any] = field(default_factory=dict)  # what made the image features: encoder, weights, patches

    @property
    def space(self) -> str:
        return space_name(self.normalisation)


def space_name(normalisation: dict[str, Any]) -> str:
    """The normalised-expression space's name, as reports print it."""
    return str(normalisation.get("name", "unknown"))


def prediction_path(pred_dir: str | Path, method: str, slide: str) -> Path:
    return Path(pred_dir) / safe_name(method) / f"{safe_name(slide)}.h5ad"


def write_prediction(path: str | Path, p: Prediction) -> Path:
    """Write ``p`` as one ``.h5ad`` file (X = prediction, layers["observed"], layers["uncertainty"])."""
    import anndata as ad
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(
        X=np.asarray(p.predicted, dtype=np.float32),
        obs=pd.DataFrame(dict(p.obs), index=pd.Index([str(b) for b in p.barcodes], name="barcode")),
        var=pd.DataFrame(index=pd.Index([str(g) for g in p.genes], name="gene")),
    )
    if p.observed is not None:
        adata.layers["observed"] = np.asarray(p.observed, dtype=np.float32)
    if p.uncertainty is not None:
        adata.layers["uncertainty"] = np.asarray(p.uncertainty, dtype=np.float32)
    adata.obsm["spatial"] = np.asarray(p.coords, dtype=np.float64)
    adata.uns.update(
        method=p.method,
        slide=p.slide,
        fold=p.fold,
        patient=p.patient,
        protocol=p.protocol,
        space=p.space,
        # JSON, because h5ad cannot store None or mixed lists a normaliser may carry.
        normalisation=json.dumps(p.normalisation),
        heg=np.asarray(p.heg, dtype=np.int64),
        hvg=np.asarray(p.hvg, dtype=np.int64),
    )
    if p.image:
        adata.uns.update(image=p.image, image_scale=float(p.image_scale))
    if p.spatial is not None:
        adata.uns["spatial"] = {p.slide: p.spatial}
    if p.model:
        adata.uns["model"] = dict(p.model)
    if p.features:
        adata.uns["features"] = json.dumps(p.features)
    adata.write_h5ad(path)
    return path


def spatial_entry(image, spot_diameter_px: float, max_px: int = 2000) -> dict[str, Any]:
    """``uns["spatial"][slide]`` as scanpy's Visium reader writes it, so ``scanpy.pl.spatial`` and
    squidpy draw predictions over the H&E with no extra arguments: a ``hires`` image at most
    ``max_px`` a side and the scale factors from full-resolution pixels (``obsm["spatial"]``)."""
    hires = image.thumbnail(max_px)
    scale = hires.shape[1] / image.size[0]
    return {
        "images": {"hires": np.ascontiguousarray(hires)},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(spot_diameter_px)},
        "metadata": {"source_image_path": str(image.path)},
    }


def read_prediction(path: str | Path) -> Prediction:
    """One prediction file; an unreadable, truncated or foreign file is one InputError."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise InputError(f"prediction file {path} does not exist; {_REPREDICT}")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a damaged file
        raise InputError(f"cannot read prediction file {path} ({type(exc).__name__}: {exc}); {_REPREDICT}") from None
    uns = adata.uns
    missing = [k for k in ("method", "slide", "fold", "protocol", "normalisation", "heg", "hvg") if k not in uns]
    if missing or "spatial" not in adata.obsm:
        raise InputError(f"prediction file {path} lacks {missing or ['obsm spatial']}; was it written by `hgc predict`?")
    try:
        observed = adata.layers["observed"] if "observed" in adata.layers else None
        spread = adata.layers["uncertainty"] if "uncertainty" in adata.layers else None
        p = Prediction(
            method=str(uns["method"]),
            slide=str(uns["slide"]),
            fold=str(uns["fold"]),
            patient=str(uns.get("patient", "")),
            protocol=str(uns["protocol"]),
            normalisation=json.loads(str(uns["normalisation"])),
            genes=np.asarray(adata.var_names, dtype=object),
            barcodes=np.asarray(adata.obs_names, dtype=object),
            coords=np.asarray(adata.obsm["spatial"], dtype=np.float64),
            predicted=_dense(adata.X),
            observed=None if observed is None else _dense(observed),
            heg=np.asarray(uns["heg"], dtype=np.int64),
            hvg=np.asarray(uns["hvg"], dtype=np.int64),
            image=str(uns.get("image", "")),
            image_scale=float(uns.get("image_scale", 1.0)),
            uncertainty=None if spread is None else _dense(spread),
            obs={str(c): adata.obs[c].to_numpy() for c in adata.obs.columns},
            spatial=_spatial(uns, str(uns["slide"])),
            features=json.loads(str(uns.get("features", "{}"))),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"prediction file {path} holds a malformed field ({exc}); {_REPREDICT}") from None
    if not isinstance(p.normalisation, dict):
        raise InputError(f"prediction file {path}: uns['normalisation'] is not a JSON object; {_REPREDICT}")
    return p


def _spatial(uns: Any, slide: str) -> dict[str, Any] | None:
    """``uns["spatial"][slide]`` with its image and scale factors, when the file has them."""
    entry = uns.get("spatial", {}).get(slide)
    if entry is None:
        return None
    return {
        "images": {k: np.asarray(v) for k, v in entry.get("images", {}).items()},
        "scalefactors": {k: float(v) for k, v in entry.get("scalefactors", {}).items()},
        "metadata": dict(entry.get("metadata", {})),
    }


def _dense(x: Any) -> np.ndarray:
    if x is None:
        raise ValueError("X is missing")
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


# --- prediction folders ----------------------------------------------------------------------------

class PredictionSetWriter:
    """Collects the files of one prediction folder being written (see :func:`writing_predictions`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, dict[str, str]] = {}
        self.figures: list[str] = []

    def add_figure(self, name: str, draw) -> Path:
        """A picture that belongs to the predictions (e.g. ``tissue/<slide>.png``), drawn by ``draw(path)``."""
        parts = [safe_name(p) for p in name.split("/")]
        path = self.folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(path)
        self.figures.append(path.relative_to(self.folder).as_posix())
        return path

    def add(self, p: Prediction) -> Path:
        by_slide = self.files.setdefault(p.method, {})
        if p.slide in by_slide:
            raise InputError(f"two predictions of method '{p.method}' for slide '{p.slide}' (folds overlap?)")
        path = prediction_path(self.folder, p.method, p.slide)
        values = np.asarray(p.predicted).size * (1 if p.observed is None else 2)
        require_free_space(path, 4 * values + 16 * (len(p.barcodes) + len(p.genes)), f"the prediction of {p.slide}")
        write_prediction(path, p)
        by_slide[p.slide] = path.relative_to(self.folder).as_posix()
        return path


def is_prediction_folder(path: Path) -> bool:
    """Whether ``path`` holds a prediction folder (with its record, or of hgc 0.1), which may be replaced."""
    if (path / RECORD).is_file():
        return True
    entries = list(path.iterdir())
    return bool(entries) and all(
        (e.is_dir() and all(f.suffix == ".h5ad" for f in e.iterdir())) or e.name in REPORT_FILES for e in entries
    )


def user_entries(folder: Path) -> list[Path]:
    """Entries of a prediction folder that hgc did not write (a figure, notes): kept when it is replaced."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        methods, figures = record.get("files", {}), record.get("figures", [])
    except (OSError, ValueError, AttributeError):
        methods, figures = {}, []
    ours = {RECORD, *REPORT_FILES, *(safe_name(str(m)) for m in methods), *(str(f).split("/")[0] for f in figures)}
    return [e for e in folder.iterdir()
            if e.name not in ours and not is_temporary(e.name)
            and not (e.is_dir() and all(f.suffix == ".h5ad" for f in e.iterdir()))]  # hgc 0.1's method folders


def check_prediction_output(pred_dir: str | Path) -> Path:
    """``pred_dir`` if predictions may be written there: absent, empty or an earlier prediction folder."""
    return check_replaceable_folder(pred_dir, is_prediction_folder, "hgc prediction folder")


@contextlib.contextmanager
def writing_predictions(pred_dir: str | Path, **facts: Any) -> Iterator[PredictionSetWriter]:
    """Write a whole prediction folder: ``add`` each prediction; the folder appears on success only.

    ``facts`` (JSON-ready: protocol, run, graph store, ...) go into the completion record.
    """
    pred_dir = check_prediction_output(pred_dir)
    with output_lock(pred_dir, command_line()), atomic_dir(pred_dir, keep=user_entries) as tmp:
        writer = PredictionSetWriter(tmp)
        yield writer
        if not writer.files:
            raise InputError(f"no prediction was made, so nothing is written to {pred_dir}")
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "write_id": uuid.uuid4().hex, **facts,
                  "files": writer.files, "figures": writer.figures}
        write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")


@dataclass
class PredictionSet:
    """A complete prediction folder: its record and the file of each (method, slide)."""

    path: Path
    record: dict[str, Any]
    files: dict[str, dict[str, Path]] = field(default_factory=dict)


def open_predictions(pred_dir: str | Path) -> PredictionSet:
    """The prediction folder at ``pred_dir``; a missing, interrupted or damaged one is one InputError."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"prediction folder {pred_dir} does not exist (write one with `hgc predict`)")
    path = pred_dir / RECORD
    if not path.is_file():
        raise InputError(f"{pred_dir} is not a complete hgc prediction folder (no {RECORD}: was `hgc predict` "
                         f"interrupted, or is it from hgc 0.1?); {_REPREDICT}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path} ({exc}); {_REPREDICT}") from None
    ok = isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("files"), dict)
    if not ok:
        raise InputError(f"{path} is not an hgc prediction record; {_REPREDICT}")
    check_format_version(record.get("format_version"), FORMAT_VERSION, str(path), _REPREDICT)
    files: dict[str, dict[str, Path]] = {}
    for method, by_slide in record["files"].items():
        if not isinstance(by_slide, dict):
            raise InputError(f"{path} is damaged (files of method {method!r}); {_REPREDICT}")
        files[str(method)] = {str(s): pred_dir / str(f) for s, f in by_slide.items()}
    absent = [str(f) for by_slide in files.values() for f in by_slide.values() if not f.is_file()]
    if absent:
        raise InputError(f"prediction folder {pred_dir} lacks files its record lists ({', '.join(absent[:3])}); {_REPREDICT}")
    return PredictionSet(pred_dir, record, files)
