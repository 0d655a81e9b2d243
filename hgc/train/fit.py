"""Training SpaHGC per fold, with early stopping on validation slides drawn from the training slides.

What this module guarantees (each a defect of the published code, see the brief §2):

* the checkpoint is chosen on *validation* slides taken from the fold's training slides, never
  on a test slide; the validation slides' graphs are not trained on, and which slides were used
  is logged and saved;
* no test slide -- and under ``patient-kfold`` no spot of a test patient -- appears among the
  training targets or any graph's references (:func:`check_leakage`, run before training);
* a CPU run with a given ``seed`` repeats exactly (same weights, same metrics);
* the run folder (:mod:`hgc.train.rundir`) appears complete or not at all, and every option is
  checked before training starts.
"""
from __future__ import annotations

import contextlib
import logging
import math
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._devices import check_device, resolve_device
from .._outputs import atomic_dir, check_replaceable_folder, command_line, output_lock, safe_name
from ..errors import InputError
from ..evaluate.metrics import nan_mean, pearson_per_gene
from ..graph.build import BankGraphs
from ..graph.record import RELATION_NAMES, SlideGraph
from .presets import DEFAULT_PRESET, get_preset
from .rundir import ModelBundle, is_run_folder, open_run, user_entries, write_fold, write_record

log = logging.getLogger(__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class FitConfig:
    """Training settings; every field is a ``hgc fit`` option and is saved in ``config.json``."""

    backend: str = "auto"  # auto | dgl | pyg
    device: str = "auto"  # auto | cpu | cuda[:i]
    epochs: int = 200
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int | None = 50  # epochs without validation improvement before stopping; None: never stop
    contrast: str = "bgrl"  # bgrl | infonce | none
    masking: bool = True
    relations: tuple[str, ...] | None = None  # None: every relation of the graphs
    folds: tuple[str, ...] | None = None  # None: every fold of the store
    val_slides: tuple[str, ...] | None = None  # early-stopping slides instead of the store's choice (() for none)
    model: dict[str, Any] = field(default_factory=dict)  # further ModelConfig overrides (over the preset's)
    preset: str = DEFAULT_PRESET  # named model/training choices (hgc.train.presets); see from_preset
    ensemble: int = 1  # seeds trained per fold and averaged; their spread is the predictions' uncertainty
    progress: bool = True

    def __post_init__(self) -> None:
        from ..nn.backend import BACKENDS

        if self.backend not in BACKENDS:
            raise InputError(f"unknown graph backend '{self.backend}'; expected one of {list(BACKENDS)}")
        self.device = check_device(self.device)
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        if not (_is_number(self.lr) and self.lr > 0):
            raise InputError(f"lr (the learning rate) must be a finite number > 0, got {self.lr!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.ensemble, int) and self.ensemble >= 1):
            raise InputError(f"ensemble must be a whole number >= 1 (models per fold), got {self.ensemble!r}")
        if self.patience is not None and not (isinstance(self.patience, int) and self.patience >= 1):
            raise InputError(f"patience must be a whole number >= 1 (or None: never stop early), got {self.patience!r}")
        if self.relations is not None:
            self.relations = tuple(self.relations)
            unknown = sorted(set(self.relations) - set(RELATION_NAMES))
            if unknown or not self.relations:
                raise InputError(f"relations {unknown or '(none)'} are not relations of hgc's graphs; "
                                 f"choose from {', '.join(RELATION_NAMES)}")
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relations"] = list(self.relations) if self.relations is not None else None
        d["folds"] = list(self.folds) if self.folds is not None else None
        d["val_slides"] = list(self.val_slides) if self.val_slides is not None else None
        return d


def load_folds(graphs_path: str | Path, folds: Sequence[str] | None = None) -> list[BankGraphs]:
    """Every (or the named) fold of a graph store written by ``hgc build-graph``: a bank and its targets."""
    from ..graph import store

    path = Path(graphs_path)
    if not path.is_file():
        raise InputError(f"graph store {path} does not exist; build it with `hgc build-graph`")
    names = [f.name for f in store.read_fold_info(path)]
    if folds is not None:
        unknown = sorted(set(folds) - set(names))
        if unknown:
            raise InputError(f"folds {unknown} are not in graph store {path}; it has {names}")
        names = [n for n in names if n in set(folds)]
    return [fold for name in names for fold in store.read_graph_set(path, fold=name).folds]


def check_leakage(fold: BankGraphs) -> None:
    """Raise :class:`InputError` if test data can reach training or the reference bank.

    Checked: the bank holds training slides only; every training target is a training slide of
    the fold; no target references itself (except a fold's only training slide, whose training
    graph references only itself); no training target and no reference of any graph (training or
    test) is a test slide; under ``patient-kfold`` the same for every spot of a test patient.
    Under ``slide-loso`` other sections of a test slide's patient are references by design (the
    published protocol); that is logged, not refused.
    """
    info, bank = fold.info, fold.whole.slides
    test, train = set(info.test), set(info.train)
    patient = {s: d.patient for s, d in fold.slides.items()}
    test_patients = {patient[s] for s in test if s in patient}
    patient_level = info.protocol == "patient-kfold"
    where = f"graph store fold '{fold.name}' ({info.protocol})"
    outside = sorted(set(bank) - train)
    if outside:
        raise InputError(f"{where}: the reference bank holds slides {outside}, which are not training slides")
    for t in fold.targets:
        if t.role == "train" and (t.target in test or t.target not in train):
            raise InputError(f"{where}: training graph targets slide '{t.target}', which is not a training slide")
        if t.role == "train" and patient_level and patient[t.target] in test_patients:
            raise InputError(f"{where}: training target '{t.target}' belongs to test patient '{patient[t.target]}'")
        refs = set(fold.references(t).slides)
        own_only = t.role == "train" and t.target in info.self_referenced and refs == {t.target}
        if t.target in refs and not own_only:
            raise InputError(f"{where}: the {t.role} graph of slide '{t.target}' has the slide itself among its references")
        leaked = sorted(refs & test)
        if leaked:
            raise InputError(f"{where}: the {t.role} graph of slide '{t.target}' has test slides {leaked} among its references")
        if patient_level:
            leaked = sorted({patient[s] for s in refs} & test_patients)
            if leaked:
                raise InputError(
                    f"{where}: the {t.role} graph of slide '{t.target}' has spots of test patients {leaked} among its references"
                )
    if not patient_level:
        shared = sum(len(fold.slides[s].barcodes) for s in bank if patient[s] in test_patients)
        if shared:
            log.info("fold %s: %d reference spots share a patient with a test slide (slide-level protocol)", fold.name, shared)


def choose_validation(fold: BankGraphs, chosen: Sequence[str] | None = None) -> list[str]:
    """``chosen`` validation slides, else the store's choice (always recorded by the builder);
    always training slides, never test slides."""
    val = list(chosen) if chosen is not None else list(fold.info.val)
    bad = sorted(set(val) - set(fold.info.train))
    if bad:
        raise InputError(f"fold '{fold.name}': validation slides {bad} are not training slides")
    return val


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch/numpy and switch torch to deterministic kernels for the block, then restore."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def model_config(config: FitConfig, steps: int | None = None):
    """The :class:`hgc.nn.ModelConfig` a FitConfig asks for: its preset's model choices, then
    ``config.model``; ``steps`` (epochs x graphs) drives BGRL's momentum schedule unless set."""
    from ..nn import ModelConfig

    overrides: dict[str, Any] = {"ema_total_steps": steps, **get_preset(config.preset).model, **config.model}
    overrides.update(contrast=config.contrast, masking=config.masking)
    if config.relations is not None:
        overrides["relations"] = tuple(config.relations)
    return ModelConfig.from_dict(overrides)


def build_model(cfg_model, spot_dim: int, ref_dim: int, n_genes: int, backend, seed: int | None = None):
    from ..nn import SpaHGC

    return SpaHGC(cfg_model, spot_dim, ref_dim, n_genes, backend, seed=seed)


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


def _validate(model, prepared: list, graphs: list[SlideGraph], block: "Block | None" = None
              ) -> tuple[float, float, dict[str, np.ndarray]]:
    """Mean over validation slides (or the held-out block) of PCC-ALL (NaN genes excluded) and
    MSE, and the predictions (for a block: of its spots only)."""
    if block is not None:
        pred = predict_graph(model, prepared[0])[block.rows]
        y = graphs[0].spot_y[block.rows]
        return nan_mean(pearson_per_gene(y, pred)), float(((pred - y) ** 2).mean()), {block.slide: pred}
    pccs, mses, preds = [], [], {}
    for p, g in zip(prepared, graphs):
        pred = preds[g.target] = predict_graph(model, p)
        pccs.append(nan_mean(pearson_per_gene(g.spot_y, pred)))
        mses.append(float(((pred - g.spot_y) ** 2).mean()))
    return nan_mean(pccs), float(np.mean(mses)), preds


#: A lone training slide stops early on one of this many spatial bands of its own tissue.
BLOCK_BANDS = 5


@dataclass
class Block:
    """Spots of a lone training slide held out for early stopping: one spatial band of it."""

    slide: str
    band: int
    rows: np.ndarray  # (n_spot,) bool

    def describe(self) -> dict[str, Any]:
        return {"slide": self.slide, "band": self.band, "n_bands": BLOCK_BANDS, "n_spots": int(self.rows.sum())}


def hold_out_block(graph: SlideGraph, seed: int) -> tuple[SlideGraph, Block] | None:
    """A self-referenced training graph (a fold's lone training slide) with one spatial band of
    its spots held out: the graph without every edge that would carry the band's expression
    (``refer`` edges from the band's spots as references, ``close`` edges touching them), and the
    band. None when the graph's references are not its own spots in order (then nothing is held out)."""
    from .baselines import spatial_bands

    if graph.n_ref != graph.n_spot or not np.array_equal(graph.ref_x, graph.spot_x) or graph.spot_y is None:
        return None
    band = seed % BLOCK_BANDS
    rows = spatial_bands(graph.spot_coords, BLOCK_BANDS) == band
    refer, close = graph.edges["refer"], graph.edges["close"]
    keep_refer = ~rows[refer[0]]
    keep_close = ~(rows[close[0]] | rows[close[1]])
    edges = {**graph.edges, "refer": refer[:, keep_refer], "close": close[:, keep_close]}
    weights = {**graph.edge_weight, "refer": graph.edge_weight["refer"][keep_refer],
               "close": graph.edge_weight["close"][keep_close]}
    return replace(graph, edges=edges, edge_weight=weights), Block(graph.target, band, rows)


def _state_dict_cpu(model) -> dict:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


@dataclass
class FoldResult:
    fold: str
    val_slides: list[str]
    best_epoch: int
    best_val_pcc: float
    epochs_run: int
    val_predictions: dict[str, np.ndarray]  # the checkpoint's predictions for the validation slides (block spots)
    val_block: dict[str, Any] | None = None  # a lone training slide's held-out band (Block.describe)


def _split_validation(fold: BankGraphs, graphs: list[SlideGraph], config: FitConfig
                      ) -> tuple[list[str], list[SlideGraph], list[SlideGraph]]:
    """(validation slides, training graphs, validation graphs) of the fold's training ``graphs``;
    a validation graph is not trained on."""
    have = {g.target for g in graphs}
    val = [s for s in choose_validation(fold, config.val_slides) if s in have]
    train = [g for g in graphs if g.target not in set(val)]
    if not train:  # every graph-bearing training slide was chosen for validation
        val, train = [], list(graphs)
    log.info("fold %s: training on %s, validating on %s", fold.name, [g.target for g in train], val)
    return val, train, [g for g in graphs if g.target in set(val)]


def _train_fold(fold: BankGraphs, config: FitConfig, out_dir: Path, backend, device: str, seed: int) -> FoldResult | None:
    """Train the fold's model (or seed ensemble) and write its bundle into ``out_dir``."""
    check_leakage(fold)
    graphs = fold.graphs("train")
    if not graphs:
        log.warning("fold %s: no training graph (no training slide has references from another one); "
                    "no model is trained for it, only the baselines will predict its test slides", fold.name)
        return None
    missing = [g.target for g in graphs if g.spot_y is None]
    if missing:
        raise InputError(f"fold '{fold.name}': training slides {missing} have no expression to train on")
    val, train_graphs, val_graphs = _split_validation(fold, graphs, config)
    block = None
    lone = len(train_graphs) == 1 and train_graphs[0].target in fold.info.self_referenced
    if not val and config.val_slides is None and lone:
        held = hold_out_block(train_graphs[0], seed)
        if held is not None:
            train_graphs, block = [held[0]], held[1]
            val_graphs = train_graphs
            log.info("fold %s: %s is the only training slide; early stopping on band %d of %d of it (%d spots, "
                     "never trained on nor referenced)", fold.name, block.slide, block.band + 1, BLOCK_BANDS,
                     int(block.rows.sum()))
    if not val_graphs:
        log.warning("fold %s: no validation slide; the last epoch is kept", fold.name)

    first = graphs[0]
    dims = {"spot_dim": int(first.spot_x.shape[1]), "ref_dim": int(first.ref_x.shape[1]), "n_genes": int(first.n_genes)}
    mcfg = model_config(config, steps=config.epochs * len(train_graphs))
    members = []
    for k in range(config.ensemble):
        name = fold.name if config.ensemble == 1 else f"{fold.name} member {k + 1}/{config.ensemble}"
        members.append(_train_member(fold, mcfg, dims, train_graphs, val_graphs, block, config, backend, device,
                                     member_seed(seed, k), name))
    if config.ensemble == 1:
        best, state = members[0], members[0].state
        history, best_pcc = best.history, best.pcc
    else:
        best = max(members, key=lambda m: m.pcc if np.isfinite(m.pcc) else -np.inf)
        state = {f"members.{k}.{n}": t for k, m in enumerate(members) for n, t in m.state.items()}
        history = [{"member": k, **row} for k, m in enumerate(members) for row in m.history]
        best_pcc = _ensemble_score(members, val_graphs, block)
    best_pcc = best_pcc if val_graphs and np.isfinite(best_pcc) else float("nan")
    write_fold(out_dir / safe_name(fold.name), state, history, {
        "fold": fold.name, "protocol": fold.info.protocol, "genes": list(fold.bank.genes),
        "normaliser": fold.bank.normaliser, "train_slides": [g.target for g in train_graphs], "validation_slides": val,
        "test_slides": list(fold.info.test), **dims, "model": mcfg.to_dict(),
        "validation_block": None if block is None else block.describe(),
        "best_epoch": int(best.epoch), "best_val_pcc": None if np.isnan(best_pcc) else best_pcc,
        "epochs_run": max(len(m.history) for m in members), "seed": seed, "backend": backend.name,
        "ensemble": config.ensemble,
        "members": [{"seed": member_seed(seed, k), "best_epoch": m.epoch, "epochs_run": len(m.history),
                     "best_val_pcc": float(m.pcc) if np.isfinite(m.pcc) else None} for k, m in enumerate(members)],
        "graph_config": asdict(fold.config), "platform": fold.platform, "image_mpp": fold.image_mpp,
        "encoder": fold.bank.encoder, "reference_slides": fold.bank.slides,
    }, fold.bank)
    val_pred = members[0].val_pred if config.ensemble == 1 else {
        s: np.mean([m.val_pred[s] for m in members], axis=0) for s in members[0].val_pred}
    return FoldResult(fold.name, val, int(best.epoch), best_pcc, max(len(m.history) for m in members), val_pred,
                      None if block is None else block.describe())


#: Member k of a seed ensemble trains with seed ``seed + ENSEMBLE_SEED_STEP * k`` (member 0: the fold's seed).
ENSEMBLE_SEED_STEP = 1009


def member_seed(seed: int, k: int) -> int:
    return seed + ENSEMBLE_SEED_STEP * k


@dataclass
class _Member:
    """One trained model of a fold: its best validation epoch, score, weights and predictions there."""

    epoch: int
    pcc: float
    state: dict
    val_pred: dict[str, np.ndarray]
    history: list[dict[str, float]]


def _train_member(fold: BankGraphs, mcfg, dims: dict[str, int], train_graphs: list[SlideGraph],
                  val_graphs: list[SlideGraph], block: Block | None, config: FitConfig, backend, device: str,
                  seed: int, name: str) -> _Member:
    """Train one model from ``seed`` and keep its best validation epoch (the last without validation)."""
    import torch
    from .._progress import progress

    with deterministic(seed):
        model = build_model(mcfg, dims["spot_dim"], dims["ref_dim"], dims["n_genes"], backend, seed).to(device)
        model.fit_gene_basis(torch.as_tensor(fold.bank.y))  # the training spots' expression (low-rank head)
        prepared = [backend.prepare(g, device) for g in train_graphs]
        prepared_val = prepared if block is not None else [backend.prepare(g, device) for g in val_graphs]
        supervised = None if block is None else torch.as_tensor(~block.rows, device=device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                weight_decay=config.weight_decay)
        gen = torch.Generator(device=device).manual_seed(seed)
        order = np.random.default_rng(seed)
        best: dict[str, Any] = {"epoch": -1, "pcc": -np.inf, "state": None, "val_pred": {}}
        history: list[dict[str, float]] = []
        bar = progress(range(config.epochs), desc=f"fold {name}", disable=None if config.progress else True,
                       leave=False)
        for epoch in bar:
            model.train()
            sums: dict[str, float] = {}
            for i in order.permutation(len(prepared)):
                loss, parts = model.training_loss(prepared[i], generator=gen, rows=supervised)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                model.update_target()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            row = {"epoch": epoch, **{k: v / len(prepared) for k, v in sums.items()}}
            val_pred: dict[str, np.ndarray] = {}
            if val_graphs:
                row["val_pcc"], row["val_mse"], val_pred = _validate(model, prepared_val, val_graphs, block)
            history.append(row)
            score = row.get("val_pcc", float("nan"))
            # Without validation every epoch replaces the last; an undefined PCC never beats a defined one.
            if not val_graphs or best["state"] is None or (not np.isnan(score) and score > best["pcc"]):
                best.update(epoch=epoch, pcc=score, state=_state_dict_cpu(model), val_pred=val_pred)
            bar.set_postfix(loss=f"{row['loss']:.4f}", val_pcc=f"{score:.3f}")
            if val_graphs and config.patience is not None and epoch - best["epoch"] >= config.patience:
                log.info("fold %s: early stop at epoch %d (best %d)", name, epoch, best["epoch"])
                break
        bar.close()
    return _Member(int(best["epoch"]), float(best["pcc"]), best["state"], best["val_pred"], history)


def _ensemble_score(members: list[_Member], val_graphs: list[SlideGraph], block: Block | None) -> float:
    """Validation PCC-ALL of the members' mean prediction (each member at its best epoch)."""
    if not val_graphs:
        return float("nan")
    scores = []
    for g in val_graphs:
        y = g.spot_y if block is None else g.spot_y[block.rows]
        pred = np.mean([m.val_pred[g.target] for m in members], axis=0)
        scores.append(nan_mean(pearson_per_gene(y, pred)))
    return nan_mean(scores)


def check_run_output(out_dir: str | Path) -> Path:
    """``out_dir`` if a run may be written there: absent, empty, or an earlier hgc run (replaced)."""
    return check_replaceable_folder(out_dir, is_run_folder, "hgc run")


def fit_folds(folds: Sequence[BankGraphs], out_dir: str | Path, config: FitConfig) -> list[FoldResult]:
    """Train one model per fold into the run folder ``out_dir`` (see :mod:`hgc.train.rundir`).

    Everything is checked first; the run is built in a temporary folder that replaces ``out_dir``
    only once every fold is written, so an interrupted fit leaves the previous run (or nothing).
    A fold without any training graph gets no model (the record says why; the baselines still
    predict its test slides) and is left out of the result.
    """
    import torch

    from ..nn import get_backend

    folder = [safe_name(f.name).casefold() for f in folds]  # macOS and Windows ignore case in names
    clash = sorted({f.name for f, k in zip(folds, folder) if folder.count(k) > 1})
    if clash:
        raise InputError(f"fold names {clash} repeat (ignoring case); every fold needs its own name")
    backend = get_backend(config.backend)
    device = str(resolve_device(config.device))
    out_dir = check_run_output(out_dir)
    results, skipped = [], {}
    with output_lock(out_dir, command_line()), atomic_dir(out_dir, keep=user_entries) as tmp:
        for i, fold in enumerate(folds):
            r = _train_fold(fold, config, tmp, backend, device, seed=config.seed + i)
            if r is None:
                skipped[fold.name] = "no training graph: no training slide has references from another one"
                continue
            log.info("fold %s: best epoch %d, validation PCC %.4f", r.fold, r.best_epoch, r.best_val_pcc)
            results.append(r)
        write_record(tmp, [r.fold for r in results], skipped, fit=config.to_dict(), backend=backend.name,
                     device=device, torch_version=torch.__version__, python=platform.python_version())
    return results


def fit(graphs_path: str | Path, out_dir: str | Path, config: FitConfig | None = None) -> list[FoldResult]:
    """Train SpaHGC on every fold of the graph store ``graphs_path``; write the run to ``out_dir``."""
    config = config or FitConfig()
    check_run_output(out_dir)
    return fit_folds(load_folds(graphs_path, config.folds), out_dir, config)


def load_model(run_dir: str | Path, fold: str, backend: str | None = None, device: str = "cpu"):
    """Rebuild fold ``fold``'s model from a run directory and load its best checkpoint.

    Returns ``(model, backend, fold_info)``; ``backend`` defaults to the one the run trained with
    (weights are backend-neutral, so either backend may load them).
    """
    run = open_run(run_dir)
    return load_bundle_model(run.bundle(fold), backend or run.backend, device)


def load_bundle_model(bundle: ModelBundle, backend: str | None = None, device: str = "cpu"):
    """(model in eval mode, backend, fold info) of a model bundle; backend defaults to its training's."""
    from ..nn import ModelConfig, get_backend

    from ..nn import Ensemble

    info = bundle.info
    be = get_backend(backend or info.get("backend", "auto"))
    mcfg = ModelConfig.from_stored(info["model"])
    members = [build_model(mcfg, info["spot_dim"], info["ref_dim"], info["n_genes"], be)
               for _ in range(int(info.get("ensemble", 1)))]
    model = members[0] if len(members) == 1 else Ensemble(members)
    try:
        model.load_state_dict(bundle.checkpoint())
    except RuntimeError as exc:  # tensors of another shape or name than fold.json describes
        raise InputError(f"model {bundle.path}: the checkpoint does not match its fold.json "
                         f"({str(exc).splitlines()[0]}); train it again with `hgc fit`") from None
    return model.to(device).eval(), be, info
