"""Records read back from files: dataclasses rebuilt from JSON with every key checked.

A file written by another hgc version may lack a field or carry one this version does not know;
both are refused with one line naming the file, never a ``TypeError`` traceback or a silently
dropped setting.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import InputError

T = TypeVar("T")
C = TypeVar("C", bound="ConfigRecord")


class ConfigRecord:
    """``to_dict`` / ``from_dict`` of a config dataclass: the one JSON form of a config.

    ``to_dict`` gives tuples as lists (as JSON reads them back, so stored and live settings compare
    equal); ``from_dict`` fills missing options with the defaults and refuses unknown ones. The
    config's own ``__post_init__`` checks every value.
    """

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{cls.__name__} has unknown options {unknown}; known: {sorted(known)}")
        return cls(**d)


@contextlib.contextmanager
def open_h5(path: str | Path, what: str, fmt: str, version: int, rebuild: str, create: str,
            unformatted_ok: bool = False) -> Iterator[Any]:
    """One of hgc's HDF5 files opened for reading (an ``h5py.File``), its format and version
    checked: a missing, unreadable, foreign, newer or damaged file is one :class:`InputError`
    naming ``what`` (e.g. "graph file") and the file, and saying how to make it (``create``) or
    make it again (``rebuild``). ``unformatted_ok``: files of hgc 0.1, which wrote no format, pass.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path} ({create})")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"cannot read {what} {path} as HDF5 ({exc}); {rebuild}") from None
    try:
        found = f.attrs.get("format")
        found = found.decode() if isinstance(found, bytes) else found
        if found != fmt and not (found is None and unformatted_ok):
            raise InputError(f"{path} is not an hgc {what} (its format is {found!r}, expected '{fmt}'); {create}")
        if found is not None:
            check_format_version(f.attrs.get("format_version"), version, f"{what} {path}",
                                 f"upgrade hgc, or {rebuild}")
        yield f
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, OSError) as exc:  # json errors are ValueErrors
        raise InputError(f"{what} {path} is damaged or incomplete ({type(exc).__name__}: {exc}); {rebuild}") from None
    finally:
        f.close()


def check_format_version(version: Any, supported: int, what: str, hint: str) -> None:
    """Refuse a file whose format version this hgc cannot read: missing, not a whole number, or newer
    than ``supported`` (``what`` names the file in the message, ``hint`` says what to do)."""
    version = version.item() if isinstance(version, np.generic) else version
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= supported:
        raise InputError(f"{what} has format version {version!r}; this hgc reads version {supported}: {hint}")


def record_from_dict(cls: type[T], data: Any, where: str, hint: str = "") -> T:
    """``cls(**data)`` for a dataclass ``cls``, refusing unknown and missing keys.

    ``where`` names the source in the message (e.g. ``"graph file g.h5, fold 'F'"``); ``hint``
    says how to fix it (e.g. ``"rebuild it with `hgc build-graph`"``). Errors the dataclass's own
    ``__post_init__`` raises keep their text, prefixed with ``where``.
    """
    tail = f"; {hint}" if hint else ""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a JSON object, found {type(data).__name__}{tail}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    required = {f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where} has field(s) {unknown} this hgc version does not know (written by a newer hgc?){tail}")
    missing = sorted(required - set(data))
    if missing:
        raise InputError(f"{where} lacks field(s) {missing}{tail}")
    try:
        return cls(**data)
    except InputError as exc:
        raise InputError(f"{where}: {exc}{tail}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} holds a malformed value ({exc}){tail}") from None
