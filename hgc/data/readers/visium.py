"""10x Genomics Visium: a Space Ranger 1.x/2.x/3.x ``outs/`` folder as a :class:`Slide`.

Space Ranger has changed its file layout over versions (HDF5 vs Matrix Market matrix, positions
with or without a header, renamed positions file); users bring whichever their run produced, so
the reader accepts all of them and says which files it used.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import InputError
from ..checks import as_raw_counts
from ..entry import SlideEntry
from ..image import SlideImage
from ..slide import SPOT_DIAMETER_UM, Slide, check_slide
from ._common import attach_annotations, existing, make_unique, numeric_columns, reading, require_file

log = logging.getLogger(__name__)

#: Diameter of a Visium capture spot; with ``spot_diameter_fullres`` it gives microns per pixel.
VISIUM_SPOT_DIAMETER_UM = SPOT_DIAMETER_UM["visium"]

POSITION_COLUMNS = (
    "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres",
)
_GENE_EXPRESSION = "Gene Expression"


def read_visium(
    path: str | Path,
    *,
    slide: str | None = None,
    patient: str | None = None,
    image: str | Path | None = None,
    microns_per_pixel: float | None = None,
    coord_scale: float | None = None,
    annotations: str | Path | None = None,
    expression: bool = True,
) -> Slide:
    """Read a Space Ranger ``outs/`` folder: in-tissue spots of the filtered matrix.

    ``image`` is the full-resolution H&E given to Space Ranger; without it the hires (else lowres)
    PNG stands in, with its scale factor, so patches are cut at the right place but lower detail.
    ``coord_scale`` multiplies the positions when they are in another pixel space than ``image``.
    ``microns_per_pixel`` overrides the value derived from the 55 µm spot diameter.
    ``annotations``: a CSV/TSV of per-spot labels keyed by barcode (e.g. a Loupe export).
    ``expression=False`` reads the matrix's barcodes but not its counts (the same spots, for
    embedding, which needs only the image and positions).
    """
    outs = Path(path)
    slide_id = slide or (outs.parent.name if outs.name == "outs" else outs.name)
    if not outs.is_dir():
        raise InputError(
            f"slide '{slide_id}': Visium folder not found: {outs} (expected Space Ranger's outs/ "
            "folder holding filtered_feature_bc_matrix.h5 and spatial/)"
        )
    cs = float(coord_scale) if coord_scale else 1.0
    positions, positions_file = _read_positions(outs / "spatial", slide_id)
    if _has_matrix(outs) and not expression:
        barcodes, matrix_file = read_10x_barcodes(outs, slide_id)
        genes, counts = np.zeros(0, dtype=object), None
    elif _has_matrix(outs):
        barcodes, genes, counts, matrix_file = read_10x_matrix(outs, slide_id)
    else:  # spatial/ only: the in-tissue spots, to be predicted
        log.info("slide %s: no count matrix in %s; its spots are read without expression", slide_id, outs)
        barcodes = positions.index[positions["in_tissue"].to_numpy() == 1].to_numpy(dtype=object)
        genes, counts, matrix_file = np.zeros(0, dtype=object), None, positions_file
    sf_file = require_file(
        outs / "spatial" / "scalefactors_json.json", slide_id, "Visium scale factors file"
    )
    scalefactors = _read_scalefactors(sf_file, slide_id)

    in_tissue = positions.index[positions["in_tissue"].to_numpy() == 1]
    keep = pd.Index(barcodes).isin(in_tissue)
    if not keep.any():
        raise InputError(
            f"slide '{slide_id}': no barcode of {matrix_file} is an in-tissue spot of "
            f"{positions_file} (expected the matrix and the positions of the same Space Ranger run)"
        )
    if not keep.all():
        log.warning(
            "slide %s: %d of %d matrix barcodes are not in-tissue spots of %s; dropped",
            slide_id, int((~keep).sum()), keep.size, positions_file.name,
        )
    barcodes, counts = barcodes[keep], (counts[keep] if counts is not None else None)
    pos = positions.loc[barcodes]
    coords = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64) * cs

    genes = make_unique(genes, slide_id, matrix_file)
    slide_image, image_file = _choose_image(outs, image, scalefactors, sf_file, slide_id, cs)
    if microns_per_pixel:
        mpp, mpp_source = float(microns_per_pixel), "manifest"
    else:
        diameter = _scalefactor(scalefactors, "spot_diameter_fullres", sf_file, slide_id)
        mpp, mpp_source = VISIUM_SPOT_DIAMETER_UM / (diameter * cs), "format"
    log.info(
        "slide %s: %d in-tissue spots x %d genes from %s, %.4g µm/px (%s)",
        slide_id, barcodes.size, genes.size, matrix_file, mpp, mpp_source,
    )
    result = Slide(
        id=slide_id,
        patient=str(patient or slide_id),
        barcodes=barcodes,
        coords=coords,
        counts=counts,
        genes=genes,
        microns_per_pixel=mpp,
        mpp_source=mpp_source,
        platform="visium",
        image=slide_image,
        array_coords=pos[["array_row", "array_col"]].to_numpy(np.int64),
        source={
            "format": "visium",
            "counts": str(matrix_file) if counts is not None else "",
            "positions": str(positions_file),
            "scalefactors": str(sf_file),
            "image": str(image_file) if image_file else "",
        },
    )
    if annotations is not None:
        attach_annotations(result, Path(annotations))
    check_slide(result)
    return result


def input_files(entry: SlideEntry) -> list[Path]:
    """The files a Visium slide may be read from (for content-keyed caches): every matrix,
    positions, scale-factor and image file Space Ranger leaves in ``outs/``, plus the manifest's."""
    outs = Path(entry.paths["path"])
    spatial = outs / "spatial"
    mtx = outs / "filtered_feature_bc_matrix"
    names = ["tissue_positions.csv", "tissue_positions_list.csv", "scalefactors_json.json",
             "tissue_hires_image.png", "tissue_lowres_image.png"]
    return existing([outs / "filtered_feature_bc_matrix.h5", *(sorted(mtx.iterdir()) if mtx.is_dir() else []),
                     *(spatial / n for n in names), entry.paths.get("image"), entry.annotations])


