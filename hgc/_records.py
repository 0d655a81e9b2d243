"""Records read back from files: dataclasses rebuilt from JSON with every key checked.

A file written by another hgc version may lack a field or carry one this version does not know;
both are refused with one line naming the file, never a ``TypeError`` traceback or a silently
dropped setting.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from .errors import InputError

T = TypeVar("T")


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
