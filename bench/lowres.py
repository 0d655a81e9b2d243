"""Resolution robustness: a model trained on sharp slides predicting a coarser scan of a slide.

Usage (from the repository root)::

    python bench/lowres.py --dataset her2st --test B4 --validation C3 --factor 4.6 --settings native,coarse \\
        --out bench/results/accuracy-her2st-lowres-effnet-lite1-stages.json

A copy of the test slide (and of a validation slide) is downscaled ``factor`` times and written as
a PNG whose spot positions map to it by ``coord_scale`` in the manifest, with its microns per
pixel multiplied by the factor: the same tissue, spots and counts, as a scanner at a lower
magnification would give. Per setting and seed, one model (``hgc train``'s ``all`` protocol) is
trained on the full-resolution slides of the other patients (``test`` role) and one on those
without the validation slide (``validation`` role); each predicts its slide at full and at low
resolution (``hgc predict`` with counts) beside ridge and kNN from the same bundle. Settings:

- ``native``: every slide's patches at its own resolution (hgc's default);
- ``coarse``: every patch brought down to the low-resolution copy's µm/px first (``--patch-mpp``).

The choice between them is read on the ``validation`` rows; the ``test`` rows are reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from hgc.embed.registry import DEFAULT_ENCODER  # noqa: E402
from machine import REPO, describe, shared_data_root  # noqa: E402

log = logging.getLogger("bench.lowres")

SCHEMA_VERSION = 1
SETTINGS = ("native", "coarse")
METHODS = ("hgc", "ridge", "knn")
MANIFESTS = {"her2st": "examples/her2st.tsv"}
GENES = {"her2st": "hist2st-her2st"}
COLUMNS = ("slide", "patient", "format", "counts", "spots", "image", "microns_per_pixel", "coord_scale")
LOW = "-lowres"


def lowres_copy(entry, factor: float, folder: Path) -> dict[str, Any]:
    """Write ``entry``'s image downscaled ``factor`` times as a PNG; its manifest row (slide ``<id>-lowres``)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    folder.mkdir(parents=True, exist_ok=True)
    png = folder.resolve() / f"{entry.slide}{LOW}.png"  # absolute: the manifests live elsewhere
    with Image.open(entry.paths["image"]) as img:
        size = (max(1, round(img.width / factor)), max(1, round(img.height / factor)))
        scale = size[0] / img.width
        if not png.is_file():  # written whole, then renamed: parallel settings may share the folder
            part = png.with_name(f"{png.stem}.{os.getpid()}.part.png")
            img.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(part)
            os.replace(part, png)
    return {"slide": entry.slide + LOW, "patient": entry.patient, "format": "st", "counts": entry.paths["counts"],
            "spots": entry.paths["spots"], "image": png, "microns_per_pixel": entry.microns_per_pixel / scale,
            "coord_scale": scale}


