"""The run folder ``hgc fit`` writes, and the model bundle each of its folds is.

Layout::

    config.json                    the completion record (written last): format, version, a write
                                   id, the FitConfig, backend, device, folds trained and skipped
    <fold>/                        a model bundle, self-contained (copy it anywhere and predict):
        model.safetensors          best checkpoint (tensors only: loaded without unpickling)
        bank.h5                    the reference bank: every training spot's embedding and expression
        history.csv                per epoch: losses, validation PCC-ALL and MSE
        MODEL_CARD.md              what the model is, for people
        fold.json                  written last: format "hgc-model", genes, normaliser, graph settings,
                                   encoder, platform, train/validation/test slides, dims, best epoch

Fold folders are named with :func:`hgc._outputs.safe_name`. A run is built in a temporary folder
and renamed into place complete (:func:`hgc._outputs.atomic_dir`), so a folder with this
``config.json`` is a whole run of one training; readers refuse anything else with one line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._outputs import is_temporary, safe_name, write_text
from .._records import check_format_version
from ..embed.store import describe_embedding
from ..errors import InputError

if TYPE_CHECKING:
    from ..graph.bank import ReferenceBank
    from ..graph.fold import GraphConfig

FORMAT = "hgc-run"
FORMAT_VERSION = 1
MODEL_FORMAT = "hgc-model"
MODEL_FORMAT_VERSION = 1
CHECKPOINT = "model.safetensors"
FOLD_INFO = "fold.json"
HISTORY = "history.csv"
BANK = "bank.h5"
MODEL_CARD = "MODEL_CARD.md"
RUN_RECORD = "config.json"
_REFIT = "train it again with `hgc fit`"
#: Keys every fold.json carries (what predicting with the fold's model needs).
FOLD_KEYS = ("fold", "protocol", "genes", "normaliser", "train_slides", "validation_slides", "test_slides",
             "spot_dim", "ref_dim", "n_genes", "model", "best_epoch", "epochs_run", "seed")


@dataclass
class ModelBundle:
    """One trained model: a fold folder of a run, or the folder ``hgc train`` writes a model to."""

    path: Path
    info: dict[str, Any]  # fold.json, every key checked

    @property
    def name(self) -> str:
        return str(self.info["fold"])

    def checkpoint(self) -> dict:
        """The best weights (tensors), loaded without unpickling."""
        return load_checkpoint(self.path / CHECKPOINT)

    def bank(self) -> "ReferenceBank":
        """The reference bank new slides are predicted from."""
        from ..graph.bank import read_bank

        if not (self.path / BANK).is_file():
            raise InputError(f"model {self.path} has no reference bank ({BANK}): it was trained by an hgc before "
                             f"model bundles, or its fold had no training graph; {_REFIT}")
        return read_bank(self.path / BANK)

    def graph_config(self) -> "GraphConfig":
        """How the model's graphs were built; a new slide's graph is built the same way."""
        from .._records import record_from_dict
        from ..graph.fold import GraphConfig

        return record_from_dict(GraphConfig, self.info.get("graph_config"), f"model {self.path}, its graph settings", _REFIT)


def read_bundle(folder: Path, fold: str | None = None) -> ModelBundle:
    """The bundle in ``folder`` (``fold`` is the name its run knows it by, when read through a run)."""
    path = folder / FOLD_INFO
    info = _read_json(path, f"model {folder}")
    missing = [k for k in FOLD_KEYS if k not in info]
    if missing:
        raise InputError(f"{path} is damaged or from another hgc version (it lacks {missing}); {_REFIT}")
    if fold is not None and info["fold"] != fold:
        raise InputError(f"{path} describes fold '{info['fold']}', not '{fold}' (moved by hand?); {_REFIT}")
    if info.get("format", MODEL_FORMAT) != MODEL_FORMAT or info.get("format_version", 1) > MODEL_FORMAT_VERSION:
        raise InputError(f"{path} is a model of format {info.get('format')!r} version {info.get('format_version')!r}; "
                         f"this hgc reads {MODEL_FORMAT} version {MODEL_FORMAT_VERSION}: upgrade hgc, or {_REFIT}")
    return ModelBundle(folder, info)


def open_model(path: str | Path) -> ModelBundle:
    """The model at ``path``: a bundle, a run folder with one fold, or the folder of ``hgc train``."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model {path} does not exist (write one with `hgc train`, or use a fold folder of `hgc fit`)")
    if (path / FOLD_INFO).is_file():
        return read_bundle(path)
    if (path / RUN_RECORD).is_file() or not (path / "model" / RUN_RECORD).is_file():
        run = open_run(path)
    else:  # an `hgc train` / `hgc run` folder: its run is model/
        run = open_run(path / "model")
    if len(run.folds) != 1:
        raise InputError(f"run {run.path} holds {len(run.folds)} models; name one of them: "
                         + ", ".join(str(run.fold_dir(f)) for f in run.folds))
    return run.bundle(run.folds[0])


