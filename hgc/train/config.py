"""Training settings (:class:`FitConfig`) and the model configuration they resolve to
(:func:`model_config`: preset, then the user's overrides)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .._devices import check_device
from .._options import option
from .._records import ConfigRecord
from ..errors import InputError
from ..graph.record import RELATIONS
from ..nn.config import BACKENDS, CONTRASTS, check_backend
from .presets import DEFAULT_PRESET, PRESETS, get_preset

log = logging.getLogger(__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class FitConfig(ConfigRecord):
    """Training settings; every field is a ``hgc fit`` option and is saved in ``config.json``."""

    backend: str = field(default="auto", metadata=option(
        "Graph library (auto: DGL when it imports, else PyG).", choices=BACKENDS))
    device: str = field(default="auto", metadata=option("", device=True))
    epochs: int = field(default=200, metadata=option("Most training epochs.", minimum=1))
    seed: int = field(default=0, metadata=option("A CPU run with the same seed repeats exactly."))
    lr: float = field(default=1e-4, metadata=option("Learning rate (AdamW)."))
    weight_decay: float = field(default=1e-4, metadata=option("Weight decay (AdamW).", minimum=0))
    #: epochs without validation improvement before stopping; None: never stop
    patience: int | None = field(default=50, metadata=option(
        "Stop after this many epochs without validation improvement (0: never stop early).", minimum=0,
        zero_means_none=True))
    contrast: str = field(default="bgrl", metadata=option("Contrastive term.", choices=CONTRASTS))
    masking: bool = field(default=True, metadata=option("Train on masked views (--no-masking: an ablation)."))
    relations: tuple[str, ...] | None = field(default=None, metadata=option(
        "Comma-separated relations to use, e.g. near,refer (default: all).", csv=True))
    folds: tuple[str, ...] | None = field(default=None, metadata=option(
        "Train only this fold (repeatable; default: all).", name="--fold", multiple=True))
    val_slides: tuple[str, ...] | None = field(default=None, metadata=option(
        "Comma-separated training slides to stop early on (default: chosen by seed, per fold).", csv=True))
    model: dict[str, Any] = field(default_factory=dict)  # further ModelConfig overrides (over the preset's)
    preset: str = field(default=DEFAULT_PRESET, metadata=option(
        "Named model and training choices: " + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items())
        + ". Options given on the command line override the preset's training defaults.", choices=tuple(PRESETS)))
    ensemble: int = field(default=1, metadata=option(
        "Models per fold, trained from successive seeds and averaged; predictions then carry their spread "
        "across members as layers['uncertainty'] (per spot and gene).", minimum=1))
    graphs_per_step: int | None = field(default=None, metadata=option(
        "Slide graphs per optimiser step, their gradients averaged (0 or unset: one per process, so 1 "
        "unless started by torchrun). A one-process run with N matches an N-process torchrun run.",
        minimum=0, zero_means_none=True))
    progress: bool = field(default=True, metadata=option("Progress bars."))

    def __post_init__(self) -> None:
        check_backend(self.backend)
        self.device = check_device(self.device)
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        if not (_is_number(self.lr) and self.lr > 0):
            raise InputError(f"lr (the learning rate) must be a finite number > 0, got {self.lr!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.ensemble, int) and self.ensemble >= 1):
            raise InputError(f"ensemble must be a whole number >= 1 (models per fold), got {self.ensemble!r}")
        if self.graphs_per_step is not None and not (isinstance(self.graphs_per_step, int) and self.graphs_per_step >= 1):
            raise InputError(f"graphs per step must be a whole number >= 1 (or None: one per process), "
                             f"got {self.graphs_per_step!r}")
        if self.patience is not None and not (isinstance(self.patience, int) and self.patience >= 1):
            raise InputError(f"patience must be a whole number >= 1 (or None: never stop early), got {self.patience!r}")
        if self.relations is not None:
            self.relations = tuple(self.relations)
            unknown = sorted(set(self.relations) - set(RELATIONS))
            if unknown or not self.relations:
                raise InputError(f"relations {unknown or '(none)'} are not relations of hgc's graphs; "
                                 f"choose from {', '.join(RELATIONS)}")
        if self.folds is not None:
            self.folds = tuple(self.folds)
        if self.val_slides is not None:
            self.val_slides = tuple(self.val_slides)
        get_preset(self.preset)
        model_config(self)  # the model options (and contrast, masking) are checked by ModelConfig

    @classmethod
    def from_preset(cls, name: str, **options: Any) -> "FitConfig":
        """A config with preset ``name``'s training defaults; ``options`` override them."""
        return cls(**{**get_preset(name).fit, **options, "preset": name})


def model_config(config: FitConfig, steps: int | None = None):
    """The :class:`hgc.nn.ModelConfig` a FitConfig asks for: its preset's model choices, then
    ``config.model``; ``steps`` (the optimiser steps: epochs x steps per epoch) drives BGRL's momentum
    schedule unless set."""
    from ..nn.config import DEFAULT_DROP, ModelConfig

    preset = get_preset(config.preset).model
    overrides: dict[str, Any] = {"ema_total_steps": steps, **preset, **config.model}
    if "drop" in config.model:  # per relation: an override names only the relations it changes
        overrides["drop"] = {**DEFAULT_DROP, **preset.get("drop", {}), **config.model["drop"]}
    overrides.update(contrast=config.contrast, masking=config.masking)
    if config.relations is not None:
        overrides["relations"] = tuple(config.relations)
    return ModelConfig.from_dict(overrides)
