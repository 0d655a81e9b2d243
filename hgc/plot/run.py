"""``hgc plot RUN_DIR``: every figure of a run in one folder, written whole.

A source is a run folder (``hgc run``/``hgc train`` output, with ``predictions/``), a prediction
folder (``hgc predict``) or, several of them, the seeds of one run. The figure folder holds one
gene-map figure per slide (:mod:`.maps`, from the first source) and ``summary.png``
(:mod:`.summary`, over all sources), and its record ``figures.json``; it replaces an earlier
figure folder only once every figure is drawn.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..errors import InputError

log = logging.getLogger(__name__)

RECORD = "figures.json"
FORMAT = "hgc-figures"


def _ours(folder: Path) -> bool:
    try:
        return json.loads((folder / RECORD).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _not_ours(folder: Path) -> list[Path]:
    written = set(json.loads((folder / RECORD).read_text()).get("files", [])) | {RECORD}
    return [p for p in folder.iterdir() if p.name not in written]


def plot_run(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "hgc",
    genes: Sequence[str] = (),
    best: int = 3,
    worst: int = 3,
    slides: Sequence[str] | None = None,
    underlay: bool = True,
    dpi: int = 100,
    fmt: str = "png",
) -> list[Path]:
    """Draw the gene maps of ``method`` for each slide and the run summary into the folder ``out``."""
    from .._outputs import atomic_dir, check_replaceable_folder, command_line, output_lock, safe_name, write_text
    from .._progress import progress
    from ..evaluate.predictions import open_predictions
    from .maps import check_figure_path, choose_genes, draw_slide, prediction_folder, read_plot_input
    from .summary import plot_summary

    if not sources:
        raise InputError("no run or prediction folder to plot")
    folders = [prediction_folder(s) for s in sources]
    check_figure_path(Path(f"figure.{fmt}"))
    files = open_predictions(folders[0]).files
    if method not in files:
        raise InputError(f"no predictions of method '{method}' in {folders[0]}; methods there: {sorted(files)}")
    chosen = sorted(files[method]) if slides is None else list(slides)
    unknown = [s for s in chosen if s not in files[method]]
    if unknown:
        raise InputError(f"no prediction of slides {unknown} in {folders[0]}/{method}; slides there: {sorted(files[method])}")
    out = check_replaceable_folder(out, _ours, "hgc figure folder")
    written: list[str] = []
    with output_lock(out, command_line()), atomic_dir(out, keep=_not_ours) as tmp:
        for slide in progress(chosen, desc="gene maps", unit="slide"):
            data = read_plot_input(files[method][slide])
            name = f"{safe_name(slide)}.{fmt}"
            draw_slide(data, choose_genes(data, genes, best, worst), tmp / name, underlay=underlay, dpi=dpi)
            written.append(name)
        try:
            plot_summary(folders, tmp / f"summary.{fmt}", dpi=dpi)
            written.append(f"summary.{fmt}")
        except InputError as exc:  # predictions with no observed expression: maps only
            log.warning("no summary figure: %s", exc)
        write_text(tmp / RECORD, json.dumps({
            "format": FORMAT, "version": 1, "sources": [str(f.resolve()) for f in folders], "method": method,
            "files": written, "command": command_line(),
        }, indent=2) + "\n")
    log.info("wrote %d figures to %s", len(written), out)
    return [out / name for name in written]
