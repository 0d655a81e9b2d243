"""Legacy Spatial Transcriptomics (ST): HER2+ (her2st) and cSCC (GSE144240) layouts.

Both ship a counts table whose spot ids are array positions ``"<x>x<y>"`` and a spot table
(``x y ... pixel_x pixel_y [selected]``) giving each spot's centre in the H&E image. The cSCC
spot tables store ``x``/``y`` as slightly perturbed floats, so spots are joined on the rounded
array position, as Hist2ST does.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputError
from ..checks import as_raw_counts
from ..entry import SlideEntry
from ..image import SlideImage
from ..slide import SPOT_PITCH_UM, Slide, check_slide
from ._common import existing, numeric_columns, reading

log = logging.getLogger(__name__)

_SPOT_ID = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")


def read_st(
    counts: str | Path | None,
    spots: str | Path,
    image: str | Path,
    *,
    slide: str,
    patient: str | None = None,
    microns_per_pixel: float | None = None,
    coord_scale: float | None = None,
    annotations: str | Path | None = None,
    expression: bool = True,
) -> Slide:
    """Read one legacy-ST section from its counts table, spot table and H&E image.

    Without ``counts`` the slide has spots and an image but no expression: a slide to predict.
    ``expression=False`` reads only the counts table's spot ids (which spots the slide has), not
    its values: the same spots, for work that needs only the image and positions (embedding).
    """
    spots, image = Path(spots), Path(image)
    spot_table = _read_spots(spots, slide)
    spot_ids = _array_ids((spot_table["x"] + "x" + spot_table["y"]).to_numpy(), spots, slide)
    spot_table = spot_table.assign(_id=spot_ids)
    dup = spot_table["_id"].duplicated(keep=False)
    if dup.any():
        raise InputError(
            f"slide '{slide}': spot table {spots} lists array position(s) "
            f"{', '.join(sorted(set(spot_table.loc[dup, '_id'])))[:200]} more than once"
        )
    spot_table = spot_table.set_index("_id")
    if counts is None:
        common, matrix, genes = spot_table.index, None, np.zeros(0, dtype=object)
    elif not expression:
        counts = Path(counts)
        common = _spots_with_counts(_read_count_ids(counts, slide), counts, spot_table, spots, slide)
        matrix, genes = None, np.zeros(0, dtype=object)
    else:
        counts = Path(counts)
        common, matrix, genes = _counts_of_spots(_read_counts(counts, slide), counts, spot_table, spots, slide)
    spot_rows = spot_table.loc[common]
    scale = coord_scale or 1.0
    coords = spot_rows[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64) * scale
    array_coords = np.rint(spot_rows[["ax", "ay"]].to_numpy(dtype=np.float64)).astype(np.int64)
    barcodes = np.asarray(common, dtype=object)
    mpp, source = (microns_per_pixel, "manifest") if microns_per_pixel else (
        _mpp_from_pitch(array_coords, coords, slide), "spot-pitch"
    )
    slide_obj = Slide(
        id=slide,
        patient=patient or slide,
        barcodes=barcodes,
        coords=coords,
        counts=matrix,
        genes=genes,
        microns_per_pixel=float(mpp),
        mpp_source=source,
        platform="st",
        image=SlideImage(image),
        array_coords=array_coords,
        source={"counts": str(counts) if counts is not None else "", "spots": str(spots), "image": str(image)},
    )
    if annotations is not None:
        slide_obj.annotations = annotation_table(Path(annotations), slide_obj.id, slide_obj.barcodes)
    check_slide(slide_obj)
    return slide_obj


def _counts_of_spots(table: pd.DataFrame, counts: Path, spot_table: pd.DataFrame, spots: Path, slide: str):
    """(spot ids with counts and a position, their counts as CSR, gene symbols)."""
    count_ids = _array_ids(table.index.to_numpy(), counts, slide)
    common = _spots_with_counts(count_ids, counts, spot_table, spots, slide)
    rows = pd.Series(np.arange(len(count_ids)), index=count_ids).loc[common].to_numpy()
    matrix = as_raw_counts(table.to_numpy()[rows], slide, counts, spots=np.asarray(common), genes=table.columns)
    return common, matrix, np.asarray(table.columns.astype(str), dtype=object)


def _spots_with_counts(count_ids: np.ndarray, counts: Path, spot_table: pd.DataFrame, spots: Path,
                       slide: str) -> pd.Index:
    """Ids of the spots that have both counts and a position, in the counts table's order."""
    common = pd.Index(count_ids).intersection(spot_table.index, sort=False)
    if len(common) == 0:
        raise InputError(
            f"slide '{slide}': the counts table {counts} and the spot table {spots} have no spot in "
            f"common (counts ids look like '{count_ids[0]}', spot table ids like '{spot_table.index[0]}'); "
            "expected ids '<x>x<y>' matching the spot table's x and y columns"
        )
    n_dropped = len(count_ids) - len(common)
    if n_dropped:
        log.warning("slide %s: %d spot(s) of %s have no row in %s and are left out", slide, n_dropped, counts.name, spots.name)
    return common


def input_files(entry: SlideEntry) -> list[Path]:
    """The files a legacy-ST slide is read from (for content-keyed caches)."""
    return existing([entry.paths.get("counts"), entry.paths["spots"], entry.paths["image"], entry.annotations])


def from_entry(entry: SlideEntry, expression: bool = True) -> Slide:
    return read_st(entry.paths.get("counts"), entry.paths["spots"], entry.paths["image"], expression=expression,
                   **entry.reader_keywords())


