"""``hgc build-graph`` and ``hgc graph inspect``: build the per-fold graph store and look inside it."""
from __future__ import annotations

import json

import click

from . import data_root_option, device_option


@click.command("build-graph")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--embeddings", required=True, type=click.Path(dir_okay=False),
              help="Embedding HDF5 written by `hgc embed` for the same manifest.")
@click.option("--protocol", required=True, type=click.Choice(["patient-kfold", "slide-loso", "split-file"]),
              help="patient-kfold: leave one patient out; slide-loso: leave one slide out; "
                   "split-file: folds from --split-file.")
@click.option("--split-file", type=click.Path(dir_okay=False), default=None,
              help="TSV with columns slide, fold, role (train|test), for --protocol split-file.")
@click.option("--genes", default="top-mean:250", show_default=True,
              help="Gene panel: hist2st-her2st, hist2st-cscc, top-mean:N, hvg:N or a file of symbols.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Graph store to write (HDF5).")
@click.option("--knn-backend", type=click.Choice(["auto", "faiss", "faiss-ivf", "torch"]), default="auto",
              show_default=True, help="Similarity search engine (faiss-ivf is approximate).")
@device_option("cpu", "Device for the similarity search: ")
@click.option("--k-refer", type=int, default=7, show_default=True, help="References per target spot.")
@click.option("--k-close", type=int, default=3, show_default=True, help="Neighbours per reference.")
@click.option("--metric", type=click.Choice(["l1", "l2", "cosine"]), default="l1", show_default=True)
@click.option("--normalize", type=click.Choice(["log1p", "log10-minmax"]), default="log1p", show_default=True,
              help="Expression transform (log10-minmax is SpaHGC's, fitted on training slides).")
@click.option("--near", type=click.Choice(["auto", "grid", "hex", "radius"]), default="auto", show_default=True,
              help="Spatial neighbours: ST grid, Visium hexagon, or a radius in µm.")
@click.option("--near-radius-um", type=float, default=None, help="Radius for --near radius (default 1.5 x spot pitch).")
@click.option("--exclude-same-patient/--keep-same-patient", default=None,
              help="For training targets, drop references from the target's own patient "
                   "(default: drop under patient-kfold when another patient remains).")
@click.option("--n-val", type=int, default=1, show_default=True, help="Validation slides recorded per fold.")
@click.option("--seed", type=int, default=0, show_default=True)
@data_root_option
def build_graph_command(manifest, embeddings, protocol, split_file, genes, out, knn_backend, device, k_refer,
                        k_close, metric, normalize, near, near_radius_um, exclude_same_patient, n_val, seed,
                        data_root) -> None:
    """Build one heterogeneous graph per fold and target slide of MANIFEST into --out.

    Gene choice and normalisation are fitted on each fold's training slides; test slides never
    provide references. Nothing is written if any input is inconsistent.
    """
    from ..graph.build import GraphConfig, build_from_manifest
    from ..graph.store import summarize

    config = GraphConfig(genes=genes, normalize=normalize, near=near, near_radius_um=near_radius_um,
                         k_refer=k_refer, k_close=k_close, metric=metric, knn_backend=knn_backend,
                         device=device, exclude_same_patient=exclude_same_patient, n_val=n_val, seed=seed)
    path = build_from_manifest(manifest, embeddings, protocol, out, config, split_file, data_root)
    rows = summarize(path)
    click.echo(f"wrote {path}: {len({r['fold'] for r in rows})} folds, {len(rows)} graphs ({protocol})")


@click.group("graph")
def graph_group() -> None:
    """Look inside graph stores written by `hgc build-graph`."""


@graph_group.command("inspect")
@click.argument("graphs", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per (fold, target).")
def inspect_command(graphs: str, as_json: bool) -> None:
    """Print one row per fold and target slide: role, nodes, edges per relation, reference patients."""
    from ..graph.store import summarize

    rows = summarize(graphs)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'fold':<16} {'target':<10} {'role':<5} {'spots':>6} {'refs':>7} {'near':>7} {'refer':>7} "
               f"{'close':>7}  ref patients")
    for r in rows:
        e = r["edges"]
        click.echo(f"{r['fold']:<16} {r['target']:<10} {r['role']:<5} {r['n_spot']:>6} {r['n_ref']:>7} "
                   f"{e['near']:>7} {e['refer']:>7} {e['close']:>7}  {','.join(r['ref_patients'])}")


def register(main: click.Group) -> None:
    main.add_command(build_graph_command)
    main.add_command(graph_group)
