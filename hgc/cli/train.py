"""``hgc fit``, ``hgc train``, ``hgc predict``, ``hgc evaluate`` and ``hgc run`` (the whole pipeline)."""
from __future__ import annotations

import json

import click

from ..data.slide import SPOT_PITCH_UM
from ..data.splits import CV_PROTOCOLS, PROTOCOL_HELP
from ..embed.registry import DEFAULT_ENCODER
from ..evaluate.biology import TUMOUR_PATTERN
from ..graph.fold import GraphConfig
from ..nn.config import BACKENDS, ModelConfig
from ..train.config import FitConfig
from ..train.predict import METHODS
from . import data_root_option, device_option
from .embed import batch_size_option, patch_mpp_option, patch_views, patch_views_options
from .options import config_kwargs, config_options

METHOD_CHOICES = ",".join(METHODS)
#: Graph settings that ``run`` and ``train`` take from their other options: the similarity search
#: runs on the CPU (the training --device is for the model) and the validation slides' choice
#: keeps seed 0, so that changing the training --seed reuses the graphs.
PIPELINE_GRAPH_SKIP = ("seed", "device")
#: Graph settings ``run`` and ``train`` pass to the pipeline by name rather than as graph options.
PIPELINE_GRAPH_NAMED = ("genes", "normalize")


