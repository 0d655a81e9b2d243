"""Trained models back from their bundles, and their deterministic predictions (with the spread
of a seed ensemble's members)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import InputError
from .rundir import ModelBundle, open_run

log = logging.getLogger(__name__)


def predict_graph(model, prepared) -> np.ndarray:
    """Deterministic prediction on the unmasked graph in eval mode, (n_spot, G) float32."""
    return predict_with_spread(model, prepared)[0]


def predict_with_spread(model, prepared) -> tuple[np.ndarray, np.ndarray | None]:
    """(prediction, spread across ensemble members or None for one model), (n_spot, G) float32 each."""
    import torch

    model.eval()
    with torch.no_grad():
        if hasattr(model, "predict_with_spread"):
            mean, spread = model.predict_with_spread(prepared)
            return mean.cpu().numpy().astype(np.float32), spread.cpu().numpy().astype(np.float32)
        return model(prepared).detach().cpu().numpy().astype(np.float32), None


def load_model(run_dir: str | Path, fold: str, backend: str | None = None, device: str = "cpu"):
    """Rebuild fold ``fold``'s model from a run directory and load its best checkpoint.

    Returns ``(model, backend, fold_info)``; ``backend`` defaults to the one the run trained with
    (weights are backend-neutral, so either backend may load them).
    """
    run = open_run(run_dir)
    return load_bundle_model(run.bundle(fold), backend or run.backend, device)


def load_bundle_model(bundle: ModelBundle, backend: str | None = None, device: str = "cpu"):
    """(model in eval mode, backend, fold info) of a model bundle; backend defaults to its training's."""
    from ..nn import Ensemble, ModelConfig, SpaHGC, get_backend

    info = bundle.info
    be = get_backend(backend or info.get("backend", "auto"))
    mcfg = ModelConfig.from_stored(info["model"])
    members = [SpaHGC(mcfg, info["spot_dim"], info["ref_dim"], info["n_genes"], be)
               for _ in range(int(info.get("ensemble", 1)))]
    model = members[0] if len(members) == 1 else Ensemble(members)
    try:
        model.load_state_dict(bundle.checkpoint())
    except RuntimeError as exc:  # tensors of another shape or name than fold.json describes
        raise InputError(f"model {bundle.path}: the checkpoint does not match its fold.json "
                         f"({str(exc).splitlines()[0]}); train it again with `hgc fit`") from None
    return model.to(device).eval(), be, info
