"""Train on slides with expression, then predict a slide that is an H&E image alone.

    HGC_DATA=../shared/data python examples/predict_image_only.py --out runs/image-only

Trains one model on her2st patient C's five sections (examples/her2st-C.tsv), then predicts
section B4 of patient B from its image only (examples/b4-image.tsv): hgc finds the tissue, lays
virtual spots on it in the model's spot geometry, and predicts every gene of the model there.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hgc.embed.registry import DEFAULT_ENCODER
from hgc.plot import plot_run
from hgc.train.apply import predict_slides
from hgc.train.config import FitConfig
from hgc.train.pipeline import train_model

EXAMPLES = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/image-only"), help="Output folder.")
    parser.add_argument("--model", type=Path, default=None, help="An existing model bundle (skips training).")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="Image encoder for training.")
    parser.add_argument("--epochs", type=int, default=200, help="Most training epochs.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = args.model or train_model(EXAMPLES / "her2st-C.tsv", "hist2st-her2st", args.encoder, args.out / "model-C",
                                      fit_config=FitConfig(epochs=args.epochs, seed=0))
    files = predict_slides(model, EXAMPLES / "b4-image.tsv", args.out / "pred-b4-image", methods=("hgc", "ridge"))
    print(f"{len(files)} prediction files; the tissue and its virtual spots: {args.out / 'pred-b4-image' / 'tissue'}")
    plot_run([args.out / "pred-b4-image"], args.out / "figures", genes=["FASN"], best=2)
    print(f"maps of the predicted genes in {args.out / 'figures'}")


if __name__ == "__main__":
    main()
