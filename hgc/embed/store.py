"""The embedding HDF5 file: one complete group per slide, robust to a run killed at any moment.

An HDF5 file being written when its process is killed can be left unreadable, so the output file
is never modified in place. Each finished slide goes to its own file in ``<out>.parts/``
(written under a temporary name, flushed, fsynced, then renamed); at the end of a run the kept
groups of the old output and the new parts are copied into a temporary file beside the output,
which replaces it atomically. A killed run leaves the previous output intact plus the finished
parts, which the next run reuses; the next run also deletes the killed run's temporary files.

Root attributes ``format`` / ``format_version`` identify the file; files of hgc 0.1 (without
them) have the same layout and are read as version 1.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote

import numpy as np

from .._outputs import atomic_h5, check_writable, command_line, is_temporary, output_lock, safe_name
from .._records import open_h5
from ..errors import InputError

log = logging.getLogger(__name__)

FORMAT = "hgc-embeddings"
FORMAT_VERSION = 1
#: Attributes that must all match for stored embeddings to be reused.
KEY_ATTRS = ("encoder", "weights_sha256", "patch_mode", "patch_um", "patch_px", "patch_mpp", "patch_context", "patch_tta",
             "resample", "input_sha256")
_REBUILD = "rebuild it with `hgc embed` (delete it first)"


def attr_value(v: Any) -> Any:
    """An HDF5 attribute as plain Python: text for bytes, numbers and lists for NumPy values."""
    v = v.decode() if isinstance(v, bytes) else v
    return v.tolist() if isinstance(v, (np.generic, np.ndarray)) else v


def describe_embedding(attrs: Mapping[str, Any]) -> str:
    """How embeddings were made, in words, from their recorded settings (a slide's attributes, or a
    model bundle's ``encoder``): for reports and model cards."""
    attrs = {k: attr_value(v) for k, v in attrs.items()}
    native = attrs.get("patch_mode") == "native-px"
    width = f"{attrs.get('patch_box_px', 0):g} px" if native else f"{attrs.get('patch_um', 0):g} µm"
    parts = [f"encoder {attrs.get('encoder', 'unknown')} (weights sha256 {str(attrs.get('weights_sha256', '?'))[:12]}...)",
             f"patches of {width} at {attrs.get('patch_px', '?')} px"]
    if attrs.get("patch_mpp"):
        parts.append(f"brought down to {float(attrs['patch_mpp']):.2f} µm/px")
    if attrs.get("patch_context"):
        parts.append(f"with fields of view {', '.join(f'{float(c):g}' for c in attrs['patch_context'])} times as wide")
    if attrs.get("patch_tta"):
        mirrored = int(attrs["patch_tta"]) == 8
        parts.append(f"each the mean over its 4 rotations{' and their mirror images' if mirrored else ''}")
    return ", ".join(parts)


def _open(path: str | Path):
    """An embedding file opened for reading (see :func:`hgc._records.open_h5`; hgc 0.1's files,
    which carry no format attributes, are read too)."""
    return open_h5(path, "embedding file", FORMAT, FORMAT_VERSION, _REBUILD, "create it with `hgc embed`",
                   unformatted_ok=True)


def _group(f, path: Path, slide_id: str):
    """The complete group of ``slide_id``, with both datasets of matching length."""
    name = safe_name(slide_id)
    if name not in f:
        have = ", ".join(unquote(k) for k in f) or "none"
        raise InputError(f"slide '{slide_id}' is not in embedding file {path} (slides there: {have})")
    g = f[name]
    if not g.attrs.get("complete", False):
        raise InputError(f"embeddings of slide '{slide_id}' in {path} are incomplete; rerun `hgc embed`")
    missing = [d for d in ("embeddings", "barcodes") if d not in g]
    if missing:
        raise InputError(f"embedding file {path}: slide '{slide_id}' lacks {', '.join(missing)}; {_REBUILD}")
    if g["embeddings"].ndim != 2 or g["embeddings"].shape[0] != g["barcodes"].shape[0]:
        raise InputError(
            f"embedding file {path}: slide '{slide_id}' holds {g['embeddings'].shape} embeddings for "
            f"{g['barcodes'].shape[0]} barcodes; {_REBUILD}"
        )
    return g


def read_embeddings(path: str | Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(barcodes (n,) str objects, embeddings (n, d) float32) of one slide."""
    path = Path(path)
    with _open(path) as f:
        g = _group(f, path, slide_id)
        return g["barcodes"].asstr()[()].astype(object), g["embeddings"][()]


def read_attrs(path: str | Path) -> dict[str, dict[str, object]]:
    """Attributes of every complete slide group in an embedding file, by slide id."""
    with _open(path) as f:
        return {unquote(k): dict(g.attrs) for k, g in f.items() if g.attrs.get("complete", False)}


def _write_group(f, slide_id: str, barcodes: np.ndarray, embeddings: np.ndarray, attrs: dict) -> None:
    import h5py

    g = f.create_group(safe_name(slide_id))
    g.create_dataset("embeddings", data=np.ascontiguousarray(embeddings, dtype=np.float32))
    g.create_dataset("barcodes", data=np.asarray(barcodes).astype(str).astype(object), dtype=h5py.string_dtype())
    g.attrs.update({**attrs, "complete": True})


def _mark_format(f) -> None:
    f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})


def _mismatch(stored: dict, key: dict, n_barcodes: int, barcodes: np.ndarray | None) -> str | None:
    """Why stored embeddings cannot stand for the requested ones (None: they can)."""
    if not stored.get("complete", False):
        return "its group is incomplete"
    for k in KEY_ATTRS:
        old, new = attr_value(stored.get(k)), key.get(k)
        if old != new:
            return f"{k} differs (stored {old!r}, now {new!r})"
    if barcodes is not None and len(barcodes) != n_barcodes:
        return "the number of spots differs"
    return None


class EmbeddingStore:
    """Reads, reuses and writes the per-slide groups of one output file during one run.

    Holds the output's lock (see :func:`hgc._outputs.output_lock`) for the whole run, so two runs
    cannot write one output; a parts folder left empty by a failed run is removed on exit. In a
    distributed run only the main process is the ``owner`` (it locks, cleans and commits); the
    others only read the cache and write their slides' parts, after the owner has entered.
    """

    def __init__(self, path: str | Path, owner: bool = True) -> None:
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.owner = owner
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "EmbeddingStore":
        if not self.owner:
            return self
        if self.path.is_dir():
            raise InputError(f"{self.path} is a folder; --out names the embedding file to write "
                             f"(e.g. {self.path / 'embeddings.h5'})")
        check_writable(self.path)
        self._stack.enter_context(output_lock(self.path, command_line()))
        try:
            if self.parts.is_dir():
                for stale in [p for p in self.parts.iterdir() if is_temporary(p.name)]:
                    log.info("removing %s left by an interrupted run", stale)
                    stale.unlink(missing_ok=True)
            if self.path.exists():
                try:
                    read_attrs(self.path)
                except InputError as exc:
                    raise InputError(
                        f"{self.path} exists but is not a readable embedding file ({exc}); move or "
                        "delete it, or choose another --out"
                    ) from None
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.owner:
            return
        try:
            if self.parts.is_dir() and not any(self.parts.iterdir()):
                self.parts.rmdir()
        finally:
            self._stack.close()

    def _part(self, slide_id: str) -> Path:
        return self.parts / f"{safe_name(slide_id)}.h5"

    def cached(self, slide_id: str, key: dict, barcodes: np.ndarray) -> str | None:
        """Where reusable embeddings of the slide are (``"output"``/``"part"``), else None.

        Mismatches are logged with their reason: different settings never reuse silently.
        """
        import h5py

        for where, file in (("part", self._part(slide_id)), ("output", self.path)):
            if not file.exists():
                continue
            try:
                with h5py.File(file, "r") as f:
                    name = safe_name(slide_id)
                    if name not in f:
                        continue
                    g = f[name]
                    why = _mismatch(dict(g.attrs), key, g["embeddings"].shape[0], barcodes)
                    if why is None and not np.array_equal(g["barcodes"].asstr()[()], barcodes.astype(str)):
                        why = "its spot barcodes differ"
            except Exception as exc:  # e.g. a part damaged by a disk error: recompute it
                why = f"{file} is unreadable ({exc})"
            if why is None:
                return where
            log.warning("slide '%s': recomputing embeddings: %s", slide_id, why)
            return None
        return None

    def image_record(self, slide_id: str) -> dict | None:
        """The image record (path, size, times, sha256) kept with a slide's stored embeddings, if any."""
        import h5py

        for file in (self._part(slide_id), self.path):
            try:
                with h5py.File(file, "r") as f:
                    text = f[safe_name(slide_id)].attrs.get("image_record")
            except (OSError, KeyError):
                continue
            if text is not None:
                try:
                    return json.loads(text)
                except ValueError:
                    return None
        return None

    def write(self, slide_id: str, barcodes: np.ndarray, embeddings: np.ndarray, attrs: dict) -> None:
        """Save one finished slide durably, as its own part file."""
        self.parts.mkdir(exist_ok=True)
        nbytes = int(np.asarray(embeddings).size) * 4 + 64 * len(barcodes)
        with atomic_h5(self._part(slide_id), nbytes) as f:
            _mark_format(f)
            _write_group(f, slide_id, barcodes, embeddings, attrs)

    def commit(self) -> None:
        """Merge the output's other groups and every part into a new output, atomically."""
        import h5py

        if not self.owner:
            raise RuntimeError("only the owner of an embedding store commits it")

        parts = sorted(self.parts.glob("*.h5")) if self.parts.is_dir() else []
        if parts:
            fresh = {p.name[: -len(".h5")] for p in parts}
            nbytes = sum(p.stat().st_size for p in parts) + (self.path.stat().st_size if self.path.exists() else 0)
            with atomic_h5(self.path, nbytes) as dst:
                _mark_format(dst)
                if self.path.exists():
                    with h5py.File(self.path, "r") as old:
                        for name in old:
                            if name not in fresh:
                                old.copy(old[name], dst, name=name)
                for p in parts:
                    with h5py.File(p, "r") as src:
                        for name in src:
                            src.copy(src[name], dst, name=name)
            log.info("wrote %s (%d new or updated slide(s))", self.path, len(parts))
        shutil.rmtree(self.parts, ignore_errors=True)
