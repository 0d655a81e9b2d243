"""What a config field means to a user: the one description the command line is generated from.

A config dataclass marks each field a user may set with ``field(..., metadata=option("help"))``;
:mod:`hgc.cli.options` turns those fields into click options whose names, types, defaults and
choices come from the dataclass itself, so no default or choice list is written twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """How a field appears on the command line (everything else comes from the field)."""

    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # smallest allowed value of a number
    flag: str | None = None  # a boolean's "--on/--off" spelling (default: "--name/--no-name")
    csv: bool = False  # a tuple of names given as one comma-separated value
    zero_means_none: bool = False  # a whole number where 0 on the command line stands for None
    name: str | None = None  # the option's spelling when it is not the field's name ("--fold")
    multiple: bool = False  # a tuple given by repeating the option
    device: bool = False  # a torch device name, checked when the command line is parsed


def option(help: str, **kw: Any) -> dict[str, Option]:
    """Field metadata exposing the field as a command-line option (see :class:`Option`)."""
    return {"cli": Option(help, **kw)}
