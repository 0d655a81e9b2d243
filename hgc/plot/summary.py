"""The run summary figure: how each method did, gene by gene and slide by slide.

Three panels from the prediction folders of one run (several folders = several seeds of it):
the distribution of per-gene PCC over every scored slide and gene, per method (the model beside
the baselines); PCC-ALL per slide and method, with the standard deviation over seeds as error bars
when several seeds ran; and the number of constant genes (no PCC) per slide and method.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: One colour per method, the model first (colour-blind-safe Okabe-Ito order).
METHOD_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#999999", "#CC79A7", "#D55E00", "#56B4E9")


@dataclass
class RunScores:
    """Per-gene PCC of every method on every scored slide, one array per seed (prediction folder)."""

    protocol: str
    space: str
    pcc: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)  # method -> slide -> [seed]

    @property
    def methods(self) -> list[str]:
        from ..evaluate.report import ordered_methods

        return ordered_methods(self.pcc)

    @property
    def slides(self) -> list[str]:
        return sorted({s for by_slide in self.pcc.values() for s in by_slide})


def read_scores(folders: Sequence[str | Path]) -> RunScores:
    """Score every prediction with observed expression in ``folders`` (seeds of one run)."""
    from ..evaluate.metrics import pearson_per_gene
    from ..evaluate.predictions import open_predictions, read_prediction

    scores: RunScores | None = None
    genes: list[str] | None = None
    for folder in folders:
        for method, files in open_predictions(folder).files.items():
            for slide, path in sorted(files.items()):
                p = read_prediction(path)
                if p.observed is None:
                    continue
                if scores is None:
                    scores = RunScores(p.protocol, p.space)
                elif (p.protocol, p.space) != (scores.protocol, scores.space):
                    raise InputError(f"{path} is a {p.protocol} prediction in {p.space}, others are {scores.protocol} "
                                     f"in {scores.space}: a summary compares seeds of one run")
                if genes is None:
                    genes = [str(g) for g in p.genes]
                elif [str(g) for g in p.genes] != genes:
                    raise InputError(f"{path} predicts other genes ({len(p.genes)}) than the first file read "
                                     f"({len(genes)}): a summary compares seeds of one run")
                scores.pcc.setdefault(method, {}).setdefault(slide, []).append(pearson_per_gene(p.observed, p.predicted))
    if scores is None:
        raise InputError(f"no prediction in {', '.join(map(str, folders))} has observed expression to score")
    return scores


def _seed_mean(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """Per-gene mean over seeds of the defined PCCs; NaN for a gene constant in every seed."""
    stack = np.stack(per_seed)
    defined = np.isfinite(stack)
    total = np.where(defined, stack, 0.0).sum(axis=0)
    count = defined.sum(axis=0)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def plot_summary(folders: Sequence[str | Path], out: str | Path, *, dpi: int = 100) -> Path:
    """Draw the run summary of ``folders`` (one per seed) to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..evaluate.metrics import nan_mean
    from .maps import check_figure_path, save_figure

    out = Path(out)
    check_figure_path(out)
    scores = read_scores(folders)
    methods, slides = scores.methods, scores.slides
    n_seeds = max(len(v) for by_slide in scores.pcc.values() for v in by_slide.values())
    colours = {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(methods)}

    fig = Figure(figsize=(min(4.0 + 1.8 * len(slides), 24.0), 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_genes, ax_slides, ax_const = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, max(len(slides), 2) * 0.5, 1.4]})

    # 1. per-gene PCC (mean over seeds) pooled over slides, per method
    pooled = {m: np.concatenate([_seed_mean(v) for v in scores.pcc[m].values()]) for m in methods}
    shown = [m for m in methods if np.isfinite(pooled[m]).any()]
    if shown:
        data = [pooled[m][np.isfinite(pooled[m])] for m in shown]
        parts = ax_genes.violinplot(data, showmeans=False, showextrema=False)
        for body, m in zip(parts["bodies"], shown):
            body.set_facecolor(colours[m])
            body.set_alpha(0.6)
        ax_genes.boxplot(data, widths=0.15, showfliers=False, medianprops={"color": "black"})
        ax_genes.scatter(range(1, len(shown) + 1), [d.mean() for d in data], color="white", edgecolor="black",
                         zorder=3, s=18, label="mean")
        ax_genes.set_xticks(range(1, len(shown) + 1), shown, fontsize=8)
    ax_genes.axhline(0, color="grey", lw=0.6)
    ax_genes.set_ylabel("PCC per gene and slide", fontsize=8)
    ax_genes.set_title("per-gene PCC", fontsize=9)

    # 2. PCC-ALL per slide, std over seeds as error bars
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(slides))
    for i, m in enumerate(methods):
        per_seed = [[nan_mean(r) for r in scores.pcc[m].get(s, [])] for s in slides]
        mean = np.array([nan_mean(v) if v else np.nan for v in per_seed])
        std = np.array([np.nanstd(v) if len(v) > 1 else 0.0 for v in per_seed])
        ax_slides.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width,  # NaN (no PCC): no bar
                      yerr=std if n_seeds > 1 else None, color=colours[m], label=m, capsize=2)
    ax_slides.set_xticks(x, slides, fontsize=8)
    ax_slides.axhline(0, color="grey", lw=0.6)
    ax_slides.set_ylabel("PCC-ALL", fontsize=8)
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax_slides.set_title(f"PCC-ALL per held-out slide ({seeds})", fontsize=9)
    ax_slides.legend(fontsize=7, ncols=min(len(methods), 4), loc="upper right", frameon=False)

    # 3. constant genes (no PCC) per method, summed over slides, mean over seeds
    n_genes = len(next(iter(next(iter(scores.pcc.values())).values()))[0])
    constant = [np.mean([sum(int(np.isnan(v[k]).sum()) for v in scores.pcc[m].values() if k < len(v))
                         for k in range(n_seeds)]) for m in methods]
    bars = ax_const.bar(range(len(methods)), constant, color=[colours[m] for m in methods])
    ax_const.bar_label(bars, [f"{c:.0f}" for c in constant], fontsize=7)
    ax_const.set_xticks(range(len(methods)), methods, fontsize=8)
    ax_const.set_ylabel(f"genes × slides (of {n_genes} × {len(slides)})", fontsize=8)
    ax_const.set_title("constant genes (PCC undefined)", fontsize=9)
    for ax in (ax_genes, ax_slides, ax_const):
        ax.tick_params(labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"{scores.protocol}: {len(slides)} held-out slides, {len(methods)} methods, {scores.space} expression",
                 fontsize=10)
    save_figure(fig, out, dpi)
    log.info("wrote %s (%s; %d slides, %d seed(s))", out, ", ".join(methods), len(slides), n_seeds)
    return out
