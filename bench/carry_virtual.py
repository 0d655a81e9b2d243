"""How well predictions on virtual spots (a slide given as an image alone) match the observed
expression: each real spot takes the prediction of its nearest virtual spot, scored beside the
prediction made on the real spots themselves.

Usage (after `hgc predict` of the same slide twice: as an image alone, and with its spots and counts)::

    python bench/carry_virtual.py --virtual runs/pred-b4-image/hgc/B4.h5ad --real runs/pred-b4/hgc/B4.h5ad \\
        --out bench/results/virtual-spots-b4.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from machine import describe  # noqa: E402


def carry(virtual_file: Path, real_file: Path) -> dict[str, Any]:
    from scipy.spatial import cKDTree

    from hgc.evaluate.metrics import slide_metrics
    from hgc.evaluate.predictions import read_prediction

    virtual, real = read_prediction(virtual_file), read_prediction(real_file)
    if real.observed is None:
        raise SystemExit(f"{real_file} has no observed expression to score against")
    if list(virtual.genes) != list(real.genes):
        raise SystemExit("the two predictions are of different genes (other models?)")
    distance, nearest = cKDTree(virtual.coords).query(real.coords)
    carried = virtual.predicted[nearest]
    scores = {name: {k: v for k, v in vars(slide_metrics(real.observed, pred, real.heg, real.hvg)).items()
                     if k in ("pcc_all", "pcc_heg", "pcc_hvg", "mse", "mae", "n_constant")}
              for name, pred in (("real spots", real.predicted), ("carried from virtual spots", carried))}
    return {
        "kind": "virtual-spots", "slide": real.slide, "method": real.method, "n_real": int(len(real.barcodes)),
        "n_virtual": int(len(virtual.barcodes)), "median_distance_px": float(np.median(distance)),
        "space": real.space, "n_genes": int(len(real.genes)), "scores": scores,
        "virtual": str(virtual_file), "real": str(real_file), "machine": describe(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--virtual", type=Path, required=True, help="Prediction .h5ad of the slide as an image alone.")
    p.add_argument("--real", type=Path, required=True, help="Prediction .h5ad of the same slide on its real spots, with counts.")
    p.add_argument("--out", type=Path, default=None, help="JSON record to write.")
    a = p.parse_args(argv)
    record = carry(a.virtual, a.real)
    if a.out:
        a.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, s in record["scores"].items():
        print(f"{name:28s} PCC-ALL {s['pcc_all']:.3f}  PCC-HEG {s['pcc_heg']:.3f}  PCC-HVG {s['pcc_hvg']:.3f}")


if __name__ == "__main__":
    main()