def _split_csv(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


def _fit_options(skip: tuple[str, ...] = ()):
    """Training options shared by ``fit``, ``train`` and ``run``: every FitConfig field (but
    ``skip``) and the model sizes, generated from the configs (one definition, three commands)."""
    def decorate(f):
        return config_options(FitConfig, skip=skip)(config_options(ModelConfig)(f))

    return decorate


def _graph_options(f):
    """Graph options of ``train`` and ``run``: those of ``build-graph`` but the ones they set themselves."""
    return config_options(GraphConfig, skip=PIPELINE_GRAPH_SKIP, required=("genes",))(f)


def _fit_config(kw: dict) -> FitConfig:
    # options left at their command-line defaults give way to the preset's (training and model) choices
    options = config_kwargs(FitConfig, kw, keep_defaults=False)
    model = config_kwargs(ModelConfig, kw, keep_defaults=False)
    return FitConfig.from_preset(kw["preset"], **{**options, "model": model})


def _graph_kwargs(kw: dict) -> dict:
    options = config_kwargs(GraphConfig, kw, skip=PIPELINE_GRAPH_SKIP)
    return {k: v for k, v in options.items() if k not in PIPELINE_GRAPH_NAMED}


def register(main: click.Group) -> None:
    @main.command("fit")
    @click.argument("graphs", type=click.Path(dir_okay=False, exists=True))
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
    @_fit_options()
    def fit_command(graphs: str, out: str, **kw) -> None:
        """Train SpaHGC on every fold of the graph store GRAPHS (early stopping on validation slides)."""
        from ..train.fit import fit

        for r in fit(graphs, out, _fit_config(kw)):
            click.echo(f"fold {r.fold}: best epoch {r.best_epoch} of {r.epochs_run}, "
                       f"validation PCC {r.best_val_pcc:.4f} on {r.val_slides or 'no slide'}")
        click.echo(f"run written to {out}")

    @main.command("train")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
    @click.option("--encoder", default=DEFAULT_ENCODER, show_default=True, help="Image encoder (see `hgc embed --help`).")
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                  help="Folder to write (embeddings, graphs and the model; steps are cached there).")
    @batch_size_option
    @click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="The encoder's weights file, when not its default source (see `hgc embed --help`).")
    @patch_mpp_option
    @patch_views_options
    @data_root_option
    @_graph_options
    @_fit_options(skip=("folds",))  # one model on every slide: there is no fold to choose
    def train_command(manifest, encoder, out, batch_size, weights, patch_mpp, context, tta, data_root, **kw) -> None:
        """Train one model on every slide of MANIFEST, to predict new slides with `hgc predict`.

        The model is a self-contained bundle (weights, reference bank of the training spots, genes,
        normalisation, encoder, graph settings, a model card) at OUT/model/all/; copy it anywhere.
        """
        from ..train.pipeline import train_model

        bundle = train_model(manifest, kw["genes"], encoder, out, fit_config=_fit_config(kw), normalize=kw["normalize"],
                             device=kw["device"], data_root=data_root, batch_size=batch_size,
                             graph_options=_graph_kwargs(kw), progress=kw["progress"], weights=weights,
                             patch_mpp=patch_mpp, views=patch_views(context, tta))
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
    @click.option("--geometry", type=click.Choice(list(SPOT_PITCH_UM)), default=None,
                  help="TARGETS that are an image alone: the virtual spots' grid (default: the model's training platform).")
    @click.option("--pitch-um", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Virtual spots' centre-to-centre distance (default: ST 200, Visium 100 µm).")
    @click.option("--spot-diameter-um", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Virtual spots' diameter (default: ST 100, Visium 55 µm).")
    @click.option("--backend", type=click.Choice(list(BACKENDS)), default=None, help="Default: the model's backend.")
    @batch_size_option
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
    @click.option("--annotations", default=None, metavar="COLUMN",
                  help="Per-spot label column (from the manifest's annotations table) defining regions: "
                       "region agreement and tumour separation.")
    @click.option("--region-map", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="Table naming the region of each label (per patient if it has a patient column), "
                       "e.g. her2st's res/ST-cluster/motivation.csv.")
    @click.option("--tumour-regions", default=TUMOUR_PATTERN, show_default=True,
                  help="Regular expression: regions it matches are tumour.")
    @click.option("--signatures", multiple=True, type=click.Path(dir_okay=False, exists=True),
                  help="Gene-set file (GMT, or a gene table with optional weights); repeat for more.")
    @click.option("--genes", default="", help="Comma-separated genes whose per-region means are reported.")
    @click.option("--manifest", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="Manifest to read annotations from when the prediction files do not carry them.")
    @data_root_option
    def evaluate_command(pred_dir: str, as_json: bool, annotations, region_map, tumour_regions, signatures, genes,
                         manifest, data_root) -> None:
        """PCC-ALL/HEG/HVG, MSE and MAE per slide and mean ± std per method; writes metrics.{json,csv,md}.

        With --annotations and/or --signatures, also checks biology, every method beside observed
        expression: region rank agreement, tumour AUROC of each signature, signature score PCC.
        """
        from ..data import read_manifest
        from ..evaluate.biology import BiologySettings
        from ..evaluate.report import json_safe, markdown_table, write_report

        biology = BiologySettings.from_files(annotations, region_map, signatures, tumour_regions,
                                             [g.strip() for g in genes.split(",") if g.strip()])
        report = write_report(pred_dir, biology=biology if biology.active else None,
                              manifest=read_manifest(manifest, data_root) if manifest else None)
        click.echo(json.dumps(json_safe(report), indent=2) if as_json else markdown_table(report), nl=False)

    @main.command("run")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
    @click.option("--protocol", type=click.Choice(list(CV_PROTOCOLS)), required=True, help=PROTOCOL_HELP)
    @click.option("--encoder", default=DEFAULT_ENCODER, show_default=True, help="Image encoder (see `hgc embed --help`).")
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder (steps are cached there).")
    @click.option("--methods", default=METHOD_CHOICES, show_default=True, help="Comma-separated methods.")
    @click.option("--split-file", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="TSV slide/fold/role for --protocol split-file.")
    @batch_size_option
    @patch_mpp_option
    @patch_views_options
    @data_root_option
    @_graph_options
    @_fit_options()
    def run_command(manifest, protocol, encoder, out, methods, split_file, batch_size, patch_mpp, context, tta,
                    data_root, **kw) -> None:
        """Embed, build graphs, fit, predict and evaluate MANIFEST; print the results table.

        Each step is skipped when its output in OUT exists and was made from the same inputs and
        settings, so a rerun with other training options reuses embeddings and graphs.
        """
        from ..evaluate.report import markdown_table
        from ..train.pipeline import run_pipeline

        report = run_pipeline(
            manifest, protocol, kw["genes"], encoder, out, fit_config=_fit_config(kw), normalize=kw["normalize"],
            methods=_split_csv(methods), device=kw["device"], data_root=data_root, split_file=split_file,
            batch_size=batch_size, graph_options=_graph_kwargs(kw), progress=kw["progress"], patch_mpp=patch_mpp,
            views=patch_views(context, tta),
        )
        click.echo(markdown_table(report), nl=False)
