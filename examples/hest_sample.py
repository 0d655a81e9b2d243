"""A HEST-1k sample: read it from a HEST folder, look at it, predict it with a trained model.

    python examples/hest_sample.py ~/hest_data TENX95 --model runs/image-only/model-C/model/all

``ROOT`` holds HEST-1k's layout (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``,
as ``huggingface_hub.snapshot_download("MahmoodLab/hest")`` writes it, for the samples you chose).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hgc.data import read_hest
from hgc.train.apply import predict_slides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="HEST-1k folder (st/, wsis/, metadata/).")
    parser.add_argument("sample", help="Sample id, e.g. TENX95.")
    parser.add_argument("--model", type=Path, default=None, help="A model bundle to predict with.")
    parser.add_argument("--out", type=Path, default=Path("runs/hest-sample"), help="Output folder.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    slide = read_hest(args.root, args.sample)
    print(f"{slide.id} ({slide.platform}): {slide.n_spots} spots, {len(slide.genes)} genes, "
          f"{slide.microns_per_pixel:.3f} µm/px")
    if args.model is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        manifest = args.out / "manifest.tsv"
        manifest.write_text(f"slide\tpatient\tformat\tpath\tid\n{args.sample}\t{args.sample}\thest\t"
                            f"{args.root.resolve()}\t{args.sample}\n")
        files = predict_slides(args.model, manifest, args.out / "pred", methods=("hgc",))
        print(f"predicted: {files[0]}")


if __name__ == "__main__":
    main()
