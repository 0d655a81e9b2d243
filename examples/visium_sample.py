"""A 10x Visium sample (a Space Ranger ``outs/`` folder): read it, look at it, predict it with a trained model.

    python examples/visium_sample.py ../shared/data/visium/spaceranger1_tiny --model runs/image-only/model-C/model/all

Reads the spots, counts and H&E, writes them as an AnnData file scanpy reads (``sample.h5ad``),
and, given a model bundle, predicts the model's genes on the sample's spots (the counts, where
the model's genes are among them, are kept beside the prediction for ``hgc evaluate``).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hgc.data import read_visium
from hgc.train.apply import predict_slides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Space Ranger output folder (with spatial/ and the matrix).")
    parser.add_argument("--model", type=Path, default=None, help="A model bundle to predict with.")
    parser.add_argument("--out", type=Path, default=Path("runs/visium-sample"), help="Output folder.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    slide = read_visium(args.folder, slide="sample", patient="donor")
    print(f"{slide.id}: {slide.n_spots} spots, {len(slide.genes)} genes, {slide.microns_per_pixel:.3f} µm/px, "
          f"image {slide.image.path.name if slide.image else 'none'}")
    args.out.mkdir(parents=True, exist_ok=True)
    slide.to_anndata().write_h5ad(args.out / "sample.h5ad")
    if args.model is not None:
        manifest = args.out / "manifest.tsv"
        manifest.write_text(f"slide\tpatient\tformat\tpath\nsample\tdonor\tvisium\t{args.folder.resolve()}\n")
        files = predict_slides(args.model, manifest, args.out / "pred", methods=("hgc",))
        print(f"predicted: {files[0]}")


if __name__ == "__main__":
    main()
