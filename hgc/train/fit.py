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
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import _distributed
from .._devices import resolve_device
from .._outputs import atomic_dir, check_replaceable_folder, command_line, output_lock, safe_name
from ..errors import InputError
from ..evaluate.metrics import nan_mean, pearson_per_gene
from ..graph.fold import BankGraphs
from ..graph.record import SlideGraph
from .config import FitConfig, model_config
from .folds import BLOCK_BANDS, Block, check_leakage, choose_validation, hold_out_block, load_folds
from .inference import predict_graph
from .rundir import is_run_folder, user_entries, write_fold, write_record

log = logging.getLogger(__name__)


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


def _train_fold(fold: BankGraphs, config: FitConfig, out_dir: Path | None, backend, device: str, seed: int
                ) -> FoldResult | None:
    """Train the fold's model (or seed ensemble) and write its bundle into ``out_dir`` (None: a
    helper process of a distributed run, which trains with the others but writes nothing)."""
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
    mcfg = model_config(config, steps=config.epochs * -(-len(train_graphs) // graphs_per_step(config)))
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
    if out_dir is not None:
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


def graphs_per_step(config: FitConfig) -> int:
    """Graphs per optimiser step: the configured number, else one per process."""
    where = _distributed.ranks()
    n = config.graphs_per_step or where.world
    if n < where.world:
        raise InputError(f"graphs per step ({n}) is smaller than the number of processes ({where.world}): "
                         "some would have nothing to train; leave it unset or give at least one per process")
    return n


@dataclass
class _Lanes:
    """How one model's training graphs are dealt to the steps of each epoch, and to processes.

    With G graphs per step the graphs are dealt into G lanes (graph i into lane i mod G). Every
    epoch each lane is shuffled by its own random stream, and step s trains on the s-th graph of
    every lane at once, their gradients averaged. Lane l runs in process l mod W and draws its
    masks from its own generator, so which process runs a lane changes nothing it computes: a
    W-process run repeats a one-process run with G = W. Lane 0's streams are the model's seed
    itself, so G = 1 trains exactly as one graph per step always has.
    """

    graphs: list[list[int]]  # per lane: indices of the training graphs it holds
    mine: list[int]  # the lanes this process runs
    shuffles: dict[int, np.random.Generator]
    generators: dict[int, Any]  # torch.Generator per lane

    @classmethod
    def deal(cls, n_graphs: int, per_step: int, seed: int, device: str) -> "_Lanes":
        import torch

        def lane_seed(lane: int) -> int:
            return seed if lane == 0 else int(np.random.SeedSequence([seed, lane]).generate_state(1)[0])

        mine = _distributed.ranks().share(list(range(per_step)))
        return cls([list(range(lane, n_graphs, per_step)) for lane in range(per_step)], mine,
                   {lane: np.random.default_rng(lane_seed(lane)) for lane in mine},
                   {lane: torch.Generator(device=device).manual_seed(lane_seed(lane)) for lane in mine})

    @property
    def steps(self) -> int:
        return len(self.graphs[0])

    def epoch(self) -> list[list[tuple[int, int]]]:
        """Per step, the (lane, graph) pairs this process trains, in a freshly shuffled order."""
        order = {lane: [self.graphs[lane][j] for j in self.shuffles[lane].permutation(len(self.graphs[lane]))]
                 for lane in self.mine}
        return [[(lane, order[lane][s]) for lane in self.mine if s < len(order[lane])] for s in range(self.steps)]

    def batch(self, step: int) -> int:
        """Graphs trained at ``step`` over all processes (the last step of an epoch may have fewer)."""
        return sum(step < len(g) for g in self.graphs)


def _sum_gradients(params: list) -> None:
    """Sum every parameter's gradient over the processes (each is already divided by the step's
    graph count, so the sum is their mean); a parameter no process touched keeps no gradient, as
    in a one-process run, so AdamW skips it the same way."""
    import torch
    import torch.distributed as dist

    device = params[0].device
    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([touched] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    with _distributed.peers():
        dist.all_reduce(flat)
    offset, touched_anywhere = len(params), flat[: len(params)].tolist()  # one device sync, not one per tensor
    for p, any_touch in zip(params, touched_anywhere):
        size = p.numel()
        p.grad = flat[offset : offset + size].view_as(p).clone() if any_touch > 0 else None
        offset += size


def _sum_losses(sums: dict[str, float]) -> dict[str, float]:
    """Each loss part summed over the processes' graphs of the epoch."""
    import torch.distributed as dist

    gathered: list[dict[str, float] | None] = [None] * _distributed.ranks().world
    with _distributed.peers():
        dist.all_gather_object(gathered, sums)
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            total[k] = total.get(k, 0.0) + v
    return total


@dataclass
class _Member:
    """One model of a fold as it trains: its best validation epoch so far, the score, weights
    (on the CPU) and validation predictions there, and every epoch's losses."""

    epoch: int = -1
    pcc: float = -np.inf
    state: dict[str, Any] | None = None
    val_pred: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def keep(self, epoch: int, pcc: float, model, val_pred: dict[str, np.ndarray]) -> None:
        self.epoch, self.pcc, self.state, self.val_pred = epoch, pcc, _state_dict_cpu(model), val_pred


def _train_member(fold: BankGraphs, mcfg, dims: dict[str, int], train_graphs: list[SlideGraph],
                  val_graphs: list[SlideGraph], block: Block | None, config: FitConfig, backend, device: str,
                  seed: int, name: str) -> _Member:
    """Train one model from ``seed`` and keep its best validation epoch (the last without validation)."""
    import torch

    from .._progress import progress
    from ..nn import SpaHGC

    where = _distributed.ranks()
    with deterministic(seed):
        model = SpaHGC(mcfg, dims["spot_dim"], dims["ref_dim"], dims["n_genes"], backend, seed=seed).to(device)
        model.fit_gene_basis(torch.as_tensor(fold.bank.y))  # the training spots' expression (low-rank head)
        lanes = _Lanes.deal(len(train_graphs), graphs_per_step(config), seed, device)
        prepared = {i: backend.prepare(train_graphs[i], device) for lane in lanes.mine for i in lanes.graphs[lane]}
        if block is not None:  # the lone training slide's held-out band
            prepared_val = [prepared[0] if 0 in prepared else backend.prepare(train_graphs[0], device)]
        else:
            prepared_val = [backend.prepare(g, device) for g in val_graphs]
        supervised = None if block is None else torch.as_tensor(~block.rows, device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        best = _Member()
        bar = progress(range(config.epochs), desc=f"fold {name}",
                       disable=None if config.progress and where.main else True, leave=False)
        for epoch in bar:
            model.train()
            sums: dict[str, float] = {}
            for step, pairs in enumerate(lanes.epoch()):
                opt.zero_grad(set_to_none=True)
                for lane, i in pairs:
                    loss, parts = model.training_loss(prepared[i], generator=lanes.generators[lane], rows=supervised)
                    (loss / lanes.batch(step)).backward()
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                if where.distributed:
                    _sum_gradients(params)
                opt.step()
                model.update_target()
            if where.distributed:
                sums = _sum_losses(sums)
            row = {"epoch": epoch, **{k: v / len(train_graphs) for k, v in sums.items()}}
            val_pred: dict[str, np.ndarray] = {}
            if val_graphs:
                row["val_pcc"], row["val_mse"], val_pred = _validate(model, prepared_val, val_graphs, block)
            if where.distributed and val_graphs:  # every process stops (and keeps) where the main one does
                row["val_pcc"] = _distributed.agree(row["val_pcc"], device)
            best.history.append(row)
            score = row.get("val_pcc", float("nan"))
            # Without validation every epoch replaces the last; an undefined PCC never beats a defined one.
            if not val_graphs or best.state is None or (not np.isnan(score) and score > best.pcc):
                best.keep(epoch, score, model, val_pred)
            bar.set_postfix(loss=f"{row['loss']:.4f}", val_pcc=f"{score:.3f}")
            if val_graphs and config.patience is not None and epoch - best.epoch >= config.patience:
                log.info("fold %s: early stop at epoch %d (best %d)", name, epoch, best.epoch)
                break
        bar.close()
    return best


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
    group = "nccl" if device.startswith("cuda") else "gloo"
    with _distributed.process_group(group) as where:
        device = str(resolve_device(_distributed.local_device(device, where)))
        with contextlib.ExitStack() as stack:
            tmp = None
            if where.main:  # the main process writes the run; the others train beside it
                stack.enter_context(output_lock(out_dir, command_line()))
                tmp = stack.enter_context(atomic_dir(out_dir, keep=user_entries))
            for i, fold in enumerate(folds):
                r = _train_fold(fold, config, tmp, backend, device, seed=config.seed + i)
                if r is None:
                    skipped[fold.name] = "no training graph: no training slide has references from another one"
                    continue
                log.info("fold %s: best epoch %d, validation PCC %.4f", r.fold, r.best_epoch, r.best_val_pcc)
                results.append(r)
            if tmp is not None:
                write_record(tmp, [r.fold for r in results], skipped, fit=config.to_dict(), backend=backend.name,
                             device=device, processes=where.world, graphs_per_step=graphs_per_step(config),
                             torch_version=torch.__version__, python=platform.python_version())
        _distributed.barrier()  # the run is complete before any process returns
    return results


def fit(graphs_path: str | Path, out_dir: str | Path, config: FitConfig | None = None) -> list[FoldResult]:
    """Train SpaHGC on every fold of the graph store ``graphs_path``; write the run to ``out_dir``."""
    config = config or FitConfig()
    check_run_output(out_dir)
    return fit_folds(load_folds(graphs_path, config.folds), out_dir, config)
