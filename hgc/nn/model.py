"""The SpaHGC model: heterogeneous relational GNN, reference-attention head, masked contrast.

Architecture (all sizes in :class:`ModelConfig`): per node type an input block (spot:
embedding -> hidden; ref: [embedding, normalised expression] -> hidden; two linear maps with
LeakyReLU, dropout and LayerNorm), ``layers`` relational layers
(:class:`~hgc.nn.layers.RelationalLayer`: SAGE-mean on ``near``/``close``, multi-head cross
attention both ways on ``refer`` with the references' expression embedded, relation messages
averaged per node type, LeakyReLU), and a head (:class:`~hgc.nn.layers.Head`) adding to a linear
map of each spot its attention-pooled references, then a linear map to the genes. Edge weights
travel with the graph (the retrieval baseline uses them) but the layers learn their own weighting
by attention and do not read them.

The defaults are the published code's model choices (the defects it has stay fixed; see
:mod:`hgc.train.presets`): on her2st validation slides they beat hgc 0.1's residual
connections, post-LayerNorm, whole-node mask tokens and raw-expression keys (``bench/ablation.py``;
removing residual + LayerNorm alone recovered most of the gap). hgc 0.1's model is the preset
``hgc-0.1``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..graph.record import RELATION_NAMES
from .backend import Backend, PreparedGraph, get_backend
from .contrastive import CONTRASTS, bgrl_loss, ema_momentum, ema_update, infonce_loss
from .layers import ATTENTION_LOGITS, EXPRESSION_INPUTS, HEADS, INPUT_BLOCKS, Dropout, Encoder, Head, mlp, no_dropout
from .masking import MASK_UNITS, View, make_views, on_device, rand

log = logging.getLogger(__name__)

NODE_TYPES = ("spot", "ref")
SUPERVISE = ("view1", "clean")
#: What a stored config that lacks an option meant: the behaviour before the option existed
#: (hgc 0.1's model), so bundles written then rebuild the same network.
BEFORE_OPTION: dict[str, Any] = {
    "mask_unit": "node", "input_block": "linear", "expression": "raw", "attention_logits": "scaled",
    "attention_dropout": 0.0, "dropout_layers": True, "head": "hgc", "gene_rank": None,
}


@dataclass
class ModelConfig:
    """Every size and switch of SpaHGC; defaults follow the paper and the published code.

    ``relations`` lists the relations the model uses; a graph must carry them, and may carry other
    known relations, which the model then ignores on purpose (an explicit ablation). ``masking``
    switches all augmentation (feature masks and edge dropping) on or off; with it off both views
    are the unmasked graph. ``drop_<relation>`` is the fraction of that relation's edges each view
    drops. ``ema_total_steps`` (epochs x graphs) enables BGRL's cosine momentum schedule.
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

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    dropout: float = 0.2
    negative_slope: float = 0.2
    residual: bool = False
    layer_norm: bool = False
    relations: tuple[str, ...] = RELATION_NAMES
    contrast: str = "bgrl"
    masking: bool = True
    mask_spot: float = 0.1
    mask_ref: float = 0.9
    drop_near: float = 0.5
    drop_refer: float = 0.4
    drop_close: float = 0.0
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

    def __post_init__(self) -> None:
        self.relations = tuple(self.relations)
        unknown = sorted(set(self.relations) - set(RELATION_NAMES))
        if unknown:
            raise InputError(f"model relations {unknown} are unknown; expected a subset of {list(RELATION_NAMES)}")
        choices = {"supervise": SUPERVISE, "contrast": CONTRASTS, "mask_unit": MASK_UNITS, "input_block": INPUT_BLOCKS,
                   "expression": EXPRESSION_INPUTS, "attention_logits": ATTENTION_LOGITS, "head": HEADS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"model option {name} '{getattr(self, name)}' is unknown; expected one of {list(allowed)}")
        if self.hidden <= 0 or self.heads <= 0 or self.hidden % self.heads:
            raise InputError(f"hidden ({self.hidden}) must be a positive multiple of heads ({self.heads})")
        if self.layers < 0:
            raise InputError(f"layers must be >= 0, got {self.layers}")
        for name in ("dropout", "attention_dropout", "mask_spot", "mask_ref", "drop_near", "drop_refer", "drop_close",
                     "ema_momentum"):
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
        return {r: getattr(self, f"drop_{r}") for r in self.relations}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["relations"] = list(self.relations)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """A config from options (missing ones take the defaults); unknown options are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"model config has unknown options {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """A config read back from a model bundle: options it lacks take the value they had
        before they existed (:data:`BEFORE_OPTION`), not today's default."""
        return cls.from_dict({**BEFORE_OPTION, **d})


