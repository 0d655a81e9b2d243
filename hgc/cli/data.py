"""``hgc data``: inspect and fetch datasets."""
from __future__ import annotations

import json

import click

from . import data_root_option


@click.group("data")
def data_group() -> None:
    """Inspect dataset manifests and download public datasets."""


@data_group.command("inspect")
@click.argument("manifest", type=click.Path(dir_okay=False))
@data_root_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per slide.")
def inspect_command(manifest: str, data_root: str | None, as_json: bool) -> None:
    """Read and validate every slide of MANIFEST; print one row per slide.

    MANIFEST is a TSV/CSV with columns slide, patient, format and the format's file columns
    (see the README). Any problem stops with a message naming the slide and the file.
    """
    from ..data.inspect import inspect_manifest

    rows = inspect_manifest(manifest, root=data_root)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    header = f"{'slide':<12} {'patient':<10} {'spots':>7} {'genes':>7} {'image (w x h)':>16} {'µm/px':>8}  source"
    click.echo(header)
    for r in rows:
        size = f"{r.image_width} x {r.image_height}" if r.image_width else "-"
        click.echo(
            f"{r.slide:<12} {r.patient:<10} {r.n_spots:>7} {r.n_genes:>7} {size:>16} "
            f"{r.microns_per_pixel:>8.4f}  {r.mpp_source}"
        )
    click.echo(f"{len(rows)} slides, {sum(r.n_spots for r in rows)} spots")


def register(main: click.Group) -> None:
    main.add_command(data_group)
