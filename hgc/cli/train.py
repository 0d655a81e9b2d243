"""``hgc fit``, ``hgc train``, ``hgc predict``, ``hgc evaluate`` and ``hgc run`` (the whole pipeline)."""
from __future__ import annotations

import json

import click

from ..embed.registry import DEFAULT_ENCODER
from .embed import patch_mpp_option
from ..train.presets import DEFAULT_PRESET, PRESETS
from . import data_root_option, device_option

METHOD_CHOICES = "hgc,ridge,knn,mean"


def _split_csv(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


def _fit_options(f):
    """Training options shared by ``fit`` and ``run`` (one definition, two commands)."""
    options = [
        click.option("--backend", type=click.Choice(["auto", "dgl", "pyg"]), default="auto", show_default=True,
                     help="Graph library (auto: DGL when it imports, else PyG)."),
        device_option(),
        click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="A CPU run with the same seed repeats exactly."),
        click.option("--lr", type=float, default=1e-4, show_default=True),
        click.option("--weight-decay", type=float, default=1e-4, show_default=True),
        click.option("--patience", type=click.IntRange(min=0), default=50, show_default=True,
                     help="Stop after this many epochs without validation improvement (0: never stop early)."),
        click.option("--contrast", type=click.Choice(["bgrl", "infonce", "none"]), default="bgrl", show_default=True),
        click.option("--no-masking", is_flag=True, help="Train without the masked views (ablation)."),
        click.option("--relations", default=None, help="Comma-separated relations to use, e.g. near,refer (default: all)."),
        click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True, help="Hidden size of the GNN."),
        click.option("--layers", type=click.IntRange(min=0), default=4, show_default=True, help="Relational layers."),
        click.option("--val-slides", default=None,
                     help="Comma-separated training slides to stop early on (default: chosen by seed, per fold)."),
        click.option("--ensemble", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Models per fold, trained from successive seeds and averaged; predictions then carry "
                          "their spread across members as layers['uncertainty'] (per spot and gene)."),
        click.option("--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True,
                     help="Named model and training choices: " + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items())
                     + ". Options given on the command line override the preset's training defaults."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _fold_option(f):
    return click.option("--fold", "folds", multiple=True, help="Train only this fold (repeatable; default: all).")(f)


def _fit_config(kw: dict):
    from ..train.fit import FitConfig

    options = dict(
        backend=kw["backend"], device=kw["device"], epochs=kw["epochs"], seed=kw["seed"], lr=kw["lr"],
        weight_decay=kw["weight_decay"], patience=kw["patience"] or None,
        contrast=kw["contrast"], masking=not kw["no_masking"],
        relations=tuple(_split_csv(kw["relations"])) if kw["relations"] else None,
        folds=tuple(kw.get("folds", ())) or None, model={"hidden": kw["hidden"], "layers": kw["layers"]},
        val_slides=tuple(_split_csv(kw["val_slides"])) if kw["val_slides"] else None, ensemble=kw["ensemble"],
    )
    # the preset's training defaults replace the options left at their command-line defaults
    ctx = click.get_current_context()
    for name in PRESETS[kw["preset"]].fit:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            del options[name]
    return FitConfig.from_preset(kw["preset"], **options)