def _read_counts(path: Path, slide: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"slide '{slide}': counts file not found: {path}")
    with reading(path, slide, "counts table"):
        table = pd.read_csv(path, sep="\t", index_col=0)
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise InputError(f"slide '{slide}': counts table {path} has no spots or no genes")
    index_is_ids = _SPOT_ID.match(str(table.index[0])) is not None
    if not index_is_ids and _SPOT_ID.match(str(table.columns[0])) is not None:
        table = table.T  # genes x spots (some GEO uploads)
    if table.index.duplicated().any():
        dups = table.index[table.index.duplicated()].unique()[:5]
        raise InputError(f"slide '{slide}': counts table {path} has duplicate spot ids: {', '.join(map(str, dups))}")
    text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if text:  # a value like "12,5" or "n/a" makes pandas read its whole column as text
        table[text] = numeric_columns(table, text, path, slide, row_name="spot")
    return table


def _read_count_ids(path: Path, slide: str) -> np.ndarray:
    """The spot ids of a counts table (either orientation) without parsing its values."""
    if not path.is_file():
        raise InputError(f"slide '{slide}': counts file not found: {path}")
    with reading(path, slide, "counts table"):
        first = pd.read_csv(path, sep="\t", usecols=[0], dtype=str, keep_default_na=False).iloc[:, 0]
        header = pd.read_csv(path, sep="\t", nrows=0).columns
    if len(first) == 0 or len(header) < 2:
        raise InputError(f"slide '{slide}': counts table {path} has no spots or no genes")
    if _SPOT_ID.match(str(first.iloc[0])) is None and _SPOT_ID.match(str(header[1])) is not None:
        ids = header[1:].to_numpy()  # genes x spots (some GEO uploads)
    else:
        ids = first.to_numpy()
    unique, n = np.unique(ids.astype(str), return_counts=True)
    if (n > 1).any():
        raise InputError(f"slide '{slide}': counts table {path} has duplicate spot ids: {', '.join(unique[n > 1][:5])}")
    return _array_ids(ids, path, slide)


def _read_spots(path: Path, slide: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"slide '{slide}': spot table not found: {path}")
    with reading(path, slide, "spot table"):
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in table.columns]
    if missing:
        raise InputError(
            f"slide '{slide}': spot table {path} lacks column(s) {', '.join(missing)}; "
            "expected columns x, y, pixel_x, pixel_y (and optionally selected)"
        )
    table.index = pd.Index((table["x"].str.strip() + "x" + table["y"].str.strip()).to_numpy(), name="spot")
    columns = ["x", "y", "pixel_x", "pixel_y"] + (["selected"] if "selected" in table.columns else [])
    values = numeric_columns(table, columns, path, slide, row_name="spot")
    # x / y as written (e.g. "12.04" in cSCC tables) make the ids; ax / ay hold them as numbers
    values = values.rename(columns={"x": "ax", "y": "ay"}).assign(
        x=table["x"].str.strip().to_numpy(), y=table["y"].str.strip().to_numpy())
    table = values[values["selected"].to_numpy() > 0] if "selected" in values else values
    if table.empty:
        raise InputError(f"slide '{slide}': spot table {path} has no spots under tissue (selected = 1)")
    return table


def _array_ids(ids: np.ndarray, path: Path, slide: str) -> np.ndarray:
    """Canonical '<x>x<y>' ids with integer (rounded) array positions."""
    parts = pd.Series(ids, dtype=str).str.extract(_SPOT_ID)
    bad = parts[0].isna()
    if bad.any():
        raise InputError(
            f"slide '{slide}': {path} has spot id(s) like '{ids[bad.to_numpy()][0]}'; "
            "expected '<x>x<y>' array positions"
        )
    xy = np.rint(parts.to_numpy(dtype=np.float64)).astype(np.int64)
    return np.char.add(np.char.add(xy[:, 0].astype(str), "x"), xy[:, 1].astype(str)).astype(object)


def _mpp_from_pitch(array_coords: np.ndarray, coords: np.ndarray, slide: str) -> float:
    """µm/px from the 200 µm ST spot pitch: pixel positions regressed on array positions."""
    slopes = []
    for axis in (0, 1):
        a = array_coords[:, axis].astype(np.float64)
        if np.ptp(a) == 0:
            continue
        slope = np.polyfit(a, coords[:, axis], 1)[0]
        slopes.append(abs(slope))
    if not slopes:
        raise InputError(
            f"slide '{slide}': cannot estimate microns per pixel from the spot grid (all spots in one row); "
            "give microns_per_pixel in the manifest"
        )
    return SPOT_PITCH_UM["st"] / float(np.mean(slopes))


def annotation_table(path: Path, slide_id: str, barcodes: np.ndarray) -> pd.DataFrame:
    """Per-spot labels joined on array position (her2st ``*-cluster-annotation.tsv.gz`` layout)."""
    if not path.is_file():
        raise InputError(f"slide '{slide_id}': annotation file not found: {path}")
    with reading(path, slide_id, "annotation table"):
        table = pd.read_csv(path, sep="\t")
    if not {"x", "y"} <= set(table.columns):
        raise InputError(f"slide '{slide_id}': annotation table {path} needs columns x and y")
    ids = _array_ids((table["x"].astype(str) + "x" + table["y"].astype(str)).to_numpy(), path, slide_id)
    keep = [c for c in table.columns if c not in ("x", "y", "pixel_x", "pixel_y", "warped_x", "warped_y", "Unnamed: 0")]
    table = table[keep].set_index(pd.Index(ids, name="barcode"))
    table = table[~table.index.duplicated()]
    table = table.reindex(pd.Index(barcodes, name="barcode"))
    if not table.notna().any(axis=1).any():
        raise InputError(f"slide '{slide_id}': no spot of annotation table {path} is a spot of the slide "
                         f"(its x, y should be array positions like '{barcodes[0]}')")
    return table
