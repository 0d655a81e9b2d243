"""The ``hgc`` command line: a thin layer over the Python API.

Every command's failures that a user can fix (:class:`hgc.errors.HgcError`) become a one-line
message and exit status 1, never a traceback.
"""
from __future__ import annotations

import logging

import click

from .. import __version__
from .._devices import DEVICE_HELP, check_device
from .._outputs import os_error_message
from ..errors import HgcError


class _Group(click.Group):
    """Problems a user can fix become one line and exit status 1: hgc's own errors, and file-system
    failures (full disk, read-only folder, no permission, name too long) wherever they happen."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HgcError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # not from one of hgc's writers (those raise InputError): word it neutrally
            message = os_error_message(exc, writing=False)
            if message is None:
                raise
            raise click.ClickException(message) from None


class DeviceType(click.ParamType):
    """A device name, checked when the command line is parsed."""

    name = "device"

    def convert(self, value, param, ctx):
        try:
            return check_device(value)
        except HgcError as exc:
            self.fail(str(exc), param, ctx)


DEVICE = DeviceType()


def device_option(default: str | None = "auto", purpose: str = ""):
    return click.option("--device", type=DEVICE, default=default, show_default=default is not None,
                        help=f"{purpose}{DEVICE_HELP}.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hgc")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """hgc: spatial gene expression from H&E histology (SpaHGC: heterogeneous graph contrastive learning).

    Typical flow: 'hgc data inspect' a manifest, 'hgc embed' the spots' image patches,
    'hgc build-graph', 'hgc fit', 'hgc predict', 'hgc evaluate' — or 'hgc run' for all of it.
    """
    from .._distributed import DISTRIBUTED_COMMANDS, ranks

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    command = click.get_current_context().invoked_subcommand
    if ranks().distributed and command not in DISTRIBUTED_COMMANDS:
        raise click.ClickException(f"'hgc {command}' runs in one process; under torchrun only "
                                   f"{' and '.join(f'hgc {c}' for c in DISTRIBUTED_COMMANDS)} share their work")


data_root_option = click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding datasets by name (default: $HGC_DATA, else ~/.cache/hgc).",
)


def _register_all() -> None:
    import importlib

    for area in ("data", "fetch", "embed", "graph", "train", "plot"):
        try:
            module = importlib.import_module(f"{__name__}.{area}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{area}":
                raise
            continue
        module.register(main)


_register_all()