def from_entry(entry: SlideEntry, expression: bool = True) -> Slide:
    """Adapter for ``FORMATS['visium'].read``: manifest columns ``path`` (outs/) and optional ``image``."""
    return read_visium(entry.paths["path"], image=entry.paths.get("image"), expression=expression,
                       **entry.reader_keywords())


def _has_matrix(outs: Path) -> bool:
    return (outs / "filtered_feature_bc_matrix.h5").is_file() or (outs / "filtered_feature_bc_matrix").is_dir()


def read_10x_matrix(
    outs: Path, slide: str
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, Path]:
    """(barcodes, gene symbols, barcodes x genes raw counts (float32 CSR), file) of the matrix.

    The HDF5 file is preferred; the Matrix Market folder is the fallback (Space Ranger writes
    both, users often keep only one). Only "Gene Expression" features are kept.
    """
    h5 = outs / "filtered_feature_bc_matrix.h5"
    mtx = outs / "filtered_feature_bc_matrix"
    if h5.is_file():
        barcodes, names, types, counts = _read_10x_h5(h5, slide)
        source = h5
    elif mtx.is_dir():
        barcodes, names, types, counts = _read_10x_mtx(mtx, slide)
        source = mtx
    else:
        raise InputError(
            f"slide '{slide}': Visium count matrix not found in {outs} (expected "
            "filtered_feature_bc_matrix.h5 or the folder filtered_feature_bc_matrix/)"
        )
    if types is not None:
        is_gene = types == _GENE_EXPRESSION
        if not is_gene.all():
            log.info(
                "slide %s: dropped %d non-'Gene Expression' features (%s)",
                slide, int((~is_gene).sum()), ", ".join(sorted(set(types[~is_gene]))),
            )
        names, counts = names[is_gene], counts[:, is_gene]
    return barcodes, names, as_raw_counts(counts, slide, source, spots=barcodes, genes=names), source


