"""The embedding HDF5 file: one complete group per slide, robust to a run killed at any moment.

An HDF5 file being written when its process is killed can be left unreadable, so the output file
is never modified in place. Each finished slide goes to its own file in ``<out>.parts/``
(written under a temporary name, flushed, fsynced, then renamed); at the end of a run the kept
groups of the old output and the new parts are copied into ``<out>.tmp<pid>``, which replaces
the output atomically. A killed run leaves the previous output intact plus the finished parts,
which the next run reuses; half-written temporary files are deleted on the next start.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: Attributes that must all match for stored embeddings to be reused.
KEY_ATTRS = ("encoder", "weights_sha256", "patch_mode", "patch_um", "patch_px", "resample", "input_sha256")


def group_name(slide_id: str) -> str:
    """HDF5 group name of a slide (``/`` would nest groups, so it is percent-encoded)."""
    return quote(slide_id, safe="")


def read_embeddings(path: str | Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(barcodes (n,) str objects, embeddings (n, d) float32) of one slide."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"embedding file not found: {path} (create it with `hgc embed`)")
    with h5py.File(path, "r") as f:
        name = group_name(slide_id)
        if name not in f:
            have = ", ".join(unquote(k) for k in f) or "none"
            raise InputError(f"slide '{slide_id}' is not in embedding file {path} (slides there: {have})")
        g = f[name]
        if not g.attrs.get("complete", False):
            raise InputError(f"embeddings of slide '{slide_id}' in {path} are incomplete; rerun `hgc embed`")
        return g["barcodes"].asstr()[()].astype(object), g["embeddings"][()]


def read_attrs(path: str | Path) -> dict[str, dict[str, object]]:
    """Attributes of every complete slide group in an embedding file, by slide id."""
    import h5py

    with h5py.File(path, "r") as f:
        return {unquote(k): dict(g.attrs) for k, g in f.items() if g.attrs.get("complete", False)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some platforms
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_h5(path: Path) -> Iterator["h5py.File"]:  # noqa: F821
    """An HDF5 file that appears at ``path`` only once fully written and on disk."""
    import h5py

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _write_group(f, slide_id: str, barcodes: np.ndarray, embeddings: np.ndarray, attrs: dict) -> None:
    import h5py

    g = f.create_group(group_name(slide_id))
    g.create_dataset("embeddings", data=np.ascontiguousarray(embeddings, dtype=np.float32))
    g.create_dataset("barcodes", data=np.asarray(barcodes).astype(str).astype(object), dtype=h5py.string_dtype())
    g.attrs.update({**attrs, "complete": True})


def _mismatch(stored: dict, key: dict, n_barcodes: int, barcodes: np.ndarray | None) -> str | None:
    """Why stored embeddings cannot stand for the requested ones (None: they can)."""
    if not stored.get("complete", False):
        return "its group is incomplete"
    for k in KEY_ATTRS:
        old, new = stored.get(k), key.get(k)
        if isinstance(old, bytes):
            old = old.decode()
        if isinstance(old, np.generic):
            old = old.item()
        if old != new:
            return f"{k} differs (stored {old!r}, now {new!r})"
    if barcodes is not None and len(barcodes) != n_barcodes:
        return "the number of spots differs"
    return None


class EmbeddingStore:
    """Reads, reuses and writes the per-slide groups of one output file during one run.

    Holds an exclusive lock (POSIX) on the parts folder, so two runs cannot write one output.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self._lock_fd: int | None = None

    def __enter__(self) -> "EmbeddingStore":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        self._lock()
        for stale in [*self.path.parent.glob(f"{self.path.name}.tmp*"), *self.parts.glob("*.tmp*")]:
            log.info("removing %s left by an interrupted run", stale)
            stale.unlink(missing_ok=True)
        if self.path.exists():
            try:
                read_attrs(self.path)
            except Exception as exc:
                raise InputError(
                    f"{self.path} exists but is not a readable embedding file ({exc}); move or "
                    "delete it, or choose another --out"
                ) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one run per output is the rule
            return
        self._lock_fd = os.open(self.parts, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise InputError(f"another `hgc embed` is writing {self.path}; wait for it to finish") from None

    def _part(self, slide_id: str) -> Path:
        return self.parts / f"{group_name(slide_id)}.h5"

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
                    name = group_name(slide_id)
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

    def write(self, slide_id: str, barcodes: np.ndarray, embeddings: np.ndarray, attrs: dict) -> None:
        """Save one finished slide durably, as its own part file."""
        with atomic_h5(self._part(slide_id)) as f:
            _write_group(f, slide_id, barcodes, embeddings, attrs)

    def commit(self) -> None:
        """Merge the output's other groups and every part into a new output, atomically."""
        import h5py

        parts = sorted(self.parts.glob("*.h5"))
        if parts:
            fresh = {p.name[: -len(".h5")] for p in parts}
            with atomic_h5(self.path) as dst:
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
