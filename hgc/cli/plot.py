"""``hgc plot``: gene maps over the H&E and the run summary figure."""
from __future__ import annotations

from pathlib import Path

import click

from ..plot.maps import N_BEST, N_WORST


def register(main: click.Group) -> None:
    @main.command("plot")
    @click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
    @click.option("--out", required=True, type=click.Path(),
                  help="A figure file (.png, .pdf, .svg) for one prediction file; else the figure folder.")
    @click.option("--genes", default="",
                  help="Comma-separated gene symbols to draw besides the best and worst, e.g. ERBB2,KRT19.")
    @click.option("--best", type=click.IntRange(min=0), default=N_BEST, show_default=True,
                  help="Best predicted genes per slide (by PCC; the most variable predictions if unobserved).")
    @click.option("--worst", type=click.IntRange(min=0), default=N_WORST, show_default=True,
                  help="Worst predicted genes per slide (by PCC).")
    @click.option("--slide", "slides", multiple=True, help="Slide to draw (repeatable; default: every slide).")
    @click.option("--method", default="hgc", show_default=True, help="Method whose predictions are mapped.")
    @click.option("--format", "fmt", default="png", show_default=True, help="Figure format in a figure folder.")
    @click.option("--no-image", is_flag=True, help="Do not draw the H&E under the spots.")
    @click.option("--dpi", type=click.IntRange(min=10), default=100, show_default=True)
    def plot_command(sources, out, genes, best, worst, slides, method, fmt, no_image, dpi) -> None:
        """Draw SOURCES: run folders, prediction folders (several = seeds of one run) or one prediction .h5ad.

        For folders, OUT is a figure folder: per slide, observed beside predicted expression of its
        best and worst predicted genes (and --genes) over the H&E, one colour bar per row, the PCC
        in the title; and summary.png, per-gene PCC per method, PCC-ALL per slide (± std over the
        seeds given) and constant genes. For one .h5ad file, or one --slide of a folder with OUT a
        .png/.pdf/.svg/.jpg file, OUT is that slide's figure.
        """
        from ..errors import InputError
        from ..plot import plot_prediction, plot_run
        from ..plot.maps import figure_formats

        names = [g.strip() for g in genes.split(",") if g.strip()]
        one_figure = Path(out).suffix.lstrip(".").lower() in figure_formats()
        if one_figure and (len(sources) > 1 or len(slides) > 1):
            raise InputError(f"--out {out} is one figure; give a folder to draw several slides or seeds")
        if len(sources) == 1 and (Path(sources[0]).is_file() or one_figure):
            path = plot_prediction(sources[0], names, out, slide=slides[0] if slides else None, method=method,
                                   best=best, worst=worst, underlay=not no_image, dpi=dpi)
            click.echo(f"wrote {path}")
            return
        files = plot_run(sources, out, method=method, genes=names, best=best, worst=worst, slides=slides or None,
                         underlay=not no_image, dpi=dpi, fmt=fmt)
        click.echo(f"wrote {len(files)} figures to {out}")
