"""Pictures of predictions: observed vs predicted expression per gene, spot by spot, on the slide.

A figure has one row per gene and one column each for the observed and the predicted expression
(only the predicted one when the file has no observed layer), titled with the gene and its
Pearson r across the slide's spots, so a reader sees at once where the model follows the tissue
and where it does not. Spots sit in image-pixel coordinates with the y axis pointing down, as on
the H&E, which is drawn underneath (downsampled for display) when the prediction file records
its path (``uns["image"]``, with ``uns["image_scale"]`` as for :class:`hgc.data.SlideImage`).

Drawing uses matplotlib's Agg canvas directly (no pyplot), so it changes no global backend state
and works without a display.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

#: Longest side, in pixels, of the H&E drawn under the spots (a full slide is ~10k px wide).
MAX_UNDERLAY_PX = 1200


@dataclass
class PlotInput:
    """What one figure shows: a slide's spots, genes and expression, and its image if known."""

    path: Path
    method: str
    slide: str
    genes: list[str]
    coords: np.ndarray  # (n, 2) image pixels (x, y)
    predicted: np.ndarray  # (n, G)
    observed: np.ndarray | None  # (n, G)
    image: Path | None
    image_scale: float


def find_prediction(source: str | Path, slide: str | None = None, method: str = "hgc") -> Path:
    """The prediction file itself, or the file of ``method`` and ``slide`` in a prediction folder.

    ``slide`` may be omitted when the method's predictions cover exactly one slide.
    """
    from .evaluate.predictions import open_predictions

    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise InputError(f"{source} is neither a prediction .h5ad file nor a prediction folder")
    files = open_predictions(source).files
    if method not in files:
        raise InputError(f"no predictions of method '{method}' in {source}; methods there: {sorted(files)}")
    available = sorted(files[method])
    if slide is None:
        if len(available) != 1:
            raise InputError(f"{source} holds slides {available}; choose one with --slide")
        slide = available[0]
    if slide not in files[method]:
        raise InputError(f"no prediction for slide '{slide}' in {source}/{method}; slides there: {available}")
    return files[method][slide]


def read_plot_input(path: str | Path) -> PlotInput:
    """A prediction file (:func:`hgc.evaluate.read_prediction`) and the H&E it records, if any."""
    from .evaluate.report import read_prediction

    path = Path(path)
    p = read_prediction(path)
    return PlotInput(
        path=path, method=p.method, slide=p.slide, genes=[str(g) for g in p.genes], coords=p.coords[:, :2],
        predicted=p.predicted, observed=p.observed, image=Path(p.image) if p.image else None,
        image_scale=p.image_scale,
    )


def _gene_columns(data: PlotInput, genes: Sequence[str]) -> list[int]:
    index = {g: j for j, g in enumerate(data.genes)}
    missing = [g for g in genes if g not in index]
    if missing:
        shown = ", ".join(data.genes[:10]) + (", ..." if len(data.genes) > 10 else "")
        raise InputError(f"genes {missing} are not in prediction file {data.path} ({len(data.genes)} genes: {shown})")
    if not genes:
        raise InputError("no genes to plot; name some with --genes")
    return [index[g] for g in genes]


def _underlay(data: PlotInput, max_px: int) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """The H&E downsampled to at most ``max_px`` a side, with its extent in full-resolution pixels."""
    if data.image is None:
        return None
    from .data.image import SlideImage

    img = SlideImage(data.image, data.image_scale)
    try:
        pixels = img.thumbnail(max_px)
        width, height = img.size
    except InputError as exc:
        log.warning("%s: H&E underlay left out: %s", data.path, exc)
        return None
    return pixels, (0.0, float(width), float(height), 0.0)


def _spot_pitch(coords: np.ndarray) -> float:
    """Median distance to the nearest other spot: the size a spot is drawn at."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    pitch = float(np.median(dist[:, 1]))
    return pitch if pitch > 0 else 1.0


def plot_prediction(
    source: str | Path,
    genes: Sequence[str],
    out: str | Path,
    *,
    slide: str | None = None,
    method: str = "hgc",
    underlay: bool = True,
    panel_inches: float = 4.0,
    dpi: int = 100,
    max_underlay_px: int = MAX_UNDERLAY_PX,
) -> Path:
    """Draw observed vs predicted expression of ``genes`` for one slide; write ``out`` (PNG, PDF, SVG).

    The figure is (columns x rows) panels of ``panel_inches`` at ``dpi``: 2 columns with observed
    expression, else 1; one row per gene.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ._outputs import atomic_file, check_writable, command_line, output_lock
    from .evaluate.metrics import pearson_per_gene

    out = Path(out)
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise InputError(f"cannot write a figure as {out}: its extension is not one of {', '.join(sorted(formats))}")
    check_writable(out)
    data = read_plot_input(find_prediction(source, slide, method))
    cols = _gene_columns(data, genes)
    pcc = (
        pearson_per_gene(data.observed[:, cols], data.predicted[:, cols])
        if data.observed is not None
        else np.full(len(cols), np.nan)
    )
    panels = [("observed", data.observed), (f"predicted ({data.method})", data.predicted)]
    panels = [(label, m) for label, m in panels if m is not None]
    background = _underlay(data, max_underlay_px) if underlay else None

    x, y = data.coords[:, 0], data.coords[:, 1]
    pitch = _spot_pitch(data.coords)
    lo, hi = data.coords.min(0) - pitch, data.coords.max(0) + pitch
    fig = Figure(figsize=(panel_inches * len(panels), panel_inches * len(cols)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cols), len(panels), squeeze=False)
    # Spot diameter in points: the panel's width in points over the data width it shows.
    points_per_px = 0.8 * panel_inches * 72 / max(hi[0] - lo[0], hi[1] - lo[1])
    size = (0.8 * pitch * points_per_px) ** 2
    for row, (gene, j, r) in enumerate(zip(genes, cols, pcc)):
        for c, (label, matrix) in enumerate(panels):
            ax = axes[row, c]
            if background is not None:
                ax.imshow(background[0], extent=background[1], interpolation="bilinear")
            sc = ax.scatter(x, y, c=matrix[:, j], s=size, cmap="viridis", linewidths=0)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])  # image orientation: y grows downwards
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if data.observed is None:  # a slide with no expression: nothing to correlate with
                score = "\nno observed expression"
            else:
                score = f"\nPCC = {'n/a' if np.isnan(r) else f'{r:.3f}'}" if c == len(panels) - 1 else ""
            ax.set_title(f"{gene} {label}{score}", fontsize=9)
            fig.colorbar(sc, ax=ax, shrink=0.7)
    fig.suptitle(f"slide {data.slide}", fontsize=10)
    with output_lock(out, command_line()), atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lstrip(".").lower())
    log.info("wrote %s (%d genes, slide %s, method %s)", out, len(cols), data.slide, data.method)
    return out