@dataclass
class Run:
    """A complete run folder, as its completion record describes it."""

    path: Path
    record: dict[str, Any]
    folds: list[str]  # folds with a model
    skipped: dict[str, str] = field(default_factory=dict)  # fold -> why it has no model

    @property
    def backend(self) -> str:
        return str(self.record.get("backend", "auto"))

    def fold_dir(self, fold: str) -> Path:
        return self.path / safe_name(fold)

    def bundle(self, fold: str) -> ModelBundle:
        """The model of a trained fold."""
        if fold not in self.folds:
            why = f" ({self.skipped[fold]})" if fold in self.skipped else ""
            raise InputError(f"run {self.path} has no model for fold '{fold}'{why}; its models: {self.folds}")
        return read_bundle(self.fold_dir(fold), fold)

    def fold_info(self, fold: str) -> dict[str, Any]:
        """``fold.json`` of a trained fold, with every key checked."""
        return self.bundle(fold).info

    def tensor_digest(self) -> str:
        """sha256 of every fold's tensors (names, dtypes, shapes, values) and fold.json.

        Checkpoint files of identical trainings differ in their metadata's byte order, so a cache
        keyed on the model compares what the model *is*, not the file.
        """
        h = hashlib.sha256()
        for fold in self.folds:
            bundle = self.bundle(fold)
            h.update(fold.encode() + b"\0")
            info = {k: v for k, v in bundle.info.items() if k != "write_id"}  # what, not which write
            h.update(json.dumps(info, sort_keys=True).encode())
            state = bundle.checkpoint()
            for name in sorted(state):
                t = state[name].contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.cpu().numpy().tobytes())
        return h.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{what}: {path} is missing; {_REFIT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{what}: cannot read {path} ({exc}); {_REFIT}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} does not hold a JSON object; {_REFIT}")
    return data


