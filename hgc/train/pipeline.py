"""The whole run, manifest to metrics: embed -> build graphs -> fit -> predict -> evaluate.

Each step writes into ``out_dir`` and records, beside its output (``<output>.stamp.json``), the
settings it ran with and the content of every file it read: the manifest, every slide file the
manifest points to, the encoder's weights, the gene panel file, the split file, and the outputs of
earlier steps. A rerun skips a step only when all of these are unchanged, so editing a counts file
in place, pointing ``$HGC_DATA`` elsewhere or retraining the model reruns exactly the steps that
depend on it, and changing, say, ``--epochs`` reuses the embeddings and graphs. Files are
re-hashed (sha256) only when their size, modification or change time differs from the stamp's
record; a trained model is compared by its tensors, not its file's bytes. Layout::

    out_dir/embeddings.h5     hgc.embed (itself resumable per slide)
    out_dir/graphs.h5         hgc.graph store, all folds
    out_dir/model/            hgc fit run folder
    out_dir/predictions/      <method>/<slide>.h5ad, metrics.{json,csv,md}

``train_model`` (``hgc train``) runs the same steps with protocol ``all`` up to the fit: one model
on every slide, at ``out_dir/model/all/``, a bundle ``hgc predict`` applies to new slides.

Everything that can be checked without the expensive steps (folds, options, the gene panel, and,
before any step runs, every slide's files and the panel's overlap with them) is checked first,
and the run folder is locked for the whole run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .._fingerprint import file_record
from .._outputs import check_writable, command_line, output_lock, write_text
from ..data.splits import VALIDATION_RULE
from ..embed.extract import BATCH_SIZE
from ..embed.patches import PatchViews
from ..errors import InputError
from .config import FitConfig, model_config
from .fit import fit
from .predict import METHODS, check_methods, predict

log = logging.getLogger(__name__)

def _stamp(output: Path) -> Path:
    return output.with_name(output.name + ".stamp.json")


def _read_stamp(output: Path) -> dict[str, Any]:
    try:
        stamp = json.loads(_stamp(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


class Step:
    """One pipeline step: its output, settings and input files, and whether it is up to date.

    ``record`` is the file that identifies the output: the output file itself, or a folder's
    completion record (which carries a fresh write id each time the folder is written). The
    stamp keeps its hash, so an output rewritten by another command is not vouched for.
    """

    def __init__(self, name: str, output: Path, settings: dict[str, Any], inputs: Mapping[str, Path],
                 record: Path | None = None) -> None:
        self.name, self.output, self.settings = name, output, settings
        self.record = record or output
        self.stamp = _read_stamp(output)
        old = self.stamp.get("inputs", {})
        self.inputs = {label: file_record(path, old.get(label)) for label, path in inputs.items()}
        content = {label: r["sha256"] for label, r in self.inputs.items()}
        self.fingerprint = hashlib.sha256(
            json.dumps({"settings": settings, "inputs": content}, sort_keys=True, default=str).encode()
        ).hexdigest()

    @property
    def up_to_date(self) -> bool:
        if not (self.record.is_file() and self.stamp.get("fingerprint") == self.fingerprint):
            return False
        recorded = self.stamp.get("output") or {}
        return file_record(self.record, recorded)["sha256"] == recorded.get("sha256")

    def run(self, work: Callable[[], Any]) -> bool:
        """Do ``work`` unless the step is up to date; True if it ran. The stamp goes last."""
        if self.up_to_date:
            log.info("%s: up to date (%s), skipped", self.name, self.output)
            return False
        _stamp(self.output).unlink(missing_ok=True)
        log.info("%s: running -> %s", self.name, self.output)
        work()
        self.stamp = {"step": self.name, "fingerprint": self.fingerprint, "settings": self.settings,
                      "inputs": self.inputs, "output": file_record(self.record)}
        write_text(_stamp(self.output), json.dumps(self.stamp, indent=2, default=str) + "\n")
        return True


def manifest_inputs(manifest) -> dict[str, Path]:
    """The manifest file and every file its slides are read from, labelled by path."""
    from ..data.readers import FORMATS

    files = {"manifest": manifest.path}
    for entry in manifest.entries:
        for path in FORMATS[entry.format].input_files(entry):
            files[f"slide {entry.slide}: {path}"] = path
    return files


def run_pipeline(
    manifest: str | Path,
    protocol: str,
    genes: str,
    encoder: str,
    out_dir: str | Path,
    *,
    fit_config: FitConfig | None = None,
    normalize: str = "log1p",
    methods: Sequence[str] = METHODS,
    device: str = "auto",
    data_root: str | Path | None = None,
    split_file: str | Path | None = None,
    batch_size: int = BATCH_SIZE,
    graph_options: dict[str, Any] | None = None,
    progress: bool = True,
    weights: str | Path | None = None,
    patch_mpp: float | None = None,
    views: PatchViews | None = None,
) -> dict[str, Any]:
    """Run every step (skipping up-to-date ones) and return the evaluation report dict.

    ``weights``: the encoder's weights file, when not its default source (as ``hgc embed --weights``);
    ``patch_mpp``: a working resolution for every patch (as ``hgc embed --patch-mpp``); ``views``:
    wider fields of view and test-time augmentation (as ``hgc embed --context/--tta``).
    """
    return _pipeline(manifest, protocol, genes, encoder, out_dir, fit_config=fit_config, normalize=normalize,
                     methods=methods, device=device, data_root=data_root, split_file=split_file,
                     batch_size=batch_size, graph_options=graph_options, progress=progress, weights=weights,
                     patch_mpp=patch_mpp, views=views)


def train_model(
    manifest: str | Path,
    genes: str,
    encoder: str,
    out_dir: str | Path,
    *,
    fit_config: FitConfig | None = None,
    normalize: str = "log1p",
    device: str = "auto",
    data_root: str | Path | None = None,
    batch_size: int = BATCH_SIZE,
    graph_options: dict[str, Any] | None = None,
    progress: bool = True,
    weights: str | Path | None = None,
    patch_mpp: float | None = None,
    views: PatchViews | None = None,
) -> Path:
    """Train one model on every slide of ``manifest`` (early stopping on validation slides drawn from
    them) into ``out_dir`` (embeddings, graphs and the run ``model/``, cached like ``run_pipeline``);
    returns the model bundle's folder, which ``hgc predict`` applies to new slides."""
    from .rundir import open_model

    _pipeline(manifest, "all", genes, encoder, out_dir, fit_config=fit_config, normalize=normalize, methods=("hgc",),
              device=device, data_root=data_root, split_file=None, batch_size=batch_size, graph_options=graph_options,
              progress=progress, weights=weights, patch_mpp=patch_mpp, views=views, predict_and_evaluate=False)
    return open_model(out_dir).path


