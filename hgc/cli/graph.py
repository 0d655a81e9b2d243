"""``hgc build-graph`` and ``hgc graph inspect``: build the per-fold graph store and look inside it."""
from __future__ import annotations

import json

import click

from ..data.splits import CV_PROTOCOLS, PROTOCOL_HELP
from ..graph.fold import GraphConfig
from . import data_root_option
from .options import config_kwargs, config_options


@click.command("build-graph")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--embeddings", required=True, type=click.Path(dir_okay=False),
              help="Embedding HDF5 written by `hgc embed` for the same manifest.")
@click.option("--protocol", required=True, type=click.Choice(list(CV_PROTOCOLS)), help=PROTOCOL_HELP)
@click.option("--split-file", type=click.Path(dir_okay=False), default=None,
              help="TSV with columns slide, fold, role (train|test), for --protocol split-file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Graph store to write (HDF5).")
@config_options(GraphConfig)
@data_root_option
def build_graph_command(manifest, embeddings, protocol, split_file, out, data_root, **options) -> None:
    """Build one heterogeneous graph per fold and target slide of MANIFEST into --out.

    Gene choice and normalisation are fitted on each fold's training slides; test slides never
    provide references. Nothing is written if any input is inconsistent.
    """
    from ..graph.build import build_from_manifest
    from ..graph.store import summarize

    config = GraphConfig(**config_kwargs(GraphConfig, options))
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
    relations = list(dict.fromkeys(r for row in rows for r in row["edges"]))  # the store's, in table order
    click.echo(f"{'fold':<16} {'target':<10} {'role':<5} {'spots':>6} {'refs':>7} "
               + "".join(f"{r:>8}" for r in relations) + "  ref patients")
    for r in rows:
        click.echo(f"{r['fold']:<16} {r['target']:<10} {r['role']:<5} {r['n_spot']:>6} {r['n_ref']:>7} "
                   + "".join(f"{r['edges'].get(name, 0):>8}" for name in relations) + f"  {','.join(r['ref_patients'])}")


def register(main: click.Group) -> None:
    main.add_command(build_graph_command)
    main.add_command(graph_group)
