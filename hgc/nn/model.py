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
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..graph.record import NODE_TYPES, RELATIONS
from .config import ModelConfig
from .contrastive import bgrl_loss, ema_momentum, ema_update, infonce_loss
from .graphlib import Backend, PreparedGraph, get_backend
from .layers import Dropout, GraphEncoder, Head, RandomDropout, mlp, no_dropout
from .masking import View, make_views, on_device

log = logging.getLogger(__name__)

class SpaHGC(nn.Module):
    """SpaHGC on one backend. ``forward`` predicts; ``training_loss`` trains on two masked views.

    ``forward`` never masks, drops edges or applies dropout, whatever ``train()``/``eval()`` mode
    the module is in: the only stochastic path is :meth:`training_loss`, and all its randomness
    (views, dropout, InfoNCE node sampling) comes from the generator passed to it.

    Parameters
    ----------
    cfg : ModelConfig
        Every size and switch (defaults: the published code's choices with a rank-10 head).
    spot_dim, ref_dim : int
        Embedding widths of target spots and references; ``n_genes`` the expression columns.
    backend : Backend or {"auto", "dgl", "pyg"}
        The graph library (:func:`hgc.nn.graphlib.get_backend`).
    seed : int, optional
        Initialises the weights without touching torch's global generator.

    Shapes
    ------
    A :class:`~hgc.nn.graphlib.PreparedGraph` of ``n_spot`` spots and ``n_ref`` references ->
    (n_spot, n_genes) predictions in the graph's expression space.

    Examples
    --------
    A three-spot slide with two references (in practice :func:`hgc.graph.build_graphs` makes
    the graph):

    >>> import numpy as np, torch
    >>> from hgc.graph import SlideGraph
    >>> from hgc.nn import ModelConfig, SpaHGC, get_backend
    >>> rng = np.random.default_rng(0)
    >>> g = SlideGraph(fold="f", target="S", role="test", patient="P",
    ...     spot_x=rng.normal(size=(3, 8)).astype(np.float32), spot_coords=np.zeros((3, 2)),
    ...     spot_barcodes=np.array(["a", "b", "c"]), ref_x=rng.normal(size=(2, 8)).astype(np.float32),
    ...     ref_y=rng.random((2, 5)).astype(np.float32), ref_slide=np.array(["R", "R"]),
    ...     ref_patient=np.array(["Q", "Q"]),
    ...     edges={"near": np.array([[1, 0], [0, 1]]), "refer": np.array([[0, 1, 1], [0, 1, 2]]),
    ...            "close": np.array([[1, 0], [0, 1]])})
    >>> backend = get_backend("pyg")
    >>> model = SpaHGC(ModelConfig(hidden=16, heads=2, layers=2, gene_rank=None), 8, 8, 5, backend, seed=0)
    >>> model(backend.prepare(g)).shape
    torch.Size([3, 5])
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
        self.encoder = GraphEncoder(c, d["spot"], d["ref"], d["genes"])
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
        unknown = sorted(set(g.relations) - set(RELATIONS))
        if unknown:
            raise InputError(f"{g.name} has relations {unknown} the model does not know ({list(RELATIONS)})")
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
        v1: View = View(g, None)
        v2: View | None = v1
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
        pcc = differentiable_pcc(pred, y).mean()
        zero = mse.new_zeros(())
        c_spot, c_ref = (zero, zero)
        if contrast and v2 is not None:  # (view 2 is built whenever there is a contrast)
            c_spot, c_ref = self._contrast(h1, v2, drop, attn_drop, generator)
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
        return no_dropout if p == 0 else RandomDropout(generator, p)

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


def differentiable_pcc(pred: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(G,) Pearson correlation over spots per gene, differentiable (the loss's PCC term); 0 where
    either side is constant. Metrics use :func:`hgc.evaluate.metrics.pearson_per_gene` (NumPy)."""
    pc = pred - pred.mean(0)
    yc = y - y.mean(0)
    return (pc * yc).sum(0) / (pc.norm(dim=0) * yc.norm(dim=0) + eps)