def register(main: click.Group) -> None:
    @main.command("fit")
    @click.argument("graphs", type=click.Path(dir_okay=False, exists=True))
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
    @_fit_options
    @_fold_option
    def fit_command(graphs: str, out: str, **kw) -> None:
        """Train SpaHGC on every fold of the graph store GRAPHS (early stopping on validation slides)."""
        from ..train.fit import fit

        for r in fit(graphs, out, _fit_config(kw)):
            click.echo(f"fold {r.fold}: best epoch {r.best_epoch} of {r.epochs_run}, "
                       f"validation PCC {r.best_val_pcc:.4f} on {r.val_slides or 'no slide'}")
        click.echo(f"run written to {out}")

    @main.command("train")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
    @click.option("--genes", required=True, help="Gene panel: hist2st-her2st, hist2st-cscc, top-mean:N, hvg:N or a file.")
    @click.option("--encoder", default=DEFAULT_ENCODER, show_default=True, help="Image encoder (see `hgc embed --help`).")
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                  help="Folder to write (embeddings, graphs and the model; steps are cached there).")
    @click.option("--normalize", type=click.Choice(["log1p", "log10-minmax"]), default="log1p", show_default=True)
    @click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Embedding batch size.")
    @click.option("--n-val", type=click.IntRange(min=0), default=1, show_default=True,
                  help="Validation slides (early stopping), taken from the manifest's slides.")
    @click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="The encoder's weights file, when not its default source (see `hgc embed --help`).")
    @patch_mpp_option
    @click.option("--no-progress", is_flag=True, help="No progress bars.")
    @data_root_option
    @_fit_options
    def train_command(manifest, genes, encoder, out, normalize, batch_size, n_val, weights, patch_mpp, no_progress,
                      data_root, **kw) -> None:
        """Train one model on every slide of MANIFEST, to predict new slides with `hgc predict`.

        The model is a self-contained bundle (weights, reference bank of the training spots, genes,
        normalisation, encoder, graph settings, a model card) at OUT/model/all/; copy it anywhere.
        """
        from ..train.pipeline import train_model

        bundle = train_model(manifest, genes, encoder, out, fit_config=_fit_config(kw), normalize=normalize,
                             device=kw["device"], data_root=data_root, batch_size=batch_size,
                             graph_options={"n_val": n_val}, progress=not no_progress, weights=weights,
                             patch_mpp=patch_mpp)
        from ..train.rundir import early_stopping, open_model

        info = open_model(bundle).info
        click.echo(f"model written to {bundle}: {info['n_genes']} genes, trained on {', '.join(info['train_slides'])}; "
                   f"early stopping on {early_stopping(info)}")

    @main.command("predict")
    @click.argument("model", type=click.Path(file_okay=False))
    @click.argument("targets", required=False, type=click.Path(dir_okay=False, exists=True))
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Prediction folder to write.")
    @click.option("--graphs", default=None, type=click.Path(dir_okay=False, exists=True),
                  help="Cross-validation form: the graph store MODEL (a run folder) was fitted on, instead of TARGETS.")
    @click.option("--methods", default=None,
                  help=f"Comma-separated methods of {METHOD_CHOICES} (default: all with --graphs, hgc for TARGETS).")
    @click.option("--embeddings", default=None, type=click.Path(dir_okay=False),
                  help="TARGETS: file caching their embeddings (default: OUT.embeddings.h5 beside OUT).")
    @click.option("--weights", default=None, type=click.Path(dir_okay=False, exists=True),
                  help="TARGETS: the encoder's weights file, when not the default source (must be the model's).")
    @click.option("--geometry", type=click.Choice(["st", "visium"]), default=None,
                  help="TARGETS that are an image alone: the virtual spots' grid (default: the model's training platform).")
    @click.option("--pitch-um", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Virtual spots' centre-to-centre distance (default: ST 200, Visium 100 µm).")
    @click.option("--spot-diameter-um", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Virtual spots' diameter (default: ST 100, Visium 55 µm).")
    @click.option("--backend", type=click.Choice(["auto", "dgl", "pyg"]), default=None, help="Default: the model's backend.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Embedding batch size.")
    @click.option("--no-progress", is_flag=True, help="No progress bars.")
    @data_root_option
    @device_option()
    def predict_command(model, targets, out, graphs, methods, embeddings, weights, geometry, pitch_um, spot_diameter_um,
                        backend, batch_size, no_progress, data_root, device) -> None:
        """Predict the slides of TARGETS (a manifest; counts optional) with MODEL into OUT.

        MODEL is a model bundle (`hgc train`, or one fold folder of `hgc fit`), or a folder holding
        exactly one. Each slide gets OUT/<method>/<slide>.h5ad, ready for scanpy (`sc.pl.spatial`).
        A slide that is an image alone (manifest format `image`) gets virtual spots on its tissue,
        shown in OUT/tissue/<slide>.png.
        With --graphs instead of TARGETS: the cross-validation form, predicting every test slide of
        the graph store with the run folder MODEL and the baselines.
        """
        from ..errors import InputError

        if (targets is None) == (graphs is None):
            raise InputError("give either TARGETS (a manifest of slides to predict) or --graphs (the graph store "
                             "of a cross-validation run), not both or neither")
        if graphs is not None:
            from ..train.predict import predict

            files = predict(model, graphs, out, _split_csv(methods or METHOD_CHOICES), backend=backend, device=device)
        else:
            from ..train.apply import predict_slides

            files = predict_slides(model, targets, out, methods=_split_csv(methods or "hgc"), embeddings=embeddings,
                                   weights=weights, backend=backend, device=device, batch_size=batch_size,
                                   data_root=data_root, progress=not no_progress, geometry=geometry,
                                   pitch_um=pitch_um, spot_diameter_um=spot_diameter_um)
        click.echo(f"{len(files)} prediction file{'s' if len(files) != 1 else ''} written to {out}")

    @main.command("evaluate")
    @click.argument("pred_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("--json", "as_json", is_flag=True, help="Print the full metrics JSON instead of the table.")
    def evaluate_command(pred_dir: str, as_json: bool) -> None:
        """PCC-ALL/HEG/HVG, MSE and MAE per slide and mean ± std per method; writes metrics.{json,csv,md}."""
        from ..evaluate.report import json_safe, markdown_table, write_report

        report = write_report(pred_dir)
        click.echo(json.dumps(json_safe(report), indent=2) if as_json else markdown_table(report), nl=False)

    @main.command("run")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
    @click.option("--protocol", type=click.Choice(["patient-kfold", "slide-loso", "split-file"]), required=True)
    @click.option("--genes", required=True, help="Gene panel: hist2st-her2st, hist2st-cscc, top-mean:N, hvg:N or a file.")
    @click.option("--encoder", default=DEFAULT_ENCODER, show_default=True, help="Image encoder (see `hgc embed --help`).")
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder (steps are cached there).")
    @click.option("--normalize", type=click.Choice(["log1p", "log10-minmax"]), default="log1p", show_default=True)
    @click.option("--methods", default=METHOD_CHOICES, show_default=True, help="Comma-separated methods.")
    @click.option("--split-file", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="TSV slide/fold/role for --protocol split-file.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Embedding batch size.")
    @click.option("--n-val", type=click.IntRange(min=0), default=1, show_default=True,
                  help="Validation slides per fold (early stopping), taken from the training slides.")
    @patch_mpp_option
    @click.option("--no-progress", is_flag=True, help="No progress bars.")
    @data_root_option
    @_fit_options
    @_fold_option
    def run_command(manifest, protocol, genes, encoder, out, normalize, methods, split_file, batch_size,
                    n_val, patch_mpp, no_progress, data_root, **kw) -> None:
        """Embed, build graphs, fit, predict and evaluate MANIFEST; print the results table.

        Each step is skipped when its output in OUT exists and was made from the same inputs and
        settings, so a rerun with other training options reuses embeddings and graphs.
        """
        from ..evaluate.report import markdown_table
        from ..train.pipeline import run_pipeline

        report = run_pipeline(
            manifest, protocol, genes, encoder, out, fit_config=_fit_config(kw), normalize=normalize,
            methods=_split_csv(methods), device=kw["device"], data_root=data_root, split_file=split_file,
            batch_size=batch_size, graph_options={"n_val": n_val}, progress=not no_progress, patch_mpp=patch_mpp,
        )
        click.echo(markdown_table(report), nl=False)