def read_10x_barcodes(outs: Path, slide: str) -> tuple[np.ndarray, Path]:
    """(barcodes, file) of the filtered matrix, reading neither its counts nor its features."""
    h5 = outs / "filtered_feature_bc_matrix.h5"
    if h5.is_file():
        import h5py

        with reading(h5, slide, "10x HDF5 matrix"):
            with h5py.File(h5, "r") as f:
                groups = ["matrix"] if "matrix" in f else [k for k in f if isinstance(f[k], h5py.Group)]
                if len(groups) != 1 or "barcodes" not in f[groups[0]]:
                    raise InputError(f"slide '{slide}': {h5} is not a 10x feature-barcode matrix (no matrix/barcodes)")
                return _as_str(f[groups[0]]["barcodes"][:]), h5
    folder = outs / "filtered_feature_bc_matrix"
    barcodes_file = _find(folder, ("barcodes.tsv",), slide)
    with reading(barcodes_file, slide, "barcode list"):
        barcodes = pd.read_csv(barcodes_file, sep="\t", header=None, dtype=str)[0]
    return barcodes.to_numpy(dtype=object), folder


def _as_str(values) -> np.ndarray:
    """HDF5 strings (fixed-length or variable-length bytes, or str) to an object array of str."""
    arr = np.asarray(values)
    if arr.dtype.kind == "O" and arr.size and isinstance(arr.flat[0], bytes):
        arr = arr.astype("S")
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    return arr.astype(str).astype(object)