def _pipeline(manifest, protocol, genes, encoder, out_dir, *, fit_config, normalize, methods, device, data_root,
              split_file, batch_size, graph_options, progress, weights, patch_mpp=None, views=None,
              predict_and_evaluate: bool = True):
    from .._devices import check_device
    from ..data.genes import check_panel_overlap, panel_file, resolve_panel
    from ..data.manifest import data_root as resolve_root
    from ..data.manifest import read_manifest
    from ..data.splits import make_folds
    from ..embed import embed_manifest, load_encoder
    from ..evaluate.predictions import RECORD as PREDICTION_RECORD
    from ..evaluate.predictions import check_prediction_output
    from ..evaluate.report import write_report
    from ..graph.build import build_from_manifest
    from ..graph.fold import GraphConfig
    from .fit import check_run_output
    from .rundir import RUN_RECORD, open_run

    # Cheap checks first: nothing is embedded for a run that would fail later on a typo.
    out = check_writable(Path(out_dir))
    methods = check_methods(methods)
    device = check_device(device)
    fit_config = replace(fit_config or FitConfig(), device=device, progress=progress)
    gcfg = GraphConfig(genes=genes, normalize=normalize, **(graph_options or {}))
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    m = read_manifest(manifest, data_root)
    folds = make_folds(m.patients, protocol, split_file)
    root = resolve_root(data_root)
    panel = panel_file(genes, data_root)
    enc = load_encoder(encoder, weights)

    with output_lock(out, command_line()):
        model, preds = out / "model", out / "predictions"
        if "hgc" in methods:
            check_run_output(model)
        if predict_and_evaluate:
            check_prediction_output(preds)
        data = manifest_inputs(m)
        emb = out / "embeddings.h5"
        # absent when unset: caches of before stay valid
        working = {**({"patch_mpp": patch_mpp} if patch_mpp is not None else {}), **(views.attrs() if views else {})}
        files = enc.weight_files  # a combination of encoders reads several
        weights_read = {f"encoder weights{f' ({n})' if len(files) > 1 else ''}": p for n, p in files.items()}
        embed_step = Step("embed", emb, {"encoder": encoder, "data_root": str(root), **working}, {**data, **weights_read})
        graphs = out / "graphs.h5"
        extra = {"gene panel": panel} if panel else {}
        if split_file:
            extra["split file"] = Path(split_file)

        def graph_step() -> Step:
            return Step("graphs", graphs, {"protocol": protocol, "graph_config": gcfg.to_json(), "data_root": str(root),
                                           "validation_rule": VALIDATION_RULE},
                        {**data, **extra, "embeddings.h5": emb})

        if not (embed_step.up_to_date and graph_step().up_to_date):
            used = list(dict.fromkeys(s for f in folds for s in (*f.train, *f.test)))
            slides = [m.load(s) for s in used]  # every slide's files are checked before embedding
            if panel is not None:
                check_panel_overlap(resolve_panel(genes, data_root), slides)
            del slides
        embed_step.run(lambda: embed_manifest(m, encoder, emb, weights=weights, device=device, batch_size=batch_size,
                                              progress=progress, data_root=data_root, patch_mpp=patch_mpp,
                                              views=views))
        graph_step().run(lambda: build_from_manifest(manifest, emb, protocol, graphs, gcfg, split_file, data_root))

        # the model the preset and options resolve to, so a run made under other defaults is refitted
        train_settings = {**{k: v for k, v in fit_config.to_dict().items() if k != "progress"},
                          "model_config": model_config(fit_config).to_dict()}
        if "hgc" in methods:
            Step("fit", model, {"fit": train_settings}, {"graphs.h5": graphs}, model / RUN_RECORD).run(
                lambda: fit(graphs, model, fit_config))

        if not predict_and_evaluate:
            return None
        model_digest = None
        if "hgc" in methods:
            with output_lock(model, command_line(), shared=True):
                model_digest = open_run(model).tensor_digest()
        Step("predict", preds, {"methods": list(methods), "model": model_digest}, {"graphs.h5": graphs},
             preds / PREDICTION_RECORD).run(
            lambda: predict(model if "hgc" in methods else None, graphs, preds, methods, device=device))
        return write_report(preds)
