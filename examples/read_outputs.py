"""Read hgc's prediction files with anndata and scanpy.

    python examples/read_outputs.py runs/quickstart/predictions/hgc/B4.h5ad --gene FASN

A prediction file is an AnnData: ``X`` the predicted expression (in ``uns["space"]``, e.g. log1p),
``layers["observed"]`` the measured expression when the slide had counts, ``obsm["spatial"]`` the
spots in full-resolution pixels, ``obs`` per-spot columns (array position, annotations), and, for
new slides, ``uns["spatial"]`` in scanpy's Visium layout so ``scanpy.pl.spatial`` draws it on the H&E.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import anndata
import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="A prediction .h5ad (PRED_DIR/<method>/<slide>.h5ad).")
    parser.add_argument("--gene", default=None, help="Gene to report and draw (default: the first).")
    parser.add_argument("--figure", type=Path, default=None, help="Draw the gene with scanpy.pl.spatial here.")
    args = parser.parse_args(argv)

    adata = anndata.read_h5ad(args.file)
    gene = args.gene or str(adata.var_names[0])
    predicted = adata[:, gene].X.ravel()
    print(f"{args.file}: method {adata.uns['method']}, slide {adata.uns['slide']}, {adata.n_obs} spots x "
          f"{adata.n_vars} genes in {adata.uns['space']} space; obs columns {list(adata.obs.columns)}")
    line = f"{gene}: predicted mean {predicted.mean():.3f}"
    if "observed" in adata.layers:
        observed = adata[:, gene].layers["observed"].ravel()
        line += f", observed mean {observed.mean():.3f}, PCC {np.corrcoef(observed, predicted)[0, 1]:.3f}"
    print(line)
    if args.figure is not None:
        import warnings

        import matplotlib

        matplotlib.use("Agg")
        import scanpy as sc

        warnings.filterwarnings("ignore", "Use `squidpy", FutureWarning)  # scanpy points to squidpy; both work

        has_image = "spatial" in adata.uns
        sc.pl.spatial(adata, color=gene, img_key="hires" if has_image else None,
                      spot_size=None if has_image else 100.0, show=False)
        import matplotlib.pyplot as plt

        plt.savefig(args.figure, dpi=100)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