def open_run(path: str | Path) -> Run:
    """The run at ``path``; a missing, interrupted, damaged or foreign folder is one InputError."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"run folder {path} does not exist (write one with `hgc fit`)")
    record_file = path / RUN_RECORD
    if not record_file.is_file():
        raise InputError(f"{path} is not a complete hgc run (no {RUN_RECORD}: was `hgc fit` interrupted?); {_REFIT}")
    record = _read_json(record_file, f"run {path}")
    if record.get("format") != FORMAT:
        if "fit" in record:
            raise InputError(f"run {path} was written by hgc 0.1, which kept no completion record; {_REFIT}")
        raise InputError(f"{path} is not an hgc run folder ({record_file} is not an hgc run record)")
    check_format_version(record.get("format_version"), FORMAT_VERSION, f"run {path}", f"upgrade hgc, or {_REFIT}")
    folds, skipped = record.get("folds"), record.get("skipped", {})
    if not isinstance(folds, list) or not isinstance(skipped, dict):
        raise InputError(f"run {path}: {record_file} is damaged (folds or skipped malformed); {_REFIT}")
    return Run(path, record, [str(f) for f in folds], {str(k): str(v) for k, v in skipped.items()})


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds an hgc run (any version), which a new fit may replace."""
    try:
        record = json.loads((path / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and (record.get("format") == FORMAT or "fit" in record)


def user_entries(folder: Path) -> list[Path]:
    """Entries of a run folder that hgc did not write: kept when the run is replaced."""
    try:
        record = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
        folds = [*record.get("folds", []), *record.get("skipped", {})]
    except (OSError, ValueError, TypeError, AttributeError):
        folds = []
    ours = {RUN_RECORD, *(safe_name(str(f)) for f in folds)}
    fold_files = {CHECKPOINT, FOLD_INFO, HISTORY}  # a fold folder of any hgc version, even half-written
    return [e for e in folder.iterdir()
            if e.name not in ours and not is_temporary(e.name)
            and not (e.is_dir() and any((e / f).exists() for f in fold_files))]


def save_checkpoint(state: dict, path: Path) -> None:
    """Serialise in memory, then write with Python's file I/O (whose failures carry an errno)."""
    from safetensors.torch import save

    path.write_bytes(save(state, metadata={"format": "pt", "hgc_version": __version__}))


def load_checkpoint(path: Path) -> dict:
    """Tensors of a safetensors checkpoint; a missing or damaged file is one InputError."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; {_REFIT}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InputError(f"checkpoint {path} is damaged or truncated ({type(exc).__name__}: {exc}); {_REFIT}") from None


def write_fold(folder: Path, state: dict, history: Sequence[dict[str, float]], info: dict[str, Any],
               bank: "ReferenceBank | None" = None) -> None:
    """One fold's model bundle (inside a run being built); fold.json goes last."""
    from ..graph.bank import write_bank

    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, folder / CHECKPOINT)
    if bank is not None:
        write_bank(bank, folder / BANK)
    with open(folder / HISTORY, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)
    info = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "hgc_version": __version__,
            "write_id": uuid.uuid4().hex, **info}
    (folder / MODEL_CARD).write_text(model_card(info, bank))
    (folder / FOLD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def early_stopping(info: dict[str, Any]) -> str:
    """Which slides chose the model's epoch, and its score there (from a bundle's fold.json)."""
    val, block = info.get("best_val_pcc"), info.get("validation_block")
    where = ", ".join(info["validation_slides"]) or (
        f"band {block['band'] + 1} of {block['n_bands']} of {block['slide']} ({block['n_spots']} spots held out)"
        if block else "no validation slide (last epoch kept)")
    if val is None:
        return where
    members = info.get("members") or []
    if len(members) > 1:
        epochs = ", ".join(str(m["best_epoch"]) for m in members)
        return f"{where}, validation PCC-ALL {val:.4f} of the {len(members)}-seed ensemble (members' epochs {epochs})"
    return f"{where}, validation PCC-ALL {val:.4f} at epoch {info['best_epoch']}"


def model_card(info: dict[str, Any], bank: "ReferenceBank | None") -> str:
    """A short human-readable description of a model bundle."""
    enc = info.get("encoder") or {}
    lines = [
        f"# hgc model `{info['fold']}`",
        "",
        f"SpaHGC (heterogeneous graph contrastive learning), hgc {info['hgc_version']}; predicts "
        f"{len(info['genes'])} genes ({info['normaliser'].get('name', '?')} space) from H&E.",
        "",
        f"- Trained on: {', '.join(info['train_slides'])} (protocol {info['protocol']}; seed {info['seed']})",
        f"- Early stopping on: {early_stopping(info)}",
        f"- Held out: {', '.join(info['test_slides']) or 'none'}",
        f"- Image features: {describe_embedding(enc)}",
        f"- Spot geometry of the training slides: {info.get('platform', 'unknown')}"
        + (f"; their images down to {info['image_mpp']:.2f} µm/px (coarser targets are warned about)"
           if info.get("image_mpp") else ""),
        f"- Reference bank: {bank.n_ref if bank is not None else 0} spots of "
        f"{', '.join(bank.slides) if bank is not None else 'no slide'}",
        f"- Model: {info['model'].get('layers')} layers of {info['model'].get('hidden')}, relations "
        f"{', '.join(info['model'].get('relations', []))}, contrast {info['model'].get('contrast')}"
        + (f"; a seed ensemble of {info['ensemble']} (predictions carry their spread as layers['uncertainty'])"
           if info.get("ensemble", 1) > 1 else ""),
        "",
        "Predict new slides with `hgc predict <this folder> TARGETS.tsv --out PRED/`.",
    ]
    return "\n".join(lines) + "\n"


def write_record(folder: Path, folds: Sequence[str], skipped: dict[str, str], **facts: Any) -> None:
    """The completion record, written last into a run being built."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "hgc_version": __version__,
              "write_id": uuid.uuid4().hex, **facts, "folds": list(folds), "skipped": dict(skipped)}
    write_text(folder / RUN_RECORD, json.dumps(record, indent=2) + "\n")
