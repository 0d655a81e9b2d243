"""Gene maps of one slide: observed beside predicted expression, spot by spot, over the H&E.

One row per gene: the slide's best and worst predicted genes (by Pearson r across its spots) and
any genes asked for, each row with one colour scale and one colour bar naming the expression
space, so observed and predicted are read on the same scale. Spots are drawn at their true size
(``spot_diameter_fullres`` when the file records it, else half the centre-to-centre distance, as
on legacy ST and Visium) in image-pixel coordinates with the y axis pointing down, as on the H&E.
A slide with no observed expression gets predicted maps only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: Longest side, in pixels, of the H&E drawn under the spots (a full slide is ~10k px wide).
MAX_UNDERLAY_PX = 1200
#: Genes per kind drawn when none are named: the best and the worst predicted.
N_BEST = N_WORST = 3


@dataclass
class PlotInput:
    """What one figure shows: a slide's spots, genes and expression, and its image if known."""

    path: Path
    method: str
    slide: str
    space: str
    genes: list[str]
    coords: np.ndarray  # (n, 2) image pixels (x, y)
    predicted: np.ndarray  # (n, G)
    observed: np.ndarray | None  # (n, G)
    image: Path | None
    image_scale: float
    spatial: dict[str, Any] | None  # uns["spatial"][slide]: hires image and scale factors

    def pcc(self) -> np.ndarray:
        """Per-gene Pearson r across the slide's spots (NaN without observed expression)."""
        from ..evaluate.metrics import pearson_per_gene

        if self.observed is None:
            return np.full(len(self.genes), np.nan)
        return pearson_per_gene(self.observed, self.predicted)

    def spot_diameter(self) -> float:
        """Spot diameter in full-resolution pixels."""
        recorded = (self.spatial or {}).get("scalefactors", {}).get("spot_diameter_fullres")
        if recorded:
            return float(recorded)
        return 0.5 * spot_pitch(self.coords)


def prediction_folder(source: str | Path) -> Path:
    """The prediction folder ``source`` is, or holds as ``predictions/`` (a run folder)."""
    from ..evaluate.predictions import RECORD as PREDICTIONS

    source = Path(source)
    for folder in (source, source / "predictions"):
        if (folder / PREDICTIONS).is_file():
            return folder
    raise InputError(f"{source} is neither a prediction folder (with {PREDICTIONS}) nor a run folder with "
                     "predictions/; run `hgc predict` or `hgc run` first")


def find_prediction(source: str | Path, slide: str | None = None, method: str = "hgc") -> Path:
    """The prediction file itself, or the file of ``method`` and ``slide`` in a prediction or run folder.

    ``slide`` may be omitted when the method's predictions cover exactly one slide.
    """
    from ..evaluate.predictions import open_predictions

    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise InputError(f"{source} is neither a prediction .h5ad file nor a prediction folder")
    source = prediction_folder(source)
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
    from ..evaluate.predictions import read_prediction

    path = Path(path)
    p = read_prediction(path)
    return PlotInput(
        path=path, method=p.method, slide=p.slide, space=p.space, genes=[str(g) for g in p.genes],
        coords=p.coords[:, :2], predicted=p.predicted, observed=p.observed,
        image=Path(p.image) if p.image else None, image_scale=p.image_scale, spatial=p.spatial,
    )


def choose_genes(data: PlotInput, genes: Sequence[str] = (), best: int = N_BEST, worst: int = N_WORST
                 ) -> list[tuple[str, str]]:
    """(gene, why) per row: the ``best`` and ``worst`` genes by PCC on the slide, then ``genes``.

    Without observed expression there is no PCC: the ``best`` genes whose predictions vary most
    across the slide stand in.
    """
    index = {g: j for j, g in enumerate(data.genes)}
    missing = [g for g in genes if g not in index]
    if missing:
        shown = ", ".join(data.genes[:10]) + (", ..." if len(data.genes) > 10 else "")
        raise InputError(f"genes {missing} are not in prediction file {data.path} ({len(data.genes)} genes: {shown})")
    rows: list[tuple[str, str]] = []
    if data.observed is not None:
        r = data.pcc()
        scored = np.flatnonzero(~np.isnan(r))
        order = scored[np.argsort(-r[scored], kind="stable")]
        rows += [(data.genes[j], "best") for j in order[:best]]
        rows += [(data.genes[j], "worst") for j in order[::-1][:worst] if j not in order[:best]]
    else:
        spread = data.predicted.std(axis=0)
        rows += [(data.genes[j], "most variable prediction") for j in np.argsort(-spread, kind="stable")[:best]]
    rows = [(g, why) for g, why in rows if g not in set(genes)] + [(g, "asked for") for g in genes]
    if not rows:
        raise InputError(f"no gene to draw for {data.path}; name some with --genes")
    return rows


def _underlay(data: PlotInput, max_px: int) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """The H&E at most ``max_px`` a side with its extent in full-resolution pixels: the file's own
    ``hires`` image when it has one, else the recorded image file, downsampled."""
    spatial = data.spatial or {}
    hires = spatial.get("images", {}).get("hires")
    scale = spatial.get("scalefactors", {}).get("tissue_hires_scalef")
    if hires is not None and scale:
        h, w = hires.shape[:2]
        return np.asarray(hires), (0.0, w / scale, h / scale, 0.0)
    if data.image is None:
        return None
    from ..data.image import SlideImage

    img = SlideImage(data.image, data.image_scale)
    try:
        pixels = img.thumbnail(max_px)
        width, height = img.size
    except InputError as exc:
        log.warning("%s: H&E underlay left out: %s", data.path, exc)
        return None
    return pixels, (0.0, float(width), float(height), 0.0)


