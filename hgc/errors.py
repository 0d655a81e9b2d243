"""Exceptions hgc raises for problems a user can fix.

The CLI prints these as one line (no traceback), so messages must name the slide, the file and
what was expected, in words a biologist understands.
"""
from __future__ import annotations


class HgcError(Exception):
    """Base class of every error hgc raises on purpose."""


class InputError(HgcError, ValueError):
    """A file, manifest, slide or option is missing, malformed or inconsistent."""


class MissingDependencyError(HgcError, ImportError):
    """An optional package (an extra of hgc) is needed for this operation."""


class PeerFailedError(HgcError, RuntimeError):
    """Another process of a distributed (torchrun) run stopped; its own message says why."""
