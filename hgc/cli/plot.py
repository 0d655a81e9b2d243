"""``hgc plot``: observed vs predicted expression on the slide, one row per gene."""
from __future__ import annotations

import click


def register(main: click.Group) -> None:
    @main.command("plot")
    @click.argument("source", type=click.Path(exists=True))
    @click.option("--genes", required=True, help="Comma-separated gene symbols, e.g. ERBB2,KRT19.")
    @click.option("--slide", default=None, help="Slide to draw when SOURCE is a prediction folder.")
    @click.option("--method", default="hgc", show_default=True, help="Method folder when SOURCE is a prediction folder.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="Figure to write (.png, .pdf, .svg).")
    @click.option("--no-image", is_flag=True, help="Do not draw the H&E under the spots.")
    @click.option("--dpi", type=click.IntRange(min=10), default=100, show_default=True)
    def plot_command(source: str, genes: str, slide: str | None, method: str, out: str, no_image: bool, dpi: int) -> None:
        """Draw SOURCE (a prediction .h5ad, or a folder PRED_DIR/<method>/<slide>.h5ad) to OUT.

        One row per gene: observed and predicted expression per spot, titled with the gene's
        Pearson r on the slide, over the H&E when the prediction file records its path.
        """
        from ..plot import plot_prediction

        names = [g.strip() for g in genes.split(",") if g.strip()]
        path = plot_prediction(source, names, out, slide=slide, method=method, underlay=not no_image, dpi=dpi)
        click.echo(f"wrote {path}")
