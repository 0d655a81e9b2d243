"""Shared fixtures: the real data in ../shared/data and small slides written by the tests."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; its absence is a broken checkout, not a reason to skip."""
    assert (SHARED_DATA / "her2st" / "samples.tsv").is_file(), (
        f"real test data not found at {SHARED_DATA}; clone the repo next to the shared/ folder"
    )
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st_manifest(shared_data: Path) -> Path:
    os.environ["HGC_DATA"] = str(shared_data)
    return REPO / "examples" / "her2st.tsv"


def write_st_slide(
    folder: Path,
    name: str = "S1",
    grid: int = 4,
    pitch_px: float = 40.0,
    image_size: tuple[int, int] = (220, 220),
    counts: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """A small legacy-ST section in the her2st layout: counts tsv, spot table, JPEG image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = np.meshgrid(np.arange(1, grid + 1), np.arange(1, grid + 1))
    xs, ys = xs.ravel(), ys.ravel()
    ids = [f"{x}x{y}" for x, y in zip(xs, ys)]
    genes = ["GENE_A", "GENE_B", "GENE_C", "ERBB2", "KRT19"]
    if counts is None:
        counts = rng.poisson(5.0, size=(len(ids), len(genes)))
    lines = ["\t" + "\t".join(genes)]
    lines += [i + "\t" + "\t".join(str(v) for v in row) for i, row in zip(ids, counts)]
    (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    spot_lines = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    spot_lines += [
        f"{x}\t{y}\t{x}\t{y}\t{x * pitch_px:.2f}\t{y * pitch_px:.2f}\t1" for x, y in zip(xs, ys)
    ]
    (folder / f"{name}_selection.tsv").write_text("\n".join(spot_lines) + "\n")
    img = rng.integers(0, 255, size=(image_size[1], image_size[0], 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / f"{name}.jpg", quality=90)
    return {
        "counts": folder / f"{name}.tsv",
        "spots": folder / f"{name}_selection.tsv",
        "image": folder / f"{name}.jpg",
    }


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["\t".join(columns)] + ["\t".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_line_error(result, *needles: str, exit_code: int = 1) -> str:
    """A CLI result that failed the way users should see it: the exit code, no traceback, and one
    ``Error: ...`` line holding every needle. Returns that line."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def tiny_st_project(folder: Path, ids=(("S1", "P1"), ("S2", "P1"), ("S3", "P2")), grid: int = 3) -> Path:
    """Legacy-ST slides (grid x grid spots) and their manifest in ``folder``: the smallest real pipeline input."""
    rows = []
    for i, (slide, patient) in enumerate(ids):
        files = write_st_slide(folder / f"slide{i}", name=f"slide{i}", grid=grid, pitch_px=60,
                               image_size=(60 * grid + 60, 60 * grid + 60), seed=i)
        rows.append({"slide": slide, "patient": patient, "format": "st", "microns_per_pixel": "0.8", **files})
    return write_manifest(folder / "m.tsv", rows)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, run folder) of a finished `hgc run` on three tiny slides (slide-loso, effnet-lite0,
    one epoch): embeddings, graphs, model and predictions. Tests copy whatever they change."""
    from hgc.train.config import FitConfig
    from hgc.train.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    manifest = tiny_st_project(root / "data")
    fit = FitConfig(backend="pyg", device="cpu", epochs=1, patience=None, progress=False, model={"hidden": 8, "layers": 1})
    run_pipeline(manifest, "slide-loso", "top-mean:5", "effnet-lite0", root / "run", fit_config=fit, device="cpu",
                 progress=False)
    return manifest, root / "run"


@pytest.fixture(scope="session")
def her2st_predictions(her2st_manifest, tmp_path_factory) -> Path:
    """A real prediction folder: the six her2st sections predicted by the ridge, knn and mean
    baselines (patient-kfold, Hist2ST genes) on colour embeddings of their H&E, with observed
    expression. Tests copy it before changing it."""
    from her2st_graph_data import write_her2st_store
    from hgc.train.predict import predict

    root = tmp_path_factory.mktemp("her2st_predictions")
    store = write_her2st_store(her2st_manifest, root / "graphs.h5", genes="hist2st-her2st")
    predict(None, store, root / "pred", methods=("ridge", "knn", "mean"))
    return root / "pred"
