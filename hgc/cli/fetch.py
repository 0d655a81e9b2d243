"""``hgc data fetch``: download a public dataset, verified, and print where it went."""
from __future__ import annotations

import click

from ..data.fetch import DATASETS


@click.command("fetch")
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder to download into (default: the data root: $HGC_DATA, else ~/.cache/hgc).",
)
@click.option(
    "--base-url",
    default=None,
    help="Mirror to download from instead of GitHub, with the upstream file layout.",
)
def fetch_command(dataset: str, dest: str | None, base_url: str | None) -> None:
    """Download DATASET (her2st: six HER2+ sections and a manifest; hist2st-panels: the Hist2ST
    gene panels). Checksums are verified; an interrupted download resumes when run again."""
    from ..data.fetch import fetch_dataset
    from ..data.manifest import data_root

    path = fetch_dataset(dataset, data_root(dest), base_url=base_url)
    click.echo(str(path))


def register(main: click.Group) -> None:
    """Attach ``fetch`` to the ``data`` group (registered before this module)."""
    main.commands["data"].add_command(fetch_command)
