"""click options generated from config dataclasses (fields marked with :func:`hgc._options.option`).

Each option takes its name, type, default and choices from the field, so a default changed in a
config is the command line's default too (a test compares them); :func:`config_kwargs` turns the
parsed values back into the config's keyword arguments.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

import click

from .._devices import DEVICE_HELP
from .._options import Option


def exposed_fields(cls: type, skip: Collection[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that carry command-line metadata, minus ``skip``."""
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata and f.name not in skip]


def _base_type(cls: type, name: str) -> type:
    """The field's type without ``None`` (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) or hint


def _click_type(base: type, spec: Option) -> Any:
    if spec.device:
        from . import DEVICE

        return DEVICE
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    if base is int:
        return click.IntRange(min=int(spec.minimum)) if spec.minimum is not None else click.INT
    if base is float:
        return click.FloatRange(min=spec.minimum) if spec.minimum is not None else click.FLOAT
    return click.STRING


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def config_options(cls: type, skip: Collection[str] = (), required: Collection[str] = (),
                   defaults: Mapping[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per exposed field of ``cls`` (in field order).

    ``required`` fields have no default on this command; ``defaults`` replaces a field's default
    for this command only (say why where it is used).
    """
    def decorate(command: Callable) -> Callable:
        for f in reversed(exposed_fields(cls, skip)):
            command = _field_option(cls, f, f.name in required, (defaults or {}).get(f.name, _default(f)))(command)
        return command

    return decorate


def _field_option(cls: type, f: dataclasses.Field, required: bool, default: Any) -> Callable:
    spec: Option = f.metadata["cli"]
    flag = spec.name or "--" + f.name.replace("_", "-")
    base = _base_type(cls, f.name)
    help_text = spec.help + (DEVICE_HELP + "." if spec.device else "")
    if base is bool:
        names = spec.flag or f"{flag}/--no-{flag[2:]}"
        return click.option(names, f.name, default=default, show_default=default is not None, help=help_text)
    if spec.multiple:
        return click.option(flag, f.name, multiple=True, type=_click_type(str, spec), help=help_text)
    if spec.csv:
        return click.option(flag, f.name, default=None if default is None else ",".join(default), help=help_text)
    if spec.zero_means_none:
        default = 0 if default is None else default
    if required:
        return click.option(flag, f.name, required=True, type=_click_type(base, spec), help=help_text)
    return click.option(flag, f.name, default=default, show_default=default is not None,
                        type=_click_type(base, spec), help=help_text)


def config_kwargs(cls: type, values: Mapping[str, Any], skip: Collection[str] = (),
                  keep_defaults: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from parsed option ``values`` (csv and repeated options as
    tuples, 0 as None where it means None). With ``keep_defaults=False`` options the user did not
    set are left out (so that, e.g., a preset's defaults apply)."""
    ctx = click.get_current_context(silent=True)
    out: dict[str, Any] = {}
    for f in exposed_fields(cls, skip):
        if f.name not in values:
            continue
        if not keep_defaults and ctx is not None and \
                ctx.get_parameter_source(f.name) == click.core.ParameterSource.DEFAULT:
            continue
        spec: Option = f.metadata["cli"]
        value = values[f.name]
        if spec.csv:
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if value else None
        elif spec.multiple:
            value = tuple(value) or None
        elif spec.zero_means_none and value == 0:
            value = None
        out[f.name] = value
    return out