def _read_10x_h5(path: Path, slide: str):
    """10x HDF5: ``matrix/`` (Cell/Space Ranger >= 3 layout, also Space Ranger 1.x) or the
    older one-group-per-genome layout (``<genome>/genes``, ``gene_names``)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                grp = f["matrix"]
                names = _as_str(grp["features/name"][:])
                has_types = "feature_type" in grp["features"]
                types = _as_str(grp["features/feature_type"][:]) if has_types else None
            else:
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if len(groups) != 1:
                    raise KeyError(f"one genome group or 'matrix' (found {groups})")
                grp = f[groups[0]]
                names, types = _as_str(grp["gene_names"][:]), None
            n_genes, n_barcodes = (int(v) for v in grp["shape"][:])
            counts = sp.csr_matrix(
                (grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=(n_barcodes, n_genes)
            )
            barcodes = _as_str(grp["barcodes"][:])
    except KeyError as exc:
        raise InputError(
            f"slide '{slide}': {path} is not a 10x feature-barcode matrix (missing {exc}; "
            "expected datasets matrix/data, indices, indptr, shape, barcodes, features/name)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - h5py/scipy raise many types for a damaged matrix
        raise InputError(f"slide '{slide}': cannot read 10x HDF5 matrix {path}: {type(exc).__name__}: {exc}") from None
    return barcodes, names, types, counts


def _find(folder: Path, stems: tuple[str, ...], slide: str) -> Path:
    for stem in stems:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise InputError(
        f"slide '{slide}': {folder / (stems[0] + '.gz')} not found "
        f"(expected one of {', '.join(stems)}, gzipped or not, in the Matrix Market folder)"
    )


def _read_10x_mtx(folder: Path, slide: str):
    """10x Matrix Market folder: matrix.mtx (genes x barcodes), features.tsv, barcodes.tsv."""
    from scipy.io import mmread

    matrix_file = _find(folder, ("matrix.mtx",), slide)
    features_file = _find(folder, ("features.tsv", "genes.tsv"), slide)
    barcodes_file = _find(folder, ("barcodes.tsv",), slide)
    with reading(matrix_file, slide, "Matrix Market counts"):
        counts = sp.csr_matrix(mmread(str(matrix_file)).T)
    with reading(features_file, slide, "feature list"):
        features = pd.read_csv(features_file, sep="\t", header=None, dtype=str)
    with reading(barcodes_file, slide, "barcode list"):
        barcodes = pd.read_csv(barcodes_file, sep="\t", header=None, dtype=str)[0]
    if counts.shape != (len(barcodes), len(features)) or features.shape[1] < 2:
        raise InputError(
            f"slide '{slide}': {matrix_file} is {counts.shape[1]} genes x {counts.shape[0]} barcodes "
            f"but {features_file.name} lists {len(features)} features and {barcodes_file.name} "
            f"{len(barcodes)} barcodes (expected matching files, features with id and name columns)"
        )
    types = features[2].to_numpy(dtype=object) if features.shape[1] > 2 else None
    return barcodes.to_numpy(dtype=object), features[1].to_numpy(dtype=object), types, counts


def _read_positions(spatial: Path, slide: str) -> tuple[pd.DataFrame, Path]:
    """Spot table indexed by barcode; Space Ranger >= 2 writes a header, 1.x does not."""
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            break
    else:
        raise InputError(
            f"slide '{slide}': Visium spot positions not found in {spatial} (expected "
            "tissue_positions.csv or tissue_positions_list.csv)"
        )
    with reading(path, slide, "Visium spot positions"):
        with open(path, encoding="utf-8") as fh:
            has_header = fh.readline().split(",")[0].strip().lower() == "barcode"
        df = pd.read_csv(path, header=0 if has_header else None, dtype=str, keep_default_na=False)
    if not has_header:
        if df.shape[1] != len(POSITION_COLUMNS):
            raise InputError(
                f"slide '{slide}': {path} has {df.shape[1]} columns; expected "
                f"{len(POSITION_COLUMNS)} ({', '.join(POSITION_COLUMNS)})"
            )
        df.columns = list(POSITION_COLUMNS)
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"slide '{slide}': {path} lacks columns {', '.join(missing)} "
            f"(expected {', '.join(POSITION_COLUMNS)})"
        )
    df = df.set_index(df["barcode"].str.strip())
    bad = ~df["in_tissue"].str.strip().isin(["0", "1"])
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise InputError(f"slide '{slide}': {path} has in_tissue {df['in_tissue'].iloc[i]!r} at barcode "
                         f"{df.index[i]}; expected 1 (spot under tissue) or 0")
    values = numeric_columns(df, POSITION_COLUMNS[1:], path, slide, row_name="barcode")
    missing = values.isna().any(axis=1)
    if missing.any():
        i = int(np.argmax(missing.to_numpy()))
        raise InputError(f"slide '{slide}': {path} has an empty position at barcode {df.index[i]}; "
                         "expected array_row, array_col and pixel coordinates for every spot")
    return values, path


def _read_scalefactors(path: Path, slide: str) -> dict:
    try:
        scalefactors = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise InputError(
            f"slide '{slide}': malformed Visium scale factors {path}: {exc} (expected a JSON object "
            "with spot_diameter_fullres, tissue_hires_scalef, tissue_lowres_scalef)"
        ) from exc
    if not isinstance(scalefactors, dict):
        raise InputError(
            f"slide '{slide}': malformed Visium scale factors {path}: expected a JSON object, "
            f"got {type(scalefactors).__name__}"
        )
    return scalefactors


def _scalefactor(scalefactors: dict, key: str, path: Path, slide: str) -> float:
    value = scalefactors.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise InputError(
            f"slide '{slide}': malformed Visium scale factors {path}: '{key}' is {value!r} "
            "(expected a positive number)"
        )
    return float(value)


def _choose_image(
    outs: Path, image, scalefactors: dict, sf_file: Path, slide: str, coord_scale: float
) -> tuple[SlideImage | None, Path | None]:
    """The full-resolution image if given, else Space Ranger's hires then lowres PNG."""
    if image is not None:
        path = require_file(Path(image), slide, "full-resolution image")
        log.info("slide %s: using full-resolution image %s", slide, path)
        return SlideImage(path), path
    for kind in ("hires", "lowres"):
        path = outs / "spatial" / f"tissue_{kind}_image.png"
        if path.is_file():
            # positions map to PNG pixels by the scale factor; coord_scale moved them already
            scale = _scalefactor(scalefactors, f"tissue_{kind}_scalef", sf_file, slide) / coord_scale
            log.info(
                "slide %s: no full-resolution image given; using the %s image %s (scale %.4g); "
                "patches will have less detail than from the original H&E",
                slide, kind, path, scale,
            )
            return SlideImage(path, scale=scale), path
    log.warning("slide %s: no image (no full-resolution image given, no PNG in %s)", slide, outs)
    return None, None
