"""Content fingerprints of input files, re-hashed only when a file's size or times change.

Caches (the pipeline's step stamps, the embedding file's per-slide keys) are keyed by the sha256
of what they read. Hashing a multi-gigabyte slide image at every run would cost more than the
check saves, so a record keeps the file's size, modification and change times beside its hash:
while all three are unchanged the recorded hash is trusted, otherwise the file is hashed again.
The change time (``ctime``) cannot be set by users, so an edit that restores the size and the
modification time is still noticed.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError

_HASHED: dict[tuple[str, tuple[int, int, int]], str] = {}  # (path, stat) -> sha256, in this process


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed (the one implementation: caches, downloads, weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{path, size, mtime_ns, ctime_ns, sha256} of ``path``; the hash comes from ``previous`` (a record
    of an earlier run) when path, size and both times are unchanged, else from the file."""
    path = Path(path)
    try:
        st = os.stat(path)
        trigger = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        key = (str(path), trigger)
        if previous and previous.get("path") == str(path) and \
                (previous.get("size"), previous.get("mtime_ns"), previous.get("ctime_ns")) == trigger:
            _HASHED[key] = str(previous["sha256"])
        if key not in _HASHED:
            _HASHED[key] = file_sha256(path)
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror or exc}); hgc reads it as an input") from None
    return {"path": str(path), "size": trigger[0], "mtime_ns": trigger[1], "ctime_ns": trigger[2], "sha256": _HASHED[key]}