class SpaHGC(nn.Module):
    """SpaHGC on one backend. ``forward`` predicts; ``training_loss`` trains on two masked views.

    ``forward`` never masks, drops edges or applies dropout, whatever ``train()``/``eval()`` mode
    the module is in: the only stochastic path is :meth:`training_loss`, and all its randomness
    (views, dropout, InfoNCE node sampling) comes from the generator passed to it.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        spot_dim: int,
        ref_dim: int,
        n_genes: int,
        backend: Backend | str = "auto",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.dims = {"spot": spot_dim, "ref": ref_dim, "genes": n_genes}
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self._build()

    def _build(self) -> None:
        c, d = self.cfg, self.dims
        self.encoder = Encoder(c, d["spot"], d["ref"], d["genes"])
        self.head = Head(c, d["genes"], self.encoder.expr_dim)
        if c.contrast == "bgrl":
            self.target = copy.deepcopy(self.encoder).requires_grad_(False)
            self.predictor = nn.ModuleDict({t: mlp(c.hidden, c.predictor_hidden, c.hidden, c.negative_slope) for t in NODE_TYPES})
            self.register_buffer("ema_step", torch.zeros((), dtype=torch.int64))
        elif c.contrast == "infonce":
            self.projector = nn.ModuleDict({t: mlp(c.hidden, c.hidden, c.proj_dim, c.negative_slope) for t in NODE_TYPES})

    def fit_gene_basis(self, y: torch.Tensor) -> None:
        """With ``gene_rank`` (below the number of genes): fit the head's low-rank output to
        training expression ``y``; else a no-op."""
        if self.head.low_rank:
            self.head.fit_gene_basis(y.to(self.head.gene_mean.device, self.head.gene_mean.dtype))

    # -- checks -------------------------------------------------------------------------------
    def check_graph(self, g: PreparedGraph) -> None:
        """Raise :class:`InputError` unless ``g`` fits this model's backend, sizes and relations."""
        if g.backend != self.backend.name:
            raise InputError(f"{g.name} was prepared for backend '{g.backend}', the model runs on '{self.backend.name}'")
        unknown = sorted(set(g.relations) - set(RELATION_NAMES))
        if unknown:
            raise InputError(f"{g.name} has relations {unknown} the model does not know ({list(RELATION_NAMES)})")
        missing = [r for r in self.cfg.relations if r not in g.relations]
        if missing:
            raise InputError(
                f"{g.name} lacks relations {missing} that the model uses (model relations "
                f"{list(self.cfg.relations)}, graph relations {list(g.relations)})"
            )
        got = {"spot": g.x["spot"].shape[1], "ref": g.x["ref"].shape[1], "genes": g.ref_y.shape[1]}
        if got != self.dims:
            raise InputError(f"{g.name} has feature sizes {got}, the model was built for {self.dims}")
        ignored = sorted(set(g.relations) - set(self.cfg.relations))
        if ignored:
            log.debug("%s: relations %s ignored by model configuration", g.name, ignored)

    # -- inference ------------------------------------------------------------------------------
    def forward(self, g: PreparedGraph) -> torch.Tensor:
        """(n_spot, G) predictions from the unmasked graph, deterministic, no dropout."""
        self.check_graph(g)
        h, ref_y = self.encoder(self.backend, g)
        return self.head(self.backend, g, h, ref_y)

    # -- training -------------------------------------------------------------------------------
    def training_loss(
        self, g: PreparedGraph, generator: torch.Generator | None = None, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``MSE + l_pcc (1 - PCC) + l_spot contrast(spot) + l_ref contrast(ref)`` on two views.

        The supervised terms use the online encoder on view 1 (``supervise="view1"``, SpaHGC) or
        on the unmasked graph (``"clean"``, one more encoder pass, no train/inference input
        shift); the contrast compares view 1 with view 2 (see :mod:`hgc.nn.contrastive`).
        ``rows`` (bool, n_spot) limits the supervised terms to those spots (the rest held out).
        Returns the loss and its parts as floats.
        """
        self.check_graph(g)
        if g.spot_y is None:
            raise InputError(f"{g.name} has no spot expression (spot_y); it cannot be used for training")
        c = self.cfg
        generator = on_device(generator, g.x["spot"].device)
        contrast = c.contrast != "none"
        v1 = v2 = View(g, None)
        if c.masking and (contrast or c.supervise == "view1"):
            v1, v2 = make_views(self.backend, g, c.mask_ratios, c.drop_ratios, generator, contrast, c.mask_unit)
        drop = self._dropout(generator, c.dropout)
        attn_drop = self._dropout(generator, c.attention_dropout)
        h1, y1 = self.encoder(self.backend, v1.graph, v1.mask, drop, attn_drop)
        view1_is_clean = v1.graph is g and v1.mask is None
        if c.supervise == "view1" or view1_is_clean:
            pred = self.head(self.backend, v1.graph, h1, y1)
        else:
            pred = self.head(self.backend, g, *self.encoder(self.backend, g, None, drop, attn_drop))
        y = g.spot_y
        if rows is not None:
            pred, y = pred[rows], y[rows]
        mse = F.mse_loss(pred, y)
        pcc = pearson_per_gene(pred, y).mean()
        zero = mse.new_zeros(())
        c_spot, c_ref = self._contrast(h1, v2, drop, attn_drop, generator) if contrast else (zero, zero)
        loss = mse + c.lambda_pcc * (1 - pcc) + c.lambda_spot * c_spot + c.lambda_ref * c_ref
        parts = {"loss": loss, "mse": mse, "pcc": pcc, "contrast_spot": c_spot, "contrast_ref": c_ref}
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def _contrast(
        self, h1: dict[str, torch.Tensor], v2: View, drop: Dropout, attn_drop: Dropout, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        if c.contrast == "bgrl":
            with torch.no_grad():
                h2, _ = self.target(self.backend, v2.graph, v2.mask)
            losses = [bgrl_loss(self.predictor[t](h1[t]), h2[t]) for t in NODE_TYPES]
        else:
            h2, _ = self.encoder(self.backend, v2.graph, v2.mask, drop, attn_drop)
            losses = [
                infonce_loss(self.projector[t](h1[t]), self.projector[t](h2[t]), c.tau, c.infonce_max_nodes, generator)
                for t in NODE_TYPES
            ]
        return losses[0], losses[1]

    @staticmethod
    def _dropout(generator: torch.Generator | None, p: float) -> Dropout:
        if p == 0:
            return no_dropout

        def dropout(x: torch.Tensor) -> torch.Tensor:
            keep = rand(tuple(x.shape), generator, x.device, x.dtype) >= p
            return x * keep / (1 - p)

        return dropout

    @torch.no_grad()
    def update_target(self) -> None:
        """BGRL: move the target encoder towards the online one; call after each optimiser step.

        A no-op for other contrasts, so trainers may call it unconditionally.
        """
        if self.cfg.contrast != "bgrl":
            return
        m = ema_momentum(self.cfg.ema_momentum, int(self.ema_step), self.cfg.ema_total_steps)
        ema_update(self.target, self.encoder, m)
        self.ema_step += 1


class Ensemble(nn.Module):
    """A seed ensemble: SpaHGC models of one configuration trained with different seeds.

    ``forward`` predicts the members' mean; :meth:`predict_with_spread` also their spread (the
    population standard deviation across members, per spot and gene), an uncertainty estimate.
    """

    def __init__(self, members: list[SpaHGC]) -> None:
        super().__init__()
        if not members:
            raise InputError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    @property
    def cfg(self) -> ModelConfig:
        return self.members[0].cfg

    @property
    def backend(self) -> Backend:
        return self.members[0].backend

    def predict_with_spread(self, g: PreparedGraph) -> tuple[torch.Tensor, torch.Tensor]:
        preds = torch.stack([m(g) for m in self.members])
        return preds.mean(0), preds.std(0, unbiased=False)

    def forward(self, g: PreparedGraph) -> torch.Tensor:
        return self.predict_with_spread(g)[0]


def pearson_per_gene(pred: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(G,) Pearson correlation over spots per gene; 0 where either side is constant."""
    pc = pred - pred.mean(0)
    yc = y - y.mean(0)
    return (pc * yc).sum(0) / (pc.norm(dim=0) * yc.norm(dim=0) + eps)