def full_row(entry) -> dict[str, Any]:
    return {"slide": entry.slide, "patient": entry.patient, "format": entry.format, "counts": entry.paths["counts"],
            "spots": entry.paths["spots"], "image": entry.paths["image"], "microns_per_pixel": entry.microns_per_pixel,
            "coord_scale": ""}


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(COLUMNS)] + ["\t".join(str(r.get(c, "")) for c in COLUMNS) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_setting(setting: str, p: Params, m, roles: dict[str, tuple[list[str], str]], low: dict[str, dict]) -> list[dict]:
    """Rows of one setting: per role, seed, method, slide and resolution, the slide's metrics."""
    from hgc.embed import embed_manifest
    from hgc.evaluate.report import evaluate
    from hgc.graph.build import build_from_manifest
    from hgc.graph.fold import GraphConfig
    from hgc.train.apply import predict_slides
    from hgc.train.config import FitConfig
    from hgc.train.fit import fit

    mpp = max(r["microns_per_pixel"] for r in low.values()) if setting == "coarse" else None
    work = p.work_dir / setting
    emb = work / "embeddings.h5"
    rows = []
    for role, (train, target) in roles.items():
        train_manifest = write_manifest(work / role / "train.tsv", [full_row(m.entry(s)) for s in train])
        targets = write_manifest(work / role / "targets.tsv", [full_row(m.entry(target)), low[target]])
        embed_manifest(train_manifest, p.encoder, emb, patch_mpp=mpp, progress=False)
        graphs = work / role / "graphs.h5"
        if not graphs.is_file():
            build_from_manifest(train_manifest, emb, "all", graphs, GraphConfig(genes=p.genes))
        for seed in p.seeds:
            run_dir, preds = work / role / f"model-s{seed}", work / role / f"predictions-s{seed}"
            t0 = time.perf_counter()
            if not (run_dir / "all").is_dir():
                fit(graphs, run_dir, FitConfig(**{"device": "cpu", "progress": False, **p.fit, "seed": seed,
                                                  "epochs": p.epochs}))
            if not preds.is_dir():
                predict_slides(run_dir / "all", targets, preds, methods=METHODS, embeddings=emb, device="cpu",
                               progress=False)
            for method, r in evaluate(preds)["methods"].items():
                for s in r["per_slide"]:
                    rows.append({"setting": setting, "patch_mpp": mpp, "role": role, "seed": seed, "method": method,
                                 "slide": target, "resolution": "low" if s["slide"].endswith(LOW) else "full",
                                 **{k: s[k] for k in ("pcc_all", "pcc_heg", "mse", "mae")}})
            log.info("%s %s seed %d: %.0f s", setting, role, seed, time.perf_counter() - t0)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean PCC-ALL / PCC-HEG per setting, role and method at both resolutions, and low / full."""
    import numpy as np

    out = []
    keys = sorted({(r["setting"], r["role"], r["method"]) for r in rows})
    for setting, role, method in keys:
        sel = [r for r in rows if (r["setting"], r["role"], r["method"]) == (setting, role, method)]
        row: dict[str, Any] = {"setting": setting, "role": role, "method": method,
                               "slide": sel[0]["slide"], "n_seeds": len({r["seed"] for r in sel})}
        for metric in ("pcc_all", "pcc_heg"):
            for res in ("full", "low"):
                row[f"{metric}_{res}"] = float(np.mean([r[metric] for r in sel if r["resolution"] == res]))
            row[f"{metric}_ratio"] = row[f"{metric}_low"] / row[f"{metric}_full"]
        out.append(row)
    return out


@dataclass
class Params:
    """What one record is run with (see the module docstring)."""

    manifest: Path
    test: str
    validation: str
    genes: str
    factor: float = 4.6
    settings: Sequence[str] = SETTINGS
    encoder: str = DEFAULT_ENCODER
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 200
    work_dir: Path = REPO / "runs" / "lowres"
    data_root: Path | None = None
    fit: dict[str, Any] = field(default_factory=dict)  # further FitConfig options


def run(p: Params) -> dict[str, Any]:
    """Make the low-resolution copies, run every setting and return the JSON-ready record."""
    from hgc.data.manifest import read_manifest

    unknown = sorted(set(p.settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; expected some of {list(SETTINGS)}")
    m = read_manifest(p.manifest, p.data_root or shared_data_root())
    test_patient = m.entry(p.test).patient
    if m.entry(p.validation).patient == test_patient:
        raise SystemExit(f"validation slide {p.validation} is a section of the test slide's patient {test_patient}")
    train = [s for s in m.slide_ids if m.patients[s] != test_patient]
    roles = {"validation": ([s for s in train if s != p.validation], p.validation), "test": (train, p.test)}
    low = {s: lowres_copy(m.entry(s), p.factor, p.work_dir / "images") for s in (p.validation, p.test)}
    t0 = time.perf_counter()
    rows = [row for setting in p.settings for row in run_setting(setting, p, m, roles, low)]
    return {
        "schema": SCHEMA_VERSION, "kind": "resolution-robustness", "dataset": p.manifest.stem, "encoder": p.encoder,
        "genes": p.genes, "factor": p.factor, "seeds": list(p.seeds), "epochs": p.epochs,
        "test_slide": p.test, "validation_slide": p.validation, "train_slides": {k: v[0] for k, v in roles.items()},
        "low_resolution_mpp": {s: r["microns_per_pixel"] for s, r in low.items()}, "settings": list(p.settings),
        "rows": rows, "summary": summary(rows), "wall_s": round(time.perf_counter() - t0, 1),
        "torch_threads": _threads(), "machine": describe(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from records of the same copies run with different settings or seeds (in parallel)."""
    rows = [r for rec in records for r in rec["rows"]]
    return {**records[0], "seeds": sorted({s for rec in records for s in rec["seeds"]}),
            "settings": [s for s in SETTINGS if any(r["setting"] == s for r in rows)], "rows": rows,
            "summary": summary(rows), "wall_s": sum(rec["wall_s"] for rec in records)}


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--dataset", choices=sorted(MANIFESTS), default="her2st")
    a.add_argument("--test", default="B4", help="Slide whose low-resolution copy is predicted (test role).")
    a.add_argument("--validation", default="C3", help="Slide of another patient than --test, for the choice.")
    a.add_argument("--factor", type=float, default=4.6, help="Downscaling factor of the copies.")
    a.add_argument("--settings", default=",".join(SETTINGS), help=f"Comma-separated of {', '.join(SETTINGS)}.")
    a.add_argument("--encoder", default=DEFAULT_ENCODER)
    a.add_argument("--seeds", default="0,1,2")
    a.add_argument("--epochs", type=int, default=200)
    a.add_argument("--data-root", type=Path, default=None, help="Default: $HGC_DATA, else ../shared/data.")
    a.add_argument("--work-dir", type=Path, default=REPO / "runs" / "lowres")
    a.add_argument("--out", type=Path, required=True, help="JSON record to write.")
    a.add_argument("--combine", type=Path, nargs="+", default=None, help="Merge these records' rows into --out.")
    args = a.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.combine:
        record = combine([json.loads(f.read_text()) for f in args.combine])
    else:
        import torch

        torch.set_num_threads(1)
        record = run(Params(REPO / MANIFESTS[args.dataset], args.test, args.validation, GENES[args.dataset],
                            args.factor, args.settings.split(","), args.encoder,
                            [int(s) for s in args.seeds.split(",")], args.epochs, args.work_dir, args.data_root))
        record["dataset"] = args.dataset
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for row in record["summary"]:
        log.info("%(setting)s %(role)s %(method)s %(slide)s: PCC-ALL full %(pcc_all_full).3f low %(pcc_all_low).3f "
                 "ratio %(pcc_all_ratio).2f", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
