"""The whole run, manifest to metrics: embed -> build graphs -> fit -> predict -> evaluate.

Each step writes into ``out_dir`` and records a fingerprint of its inputs and settings beside its
output (``<output>.stamp.json``). A rerun skips a step whose output exists with a matching
fingerprint, so changing, say, ``--epochs`` retrains and re-predicts but reuses the embeddings
and graphs. Layout::

    out_dir/embeddings.h5     hgc.embed (itself resumable per slide)
    out_dir/graphs.h5         hgc.graph store, all folds
    out_dir/model/            hgc fit run directory
    out_dir/predictions/      <method>/<slide>.h5ad, metrics.{json,csv,md}
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .fit import FitConfig, fit
from .predict import METHODS, predict

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (streamed), the content fingerprint of a step's input."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_digest(folder: Path, pattern: str) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob(pattern)):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(output: Path) -> Path:
    return output.with_name(output.name + ".stamp.json")


def cached_step(name: str, output: Path, settings: dict[str, Any], run: Callable[[], Any], clear: bool = True) -> bool:
    """Run ``run`` unless ``output`` exists with the same settings fingerprint; True if it ran.

    With ``clear``, a stale output (other settings, or an interrupted step without a stamp) is
    removed first, so e.g. predictions of a method no longer asked for cannot linger; steps that
    resume their own work (embedding) keep it.
    """
    fp = _fingerprint(settings)
    stamp = _stamp(output)
    if output.exists() and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp:
        log.info("%s: up to date (%s), skipped", name, output)
        return False
    stamp.unlink(missing_ok=True)
    if clear and output.is_dir():
        shutil.rmtree(output)
    elif clear and output.exists():
        output.unlink()
    log.info("%s: running -> %s", name, output)
    run()
    stamp.write_text(json.dumps({"step": name, "fingerprint": fp, "settings": settings}, indent=2, default=str) + "\n")
    return True


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
    batch_size: int = 64,
    graph_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every step (skipping up-to-date ones) and return the evaluation report dict."""
    from ..embed import embed_manifest
    from ..evaluate.report import write_report
    from ..graph.build import GraphConfig, build_from_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Path(manifest)
    fit_config = replace(fit_config or FitConfig(), device=device, progress=progress)

    emb = out / "embeddings.h5"
    # Embedding resumes per slide by itself (encoder, weights and patch settings checked inside):
    # a stale or partial file is updated in place, never removed.
    cached_step("embed", emb, {"manifest": file_digest(manifest), "encoder": encoder,
                               "data_root": str(data_root) if data_root else None},
                lambda: embed_manifest(manifest, encoder, emb, device=device, batch_size=batch_size,
                                       progress=progress, data_root=data_root), clear=False)

    graphs = out / "graphs.h5"
    gcfg = GraphConfig(genes=genes, normalize=normalize, **(graph_options or {}))
    cached_step("graphs", graphs, {
        "manifest": file_digest(manifest), "embeddings": file_digest(emb), "protocol": protocol,
        "graph_config": gcfg.to_json(), "split_file": file_digest(Path(split_file)) if split_file else None,
        "data_root": str(data_root) if data_root else None,
    }, lambda: build_from_manifest(manifest, emb, protocol, graphs, gcfg, split_file, data_root))

    model = out / "model"
    train_settings = {k: v for k, v in fit_config.to_dict().items() if k != "progress"}
    if "hgc" in methods:
        cached_step("fit", model, {"graphs": file_digest(graphs), "fit": train_settings},
                    lambda: fit(graphs, model, fit_config))

    preds = out / "predictions"
    cached_step("predict", preds, {
        "graphs": file_digest(graphs), "methods": list(methods),
        "model": _tree_digest(model, "*.safetensors") if "hgc" in methods else None,
    }, lambda: predict(model if "hgc" in methods else None, graphs, preds, methods, device=device))
    return write_report(preds)
