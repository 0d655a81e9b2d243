"""SpaHGC's configuration: every size, switch and choice of the model, with no torch import.

The command line and the run/model folders read it without loading torch; the choice lists here
are the only ones (layers, masking and the contrast import them from here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .._options import option
from .._records import ConfigRecord
from ..errors import InputError
from ..graph.record import RELATIONS, relation_names

#: Graph libraries the model runs on (``auto``: DGL when it imports and can use the device, else PyG).
BACKENDS: tuple[str, ...] = ("auto", "dgl", "pyg")
CONTRASTS: tuple[str, ...] = ("bgrl", "infonce", "none")
MASK_UNITS = ("node", "feature")
ATTENTION_LOGITS = ("scaled", "leaky")
INPUT_BLOCKS = ("linear", "mlp")
EXPRESSION_INPUTS = ("raw", "embedded")
HEADS = ("hgc", "published")
SUPERVISE = ("view1", "clean")


def check_backend(name: str) -> str:
    """``name`` if it is a graph backend of :data:`BACKENDS`, else an :class:`InputError`."""
    if name not in BACKENDS:
        raise InputError(f"unknown graph backend '{name}'; expected one of {list(BACKENDS)}")
    return name


#: What a stored config that lacks an option meant: the behaviour before the option existed
#: (hgc 0.1's model), so bundles written then rebuild the same network.
BEFORE_OPTION: dict[str, Any] = {
    "mask_unit": "node", "input_block": "linear", "expression": "raw", "attention_logits": "scaled",
    "attention_dropout": 0.0, "dropout_layers": True, "head": "hgc", "gene_rank": None,
}
#: The fraction of each relation's edges a view drops, by default (the published code's).
DEFAULT_DROP: dict[str, float] = {"near": 0.5, "refer": 0.4, "close": 0.0}


@dataclass
class ModelConfig(ConfigRecord):
    """Every size and switch of SpaHGC; defaults follow the paper and the published code.

    ``relations`` lists the relations the model uses; a graph must carry them, and may carry other
    known relations, which the model then ignores on purpose (an explicit ablation). ``masking``
    switches all augmentation (feature masks and edge dropping) on or off; with it off both views
    are the unmasked graph. ``drop[relation]`` is the fraction of that relation's edges each view
    drops (0 for a relation it does not name). ``ema_total_steps`` (epochs x graphs) enables BGRL's cosine momentum schedule.
    ``supervise`` picks the input of the supervised terms: ``view1`` (SpaHGC: the masked online
    view) or ``clean`` (the unmasked graph; one more encoder pass per step).

    Architectural choices (defaults: the published code's; the preset ``hgc-0.1`` of
    :mod:`hgc.train.presets` sets hgc 0.1's): ``mask_unit`` (``node``: whole
    rows replaced by a mask token; ``feature``: entries zeroed independently), ``input_block``
    (``linear`` or the published two-layer ``mlp``), ``expression`` (references' expression into
    the attention ``raw`` or ``embedded`` by a linear map + LayerNorm), ``attention_logits``
    (``scaled`` or ``leaky``), ``attention_dropout`` (on attention weights), ``dropout_layers``
    (dropout after each layer too, or on the input only) and ``head`` (``hgc`` or ``published``,
    see :class:`~hgc.nn.layers.Head`). ``gene_rank`` makes the head's output low-rank: predictions
    in the span of the training expression's leading principal axes (set by
    :meth:`SpaHGC.fit_gene_basis` before training); at or above the number of genes, or None, it
    is the full rank. Rank 10 (hgc 0.2's default) raised validation PCC-ALL on every validation
    slide it was tried on, under both protocols (``bench/results/ablation-*``).
    """

    hidden: int = field(default=256, metadata=option("Hidden size of the GNN.", minimum=1))
    layers: int = field(default=4, metadata=option("Relational layers.", minimum=0))
    heads: int = 4
    dropout: float = 0.2
    negative_slope: float = 0.2
    residual: bool = False
    layer_norm: bool = False
    relations: tuple[str, ...] = field(default_factory=relation_names)
    contrast: str = "bgrl"
    masking: bool = True
    mask_spot: float = 0.1
    mask_ref: float = 0.9
    drop: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DROP))
    lambda_pcc: float = 0.5
    lambda_spot: float = 0.2
    lambda_ref: float = 0.1
    ema_momentum: float = 0.99
    ema_total_steps: int | None = None
    predictor_hidden: int = 512
    proj_dim: int = 128
    tau: float = 0.5
    infonce_max_nodes: int = 2048
    supervise: str = "view1"
    mask_unit: str = "feature"
    input_block: str = "mlp"
    expression: str = "embedded"
    attention_logits: str = "leaky"
    attention_dropout: float = 0.1
    dropout_layers: bool = False
    head: str = "published"
    gene_rank: int | None = 10
    checkpoint_layers: bool = field(default=False, metadata=option(
        "Keep only each layer's inputs while training and recompute the rest in the backward pass: "
        "less memory for very large slide graphs, more time; the same numbers."))

    def __post_init__(self) -> None:
        self.relations = tuple(self.relations)
        self.drop = {str(r): float(p) for r, p in dict(self.drop).items()}
        for what, names in (("model relations", self.relations), ("edge drop ratios (drop) name relations", self.drop)):
            unknown = sorted(set(names) - set(RELATIONS))
            if unknown:
                raise InputError(f"{what} {unknown} that are unknown; expected a subset of {list(RELATIONS)}")
        for r, v in self.drop.items():
            if not 0.0 <= v <= 1.0:
                raise InputError(f"model option drop['{r}'] must lie in [0, 1], got {v}")
        choices = {"supervise": SUPERVISE, "contrast": CONTRASTS, "mask_unit": MASK_UNITS, "input_block": INPUT_BLOCKS,
                   "expression": EXPRESSION_INPUTS, "attention_logits": ATTENTION_LOGITS, "head": HEADS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"model option {name} '{getattr(self, name)}' is unknown; expected one of {list(allowed)}")
        if self.hidden <= 0 or self.heads <= 0 or self.hidden % self.heads:
            raise InputError(f"hidden ({self.hidden}) must be a positive multiple of heads ({self.heads})")
        if self.layers < 0:
            raise InputError(f"layers must be >= 0, got {self.layers}")
        for name in ("dropout", "attention_dropout", "mask_spot", "mask_ref", "ema_momentum"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"model option {name} must lie in [0, 1], got {v}")
        if self.dropout >= 1.0 or self.attention_dropout >= 1.0:
            raise InputError("model options dropout and attention_dropout must be < 1")
        for name in ("lambda_pcc", "lambda_spot", "lambda_ref"):
            if getattr(self, name) < 0:
                raise InputError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        for name in ("predictor_hidden", "proj_dim"):
            if getattr(self, name) <= 0:
                raise InputError(f"model option {name} must be positive, got {getattr(self, name)}")
        if self.tau <= 0 or self.infonce_max_nodes < 2:
            raise InputError(f"InfoNCE needs tau > 0 and infonce_max_nodes >= 2, got {self.tau}, {self.infonce_max_nodes}")
        if self.gene_rank is not None and not (isinstance(self.gene_rank, int) and self.gene_rank >= 1):
            raise InputError(f"gene_rank must be None (full rank) or a whole number >= 1, got {self.gene_rank!r}")
        if self.ema_total_steps is not None and self.ema_total_steps < 1:
            raise InputError(f"ema_total_steps must be None or >= 1, got {self.ema_total_steps}")

    @property
    def mask_ratios(self) -> dict[str, float]:
        return {"spot": self.mask_spot, "ref": self.mask_ref}

    @property
    def drop_ratios(self) -> dict[str, float]:
        return {r: self.drop.get(r, 0.0) for r in self.relations}

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """A config read back from a model bundle: options it lacks take the value they had
        before they existed (:data:`BEFORE_OPTION`), not today's default; the per-relation
        ``drop_<relation>`` options of hgc <= 0.2 become ``drop``."""
        d = dict(d)
        old_drops = {k[len("drop_"):]: d.pop(k) for k in [k for k in d if k.startswith("drop_")]}
        if old_drops:
            d["drop"] = {**DEFAULT_DROP, **d.get("drop", {}), **old_drops}
        return cls.from_dict({**BEFORE_OPTION, **d})
