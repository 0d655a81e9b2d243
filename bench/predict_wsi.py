"""Time and peak memory of predicting a whole-slide image with no spots, per stage of `hgc predict`.

Usage (from the repository root)::

    python bench/predict_wsi.py --out bench/results/predict-wsi-cpu.json
    python bench/predict_wsi.py --encoder effnet-lite1 --out ...    # a real encoder (hours on 2 cores)

The slide is synthetic, written by this script once per size into ``--work`` and reused (the model
and the slide are made in a process of their own first, so the figures below are those of
prediction alone): ``--width-mm`` x ``--height-mm`` at ``--mpp`` µm/px (default 20 x 15 mm at
0.25 µm/px, 80,000 x 60,000 px), a pyramidal BigTIFF of 512-px JPEG tiles
with levels made by 2x subsampling, its tissue a textured superellipse covering about 80% of it
(about 30,000 spots in Visium geometry). The model is `hgc train` on her2st's five C sections
with the same encoder (default: a tiny random CNN, ``timm:test_efficientnet``, so the embedding
stage measures hgc's reading and patch cutting rather than a large network; a real encoder's cost
per patch is in the throughput records). Stages, in one process, each timed, with the process's
peak resident memory after it (``ru_maxrss``, which only grows):

    read + mask   open the slide, tissue mask on a pyramid level, virtual Visium spots
    embed         every spot's patch read region by region from the tiles, resampled, embedded
    graph         near and refer edges of all virtual spots against the model's reference bank
    model         the model's forward pass
    write         the prediction .h5ad with its hires image (scanpy layout)
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from machine import describe, shared_data_root  # noqa: E402

log = logging.getLogger("bench.predict_wsi")
SCHEMA_VERSION = 1
TILE = 512
C_SLIDES = ("C2", "C3", "C4", "C5", "C6")


def peak_mib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pixels(x: np.ndarray, y: np.ndarray, width: int, height: int) -> np.ndarray:
    """RGB of level-0 pixels (x, y) (2-D grids): white glass, H&E-like texture on a superellipse."""
    u, v = (x - width / 2) / (0.47 * width), (y - height / 2) / (0.47 * height)
    tissue = u ** 4 + v ** 4 <= 1.0
    h = ((x.astype(np.int64) * 73856093) ^ (y.astype(np.int64) * 19349663)) & 255  # per-pixel noise
    wave = np.sin(x / 37.0) * np.cos(y / 53.0) + 0.5 * np.sin((x + y) / 211.0)
    base = np.stack([190 + 25 * wave, 110 + 35 * wave, 165 + 20 * wave], axis=-1) + (h[..., None] - 128) / 6.0
    out = np.where(tissue[..., None], base, 244.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def _tiles(width: int, height: int, step: int) -> Iterator[np.ndarray]:
    """The tiles of the pyramid level of downsample ``step``, row by row."""
    w, h = -(-width // step), -(-height // step)
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            yy, xx = np.mgrid[ty:ty + TILE, tx:tx + TILE]
            yield _pixels(xx * step, yy * step, width, height)


def write_slide(path: Path, width: int, height: int, mpp: float) -> dict[str, Any]:
    """The synthetic pyramidal TIFF; returns its facts."""
    import tifffile

    t0 = time.perf_counter()
    resolution = (1e4 / mpp, 1e4 / mpp)
    levels = 0
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        step = 1
        while max(width, height) // step >= TILE:
            shape = (-(-height // step), -(-width // step), 3)
            tif.write(_tiles(width, height, step), shape=shape, dtype=np.uint8, tile=(TILE, TILE),
                      photometric="rgb", compression="jpeg", subfiletype=1 if step > 1 else 0,
                      resolution=resolution, resolutionunit="CENTIMETER")
            step *= 2
            levels += 1
    return {"width_px": width, "height_px": height, "mpp": mpp, "levels": levels,
            "file_mib": round(path.stat().st_size / 2**20, 1), "write_s": round(time.perf_counter() - t0, 1)}


def train_model(root: Path, encoder: str, weights: Path | None, data_root: Path) -> Path:
    """`hgc train` on her2st's five C sections (the manifest's rows resolve against ``data_root``)."""
    from hgc.train.config import FitConfig
    from hgc.train.pipeline import train_model as train

    lines = (HERE.parent / "examples" / "her2st.tsv").read_text().splitlines()
    rows = [ln for ln in lines if not ln.startswith("#")]
    keep = [rows[0]] + [r for r in rows[1:] if r.split("\t")[0] in C_SLIDES]
    (root / "c.tsv").write_text("\n".join(keep) + "\n")
    fit = FitConfig(device="cpu", epochs=20, patience=None, progress=False)
    return train(root / "c.tsv", "top-mean:250", encoder, root / "model", fit_config=fit, device="cpu",
                 data_root=data_root, progress=False, weights=weights)


def prepare(work: Path, encoder: str, width_mm: float, height_mm: float, mpp: float) -> None:
    """The model and the synthetic slide (in a process of its own, so their memory is not measured)."""
    import torch

    work.mkdir(parents=True, exist_ok=True)
    weights = None
    if encoder.startswith("timm:"):
        from hgc.embed.registry import build_model, get_spec

        torch.manual_seed(0)
        weights = work / "encoder.pth"
        torch.save(build_model(get_spec(encoder)).state_dict(), weights)
    t0 = time.perf_counter()
    bundle = train_model(work, encoder, weights, shared_data_root())
    train_s = round(time.perf_counter() - t0, 1)
    slide_file, facts_file = work / "synthetic.tif", work / "synthetic.json"
    width, height = int(round(width_mm * 1000 / mpp)), int(round(height_mm * 1000 / mpp))
    slide = json.loads(facts_file.read_text()) if facts_file.is_file() and slide_file.is_file() else {}
    if {k: slide.get(k) for k in ("width_px", "height_px", "mpp")} != {"width_px": width, "height_px": height, "mpp": mpp}:
        facts_file.unlink(missing_ok=True)  # written only once the slide is complete
        slide = write_slide(slide_file, width, height, mpp)
        facts_file.write_text(json.dumps(slide) + "\n")
    (work / "targets.tsv").write_text(f"slide\tpatient\tformat\timage\nsynthetic\tX\timage\t{slide_file}\n")
    facts = {"weights": str(weights) if weights else "", "model": str(bundle), "train_s": train_s,
             "slide": {**slide, "width_mm": width_mm, "height_mm": height_mm}}
    (work / "prepared.json").write_text(json.dumps(facts, indent=2) + "\n")


def run(work: Path, encoder: str) -> dict[str, Any]:
    import torch

    from hgc.data.manifest import read_manifest
    from hgc.data.tissue import SpotGeometry
    from hgc.embed import embed_manifest
    from hgc.embed.store import read_embeddings
    from hgc.evaluate.predictions import spatial_entry, writing_predictions
    from hgc.graph.build import align_embeddings, target_graph
    from hgc.train.apply import SlidePredictor, TargetSlides, _spot_diameter_px, check_encoder
    from hgc.train.inference import predict_graph
    from hgc.train.rundir import open_model

    prepared = json.loads((work / "prepared.json").read_text())
    weights = Path(prepared["weights"]) if prepared["weights"] else None
    bundle_path, slide_facts = Path(prepared["model"]), prepared["slide"]

    stages: dict[str, dict[str, float]] = {}

    def stage(name: str, t: float) -> None:
        stages[name] = {"seconds": round(time.perf_counter() - t, 2), "peak_mib": round(peak_mib(), 1)}
        log.info("%s: %.1f s, peak %.0f MiB", name, stages[name]["seconds"], stages[name]["peak_mib"])

    base_mib = peak_mib()
    t = time.perf_counter()
    bundle = open_model(bundle_path)
    enc = check_encoder(bundle, weights)
    predictor = SlidePredictor(bundle, ["hgc"], device="cpu")
    targets = TargetSlides(read_manifest(work / "targets.tsv"), SpotGeometry.of("visium"))
    slide = targets.load("synthetic")
    stage("read_mask", t)
    t = time.perf_counter()
    cache = work / "pred.embeddings.h5"
    spec = bundle.info["encoder"]
    embed_manifest(targets, enc.spec.name, cache, weights=weights, device="cpu", patch_um=float(spec["patch_um"]),
                   progress=False)
    stage("embed", t)
    t = time.perf_counter()
    x = align_embeddings(slide, *read_embeddings(cache, slide.id), str(cache))
    graph = target_graph(slide, x, predictor.bank, predictor.config, bundle.name)
    stage("graph", t)
    t = time.perf_counter()
    model, backend = predictor.model
    predicted = predict_graph(model, backend.prepare(graph, "cpu"))
    stage("model", t)
    t = time.perf_counter()
    with writing_predictions(work / "pred", protocol="new-slide", methods=["hgc"]) as out:
        spatial = spatial_entry(slide.image, _spot_diameter_px(slide, "visium"))
        for p in predictor.predictions(slide, {"hgc": (predicted, None)}, None, spatial):
            out.add(p)
    stage("write", t)
    tissue = targets.tissue["synthetic"]
    area = float(tissue.mask.sum() * (tissue.mask_um(slide.microns_per_pixel) / 1000) ** 2)
    return {
        "schema": SCHEMA_VERSION, "kind": "predict-wsi", "encoder": encoder, "machine": describe(),
        "torch_threads": torch.get_num_threads(), "slide": {**slide_facts, "tissue_mm2": round(area, 1)},
        "n_spots": int(slide.n_spots), "geometry": "visium", "n_ref": int(predictor.bank.n_ref),
        "n_edges": {k: int(v.shape[1]) for k, v in graph.edges.items()}, "train_s": prepared["train_s"],
        "baseline_mib": round(base_mib, 1), "stages": stages,
        "wall_s": round(sum(s["seconds"] for s in stages.values()), 1),
        "peak_mib": round(max(s["peak_mib"] for s in stages.values()), 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON record to write.")
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench" / "predict-wsi")
    p.add_argument("--encoder", default="timm:test_efficientnet")
    p.add_argument("--width-mm", type=float, default=20.0)
    p.add_argument("--height-mm", type=float, default=15.0)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.prepare_only:
        prepare(a.work, a.encoder, a.width_mm, a.height_mm, a.mpp)
        return
    import subprocess

    subprocess.run([sys.executable, __file__, "--prepare-only", "--out", str(a.out), "--work", str(a.work),
                    "--encoder", a.encoder, "--width-mm", str(a.width_mm), "--height-mm", str(a.height_mm),
                    "--mpp", str(a.mpp)], check=True)
    record = run(a.work, a.encoder)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("n_spots", "stages", "peak_mib", "wall_s")}, indent=2))


if __name__ == "__main__":
    main()