def spot_pitch(coords: np.ndarray) -> float:
    """Median distance to the nearest other spot (the spot grid's centre-to-centre distance)."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    pitch = float(np.median(dist[:, 1]))
    return pitch if pitch > 0 else 1.0


def draw_spots(ax, coords: np.ndarray, values: np.ndarray, diameter: float, norm, cmap: str = "viridis"):
    """Spots as circles of ``diameter`` data units (true size at any figure size); returns the collection."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(coords), diameter)
    spots = EllipseCollection(d, d, np.zeros(len(coords)), units="xy", offsets=coords,
                              offset_transform=ax.transData, cmap=cmap, norm=norm, linewidths=0)
    spots.set_array(np.asarray(values, dtype=np.float64))
    ax.add_collection(spots)
    return spots


def figure_formats() -> dict[str, str]:
    """File extensions matplotlib can write, with their names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg(Figure()).get_supported_filetypes()


def check_figure_path(out: Path) -> str:
    """The format of figure ``out`` (its extension), refused if matplotlib cannot write it."""
    formats = figure_formats()
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise InputError(f"cannot write a figure as {out}: its extension is not one of {', '.join(sorted(formats))}")
    return fmt


def save_figure(fig, out: Path, dpi: int) -> Path:
    """Write ``fig`` to ``out`` atomically (a failed write leaves no partial figure)."""
    from .._outputs import atomic_file

    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format=check_figure_path(out))
    return out


def draw_slide(data: PlotInput, rows: Sequence[tuple[str, str]], out: Path, *, underlay: bool = True,
               panel_inches: float = 2.6, dpi: int = 100, max_underlay_px: int = MAX_UNDERLAY_PX) -> Path:
    """The gene-map figure of ``data`` for ``rows`` (:func:`choose_genes`), written to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    index = {g: j for j, g in enumerate(data.genes)}
    pcc = data.pcc()
    panels = [("observed", data.observed), (f"predicted ({data.method})", data.predicted)]
    panels = [(label, m) for label, m in panels if m is not None]
    background = _underlay(data, max_underlay_px) if underlay else None
    diameter = data.spot_diameter()
    lo, hi = data.coords.min(0) - diameter, data.coords.max(0) + diameter
    aspect = float(np.clip((hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9), 0.4, 2.5))
    fig = Figure(figsize=(panel_inches * len(panels) + 0.9, (panel_inches * aspect + 0.4) * len(rows) + 0.3),
                 dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(panels) + 1, squeeze=False,
                        gridspec_kw={"width_ratios": [1.0] * len(panels) + [0.05]})
    for row, (gene, why) in enumerate(rows):
        j = index[gene]
        values = np.concatenate([m[:, j] for _, m in panels])
        vmin, vmax = np.percentile(values, [1, 99])
        norm = Normalize(vmin=float(vmin), vmax=float(vmax if vmax > vmin else vmin + 1e-6))
        spots = None
        for c, (label, matrix) in enumerate(panels):
            ax = axes[row, c]
            if background is not None:
                ax.imshow(background[0], extent=background[1], interpolation="bilinear")
            spots = draw_spots(ax, data.coords, matrix[:, j], diameter, norm)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])  # image orientation: y grows downwards
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{gene} {label}"
            if c == len(panels) - 1 and data.observed is not None:
                title += f"\nPCC {'n/a (constant)' if np.isnan(pcc[j]) else f'{pcc[j]:.3f}'} ({why})"
            elif data.observed is None:
                title += f"\n{why}; no observed expression"
            ax.set_title(title, fontsize=8)
        fig.colorbar(spots, cax=axes[row, -1]).set_label(f"{data.space} expression", fontsize=7)
        axes[row, -1].tick_params(labelsize=6)
    fig.suptitle(f"slide {data.slide} ({len(data.coords)} spots)", fontsize=9)
    return save_figure(fig, out, dpi)


def plot_prediction(
    source: str | Path,
    genes: Sequence[str],
    out: str | Path,
    *,
    slide: str | None = None,
    method: str = "hgc",
    best: int = 0,
    worst: int = 0,
    underlay: bool = True,
    panel_inches: float = 2.6,
    dpi: int = 100,
    max_underlay_px: int = MAX_UNDERLAY_PX,
) -> Path:
    """Draw one slide's maps of ``genes`` (and its ``best``/``worst`` genes); write ``out`` (PNG, PDF, SVG).

    ``source`` is a prediction file or a prediction folder (with ``slide`` and ``method``).
    """
    from .._outputs import check_writable, command_line, output_lock

    out = Path(out)
    check_figure_path(out)
    check_writable(out)
    data = read_plot_input(find_prediction(source, slide, method))
    if not genes and not best and not worst:
        raise InputError("no genes to plot; name some with --genes")
    rows = choose_genes(data, genes, best, worst)
    with output_lock(out, command_line()):
        draw_slide(data, rows, out, underlay=underlay, panel_inches=panel_inches, dpi=dpi,
                   max_underlay_px=max_underlay_px)
    log.info("wrote %s (%d genes, slide %s, method %s)", out, len(rows), data.slide, data.method)
    return out
