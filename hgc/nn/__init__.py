"""SpaHGC in PyTorch, on DGL or PyTorch Geometric behind one seam.

Typical use (the trainer owns the loop, optimiser and seeds)::

    from hgc.nn import ModelConfig, SpaHGC, get_backend

    backend = get_backend("auto", device)       # DGL when it imports and can use device, else PyG
    prepared = backend.prepare(slide_graph, device)   # once per graph, not per step
    model = SpaHGC(ModelConfig(), spot_dim, ref_dim, n_genes, backend).to(device)

    loss, parts = model.training_loss(prepared, generator=g)  # two masked views, dropout
    loss.backward(); optimiser.step(); model.update_target()  # BGRL EMA (no-op otherwise)

    model.eval()
    with torch.no_grad():
        pred = model(prepared)                  # (n_spot, G): unmasked graph, deterministic

All training randomness (views, dropout, InfoNCE sampling) comes from ``g``, ideally a
``torch.Generator`` on ``device`` (a CPU one seeds a device generator); ``SpaHGC(..., seed=s)``
initialises the weights from ``s`` without touching the global RNG. ``model(prepared)`` never
masks, drops edges or applies dropout, in either train or eval mode. ``parts`` holds floats
``loss, mse, pcc, contrast_spot, contrast_ref``. ``ModelConfig.to_dict()``
/ ``from_dict()`` round-trip the configuration for checkpoints beside ``model.state_dict()``
(which includes the EMA target encoder). A graph carrying relations the model does not know, or
lacking ones it uses, is an :class:`~hgc.errors.InputError`. ``Ensemble([...])`` averages
seed members and reports their spread (``predict_with_spread``).
"""
from importlib import import_module
from typing import Any

from .config import ModelConfig

#: Exported names that need torch, imported on first use so that reading a config does not load torch.
_LAZY = {"Backend": "graphlib", "PreparedGraph": "graphlib", "get_backend": "graphlib",
         "Ensemble": "model", "SpaHGC": "model"}

__all__ = ["Backend", "Ensemble", "ModelConfig", "PreparedGraph", "SpaHGC", "get_backend"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
