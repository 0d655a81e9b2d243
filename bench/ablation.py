"""Which model and training choices matter, measured on validation slides only (never a test slide).

Usage (from the repository root)::

    hgc embed examples/her2st.tsv --out runs/abl/emb.h5
    hgc build-graph examples/her2st.tsv --embeddings runs/abl/emb.h5 --protocol patient-kfold \\
        --genes hist2st-her2st --out runs/abl/patient-kfold.h5
    python bench/ablation.py --graphs runs/abl/patient-kfold.h5 --fold patient-B --seeds 0,1 \\
        --dataset her2st --encoder effnet-lite1 --out bench/results/ablation-her2st-patient-kfold-effnet-lite1.json

Each variant is hgc 0.1's model (preset ``hgc-0.1``) with one published-code choice (or another
option) switched in, or a preset whole, or a preset with one option;
each is trained per seed on the fold's training graphs and scored, as the trainer does, by the
best validation PCC-ALL over its epochs on the fold's validation slide. The test slide's graph
is never read: folds are loaded with their targets, but only the training role is used.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from machine import describe  # noqa: E402

log = logging.getLogger("bench.ablation")

SCHEMA_VERSION = 1
PUBLISHED = "spahgc-published"
#: Where the single switches start from: hgc 0.1's model (hgc's defaults when this was first run).
REFERENCE = "hgc-0.1"
#: name -> (preset, FitConfig options); ``model`` options go to ModelConfig over the preset's.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    REFERENCE: (REFERENCE, {}),
    PUBLISHED: (PUBLISHED, {}),
    "hgc": ("hgc", {}),
    "+feature masks": (REFERENCE, {"model": {"mask_unit": "feature"}}),
    "+mlp input (dropout on input only)": (REFERENCE, {"model": {"input_block": "mlp", "dropout": 0.2,
                                                                 "dropout_layers": False}}),
    "+no residual or LayerNorm": (REFERENCE, {"model": {"residual": False, "layer_norm": False}}),
    "+embedded expression": (REFERENCE, {"model": {"expression": "embedded"}}),
    "+leaky attention and attention dropout": (REFERENCE, {"model": {"attention_logits": "leaky",
                                                                     "attention_dropout": 0.1}}),
    "+published head": (REFERENCE, {"model": {"head": "published"}}),
    "+LeakyReLU 0.2": (REFERENCE, {"model": {"negative_slope": 0.2}}),
    "+published edge drops": (REFERENCE, {"model": {"drop": {"near": 0.5, "refer": 0.4, "close": 0.0}}}),
    "+no early stopping": (REFERENCE, {"patience": None}),
    "+no residual or LayerNorm +mlp input": (REFERENCE, {"model": {
        "residual": False, "layer_norm": False, "input_block": "mlp", "dropout": 0.2, "dropout_layers": False}}),
    "+no residual or LayerNorm +gene-PCA head (rank 10)": (REFERENCE, {"model": {
        "residual": False, "layer_norm": False, "gene_rank": 10}}),
    "hgc (full-rank head)": ("hgc", {"model": {"gene_rank": None}}),
    "hgc (full-rank head, seed ensemble of 3)": ("hgc", {"model": {"gene_rank": None}, "ensemble": 3}),
    "hgc (seed ensemble of 3)": ("hgc", {"ensemble": 3}),
}



def run_variant(folds: list, preset: str, options: dict[str, Any], seed: int, epochs: int,
                backend: str) -> list[dict[str, Any]]:
    """Train one variant on ``folds``; per fold its best validation PCC, best epoch and epochs run."""
    from hgc.train.config import FitConfig
    from hgc.train.fit import fit_folds

    cfg = FitConfig.from_preset(preset, **{"backend": backend, "device": "cpu", "epochs": epochs, "seed": seed,
                                           "progress": False, **options})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for r in fit_folds(folds, Path(tmp) / "run", cfg):
            rows.append({"fold": r.fold, "val_slides": r.val_slides, "val_pcc": r.best_val_pcc,
                         "best_epoch": r.best_epoch, "epochs_run": r.epochs_run})
        wall = time.perf_counter() - t0
    for row in rows:
        row["wall_s"] = round(wall / max(len(rows), 1), 1)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", type=Path, required=True, help="Graph store (hgc build-graph).")
    p.add_argument("--fold", action="append", dest="folds", required=True, help="Fold to train (repeatable).")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default=None, help=f"Comma-separated (default: all): {', '.join(VARIANTS)}.")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--backend", default="auto", choices=["auto", "dgl", "pyg"])
    p.add_argument("--dataset", required=True, help="Name of the dataset, for the record.")
    p.add_argument("--encoder", required=True, help="Encoder of the store's embeddings, for the record.")
    p.add_argument("--out", type=Path, required=True, help="JSON to write (rows are added to an existing one).")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="Instead of training: merge the rows of these records (parallel runs) into --out.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.combine:
        records = [json.loads(f.read_text()) for f in a.combine]
        merged = {**records[0], "rows": []}
        for r in records:
            merged["rows"] = _merge_rows(merged["rows"], r["rows"])
        a.out.write_text(json.dumps(merged, indent=2) + "\n")
        return
    import torch

    from hgc.graph import store
    from hgc.nn import get_backend
    from hgc.train.folds import load_folds

    names = a.variants.split(",") if a.variants else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}")
    folds = load_folds(a.graphs, a.folds)
    info = {f.name: f for f in store.read_fold_info(a.graphs)}
    record = json.loads(a.out.read_text()) if a.out.is_file() else {
        "schema": SCHEMA_VERSION, "kind": "variant-ablation", "dataset": a.dataset, "encoder": a.encoder,
        "protocol": info[a.folds[0]].protocol, "n_genes": len(info[a.folds[0]].genes),
        "metric": "best validation PCC-ALL over epochs (the trainer's checkpoint score), validation slides only",
        "variants": {n: {"preset": VARIANTS[n][0], "options": VARIANTS[n][1]} for n in VARIANTS}, "rows": [],
        "reference": REFERENCE,
    }
    for seed in (int(s) for s in a.seeds.split(",")):
        for name in names:
            preset, options = VARIANTS[name]
            log.info("seed %d, variant %s", seed, name)
            rows = [{"variant": name, "seed": seed, **row}
                    for row in run_variant(folds, preset, options, seed, a.epochs, a.backend)]
            log.info("  %s", rows)
            record["rows"] = _merge_rows(record["rows"], rows)
            record.update(backend=get_backend(a.backend).name, epochs=a.epochs,
                          torch_threads=torch.get_num_threads(), machine=describe())
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(record, indent=2) + "\n")  # after every variant: a long run keeps its rows


def _merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with ``new`` added; a new row replaces the old one of its variant, seed and fold."""
    key = lambda r: (r["variant"], r["seed"], r["fold"])  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


if __name__ == "__main__":
    main()
