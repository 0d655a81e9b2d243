"""The her2st quickstart: cross-validate SpaHGC beside the baselines, check the biology, draw the figures.

    HGC_DATA=../shared/data python examples/her2st_quickstart.py --out runs/quickstart

Six HER2+ sections from two patients; patient-level folds (train on one patient, test on the
other); the Hist2ST gene panel. Writes the run folder (embeddings, graphs, models, predictions,
metrics) and ``figures/`` (per-slide gene maps over the H&E and the run summary).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hgc.data import data_root, read_manifest
from hgc.embed.registry import DEFAULT_ENCODER
from hgc.evaluate.biology import BiologySettings
from hgc.evaluate.report import markdown_table, write_report
from hgc.plot import plot_run
from hgc.train.config import FitConfig
from hgc.train.pipeline import run_pipeline

EXAMPLES = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="Run folder.")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="Image encoder (offline default).")
    parser.add_argument("--epochs", type=int, default=200, help="Most epochs per fold (early stopping ends sooner).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    manifest = EXAMPLES / "her2st.tsv"
    run_pipeline(manifest, "patient-kfold", "hist2st-her2st", args.encoder, args.out,
                 fit_config=FitConfig(epochs=args.epochs, seed=0), device="auto")

    # Does the prediction follow the tissue? her2st's expression clusters named through the authors'
    # table, their TLS signature, and marker sets of the annotated clusters (examples/her2st-markers.gmt).
    res = data_root() / "her2st" / "res"
    biology = BiologySettings.from_files(
        "label", res / "ST-cluster" / "motivation.csv",
        [res / "TLS-pred" / "tls-signature.tsv.gz", EXAMPLES / "her2st-markers.gmt"])
    report = write_report(args.out / "predictions", biology=biology, manifest=read_manifest(manifest))
    print(markdown_table(report))
    figures = plot_run([args.out], args.out / "figures")
    print(f"{len(figures)} figures in {args.out / 'figures'}")


if __name__ == "__main__":
    main()
