"""Training and inference throughput of SpaHGC on synthetic slide graphs, per graph backend.

Why synthetic: throughput depends on node and edge counts, feature sizes and the model, not on
what the features mean, and real slides stop at a few thousand spots. The graphs have the
builder's degrees (``near``: up to 5 grid neighbours, ``refer``: 7 references per spot,
``close``: 3 neighbours per reference), UNI-sized features (1024-d) and a 250-gene panel, so one
step costs what a real step of that size costs.

Figures per (backend, size): one training step (``training_loss`` on two masked views, backward,
AdamW step, EMA update) as graph-steps/s and spots/s, one inference pass (``model(prepared)``,
no grad) as spots/s, and peak memory (process RSS sampled during the run on CPU,
``torch.cuda.max_memory_allocated`` on GPU). Each figure is the median of ``repeats`` timed runs
after ``warmup`` untimed ones; on CUDA runs are timed with events after synchronising. Time vs
number of edges is fitted as a power law per backend (the scaling exponent; 1.0 is linear).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from hgc.graph.record import SlideGraph  # noqa: E402
from machine import describe  # noqa: E402

log = logging.getLogger("bench.train_throughput")

#: The builder's degrees (brief §2): near <= 5 grid neighbours, refer k = 7, close k = 3.
DEGREES = {"near": 5, "refer": 7, "close": 3}
CPU_SIZES = (1_000, 2_000, 5_000, 10_000, 20_000)
GPU_SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)
# Grid offsets in a fixed order; the first DEGREES["near"] that fall on the grid are kept.
_OFFSETS = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)])


def synthetic_graph(
    n_spot: int, n_ref: int | None = None, dim: int = 1024, n_genes: int = 250, seed: int = 0
) -> SlideGraph:
    """A slide graph of ``n_spot`` spots on a square grid and ``n_ref`` references (default n_spot)."""
    rng = np.random.default_rng(seed)
    n_ref = n_spot if n_ref is None else n_ref
    side = int(np.ceil(np.sqrt(n_spot)))
    cell = np.arange(n_spot)
    gx, gy = cell % side, cell // side
    nx, ny = gx[:, None] + _OFFSETS[:, 0], gy[:, None] + _OFFSETS[:, 1]
    nb = ny * side + nx
    valid = (nx >= 0) & (nx < side) & (ny >= 0) & (nb < n_spot)
    valid &= np.cumsum(valid, axis=1) <= DEGREES["near"]
    dst, which = np.nonzero(valid)
    near = np.stack([nb[dst, which], dst])
    k_refer, k_close = DEGREES["refer"], DEGREES["close"]
    refer = np.stack([rng.integers(0, n_ref, n_spot * k_refer), np.repeat(cell, k_refer)])
    close = np.stack([rng.integers(0, n_ref, n_ref * k_close), np.repeat(np.arange(n_ref), k_close)])
    edges = {"near": near, "refer": refer, "close": close}
    return SlideGraph(
        fold="synthetic",
        target=f"synthetic-{n_spot}",
        role="train",
        patient="synthetic",
        spot_x=rng.standard_normal((n_spot, dim), dtype=np.float32),
        spot_coords=np.stack([gx, gy], 1).astype(np.float64) * 100.0,
        spot_barcodes=cell.astype(str).astype(object),
        ref_x=rng.standard_normal((n_ref, dim), dtype=np.float32),
        ref_y=rng.random((n_ref, n_genes), dtype=np.float32),
        ref_slide=np.full(n_ref, "ref", dtype=object),
        ref_patient=np.full(n_ref, "ref", dtype=object),
        edges={k: v.astype(np.int64) for k, v in edges.items()},
        edge_weight={k: rng.random(v.shape[1], dtype=np.float32) for k, v in edges.items()},
        spot_y=rng.random((n_spot, n_genes), dtype=np.float32),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device, interval_s: float = 0.002) -> Iterator[dict[str, Any]]:
    """Peak memory of the enclosed block: CUDA max allocated, else sampled process RSS (MiB)."""
    record: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield record
        _sync(device)
        record.update(kind="cuda_max_memory_allocated", peak_mib=torch.cuda.max_memory_allocated(device) / 2**20)
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record.update(kind="process_rss", peak_mib=max(peak[0], _rss_bytes()) / 2**20)


def default_backends(device: torch.device) -> list[str]:
    """DGL (CPU wheels only, so CPU only) where it imports, and PyG."""
    from hgc._optional import available

    os.environ.setdefault("DGLBACKEND", "pytorch")
    out = ["dgl"] if device.type == "cpu" and available("dgl") else []
    return out + (["pyg"] if available("torch_geometric") else [])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    graph: SlideGraph, backend: str, device: torch.device, model: dict[str, Any], repeats: int, warmup: int, seed: int
) -> dict[str, Any]:
    """Train-step and inference timings and peak memory of one graph under one backend.

    Training holds two views' activations for backward, inference one unmasked pass, so a graph
    too large to train may still be predicted: each phase that runs out of memory is recorded as
    ``oom`` (``status``: ``ok``, ``train oom`` or ``oom``) and the other still measured.
    """
    from hgc.nn import ModelConfig, SpaHGC, get_backend

    be = get_backend(backend)
    t0 = time.perf_counter()
    prepared = be.prepare(graph, device)
    _sync(device)
    out: dict[str, Any] = {"prepare_s": time.perf_counter() - t0}
    torch.manual_seed(seed)
    net = SpaHGC(ModelConfig(**model), graph.spot_x.shape[1], graph.ref_x.shape[1], graph.n_genes, be, seed=seed)
    net.fit_gene_basis(torch.as_tensor(graph.ref_y))  # as training does (the low-rank head's axes)
    net = net.to(device)
    opt = torch.optim.AdamW((p for p in net.parameters() if p.requires_grad), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator(device=device).manual_seed(seed)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = net.training_loss(prepared, generator=gen)
        loss.backward()
        opt.step()
        net.update_target()

    def infer() -> None:
        with torch.no_grad():
            net(prepared)

    ok = {}
    for phase, fn, training in (("train", step, True), ("infer", infer, False)):
        net.train(training)
        try:
            with peak_memory(device) as mem:
                runs = timed(fn, device, repeats, warmup)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            log.warning("%s: %s of %d spots ran out of memory", backend, phase, graph.n_spot)
            opt.zero_grad(set_to_none=True)
            ok[phase] = False
            _release(device)
            continue
        ok[phase] = True
        seconds = statistics.median(runs)
        key = "train_step_s" if phase == "train" else "infer_s"
        out.update({key: seconds, f"{key}_runs": runs, f"peak_{phase}_mib": mem["peak_mib"], "memory_kind": mem["kind"]})
        if phase == "train":
            out.update(graph_steps_per_s=1.0 / seconds, train_spots_per_s=graph.n_spot / seconds)
        else:
            out["infer_spots_per_s"] = graph.n_spot / seconds
    out["status"] = "ok" if all(ok.values()) else "train oom" if ok["infer"] else "oom"
    return out


def scaling_exponent(edges: Sequence[float], seconds: Sequence[float]) -> float | None:
    """Slope of log(time) vs log(edges): the exponent b of time ~ edges^b (None under 2 sizes)."""
    if len(edges) < 2 or len(set(edges)) < 2:
        return None
    return float(np.polyfit(np.log(edges), np.log(seconds), 1)[0])


def run(
    sizes: Sequence[int] = CPU_SIZES,
    backends: Sequence[str] | None = None,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    dim: int = 1024,
    n_genes: int = 250,
    ref_ratio: float = 1.0,
    model: dict[str, Any] | None = None,
    seed: int = 0,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Measure every backend at every size (ascending); returns the JSON-ready section.

    Sizes run in ascending order, each under every backend (so a time budget cuts all backends
    at the same size). A size whose training and inference both run out of memory is recorded as
    ``"oom"`` and the backend's larger ones as skipped, as are sizes left once ``budget_s``
    seconds have passed, so a run always ends with a valid record.
    """
    dev = torch.device(device)
    backends = list(backends) if backends else default_backends(dev)
    model = dict(model or {})
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}  # backend -> why its larger sizes are skipped
    for n in sorted(sizes):
        n_ref = max(1, int(round(n * ref_ratio)))
        if budget_s is not None and time.perf_counter() - start > budget_s:
            for b in backends:
                stopped.setdefault(b, f"skipped: time budget of {budget_s:.0f} s spent")
        graph = synthetic_graph(n, n_ref, dim, n_genes, seed) if set(backends) - set(stopped) else None
        for backend in backends:
            row: dict[str, Any] = {"backend": backend, "device": str(dev), "n_spot": n, "n_ref": n_ref}
            if backend in stopped:
                rows.append({**row, "status": stopped[backend]})
                continue
            row["edges"] = {r: int(e.shape[1]) for r, e in graph.edges.items()}
            row["n_edges"] = sum(row["edges"].values())
            log.info("%s: %d spots, %d refs, %d edges", backend, n, n_ref, row["n_edges"])
            try:
                row.update(measure(graph, backend, dev, model, repeats, warmup, seed))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # the graph itself did not fit
                if not _is_oom(exc):
                    raise
                row["status"] = "oom"
            if row["status"] == "oom":
                stopped[backend] = f"skipped: a smaller size ran out of memory ({n} spots)"
            _release(dev)
            rows.append(row)
        del graph
    scaling = {}
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        train = [(r["n_edges"], r["train_step_s"]) for r in mine if "train_step_s" in r]
        infer = [(r["n_edges"], r["infer_s"]) for r in mine if "infer_s" in r]
        scaling[backend] = {
            "train_exponent": scaling_exponent(*zip(*train)) if train else None,
            "infer_exponent": scaling_exponent(*zip(*infer)) if infer else None,
            "n_sizes": len(train),
            "n_sizes_infer": len(infer),
        }
    from hgc.nn import ModelConfig

    return {
        "config": {
            "sizes": sorted(sizes), "backends": backends, "device": str(dev), "repeats": repeats, "warmup": warmup,
            "dim": dim, "n_genes": n_genes, "ref_ratio": ref_ratio, "degrees": DEGREES, "seed": seed,
            "model": ModelConfig(**model).to_dict(), "torch_threads": torch.get_num_threads(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        },
        "rows": rows,
        "scaling": scaling,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="Comma-separated spot counts (default: CPU or GPU set).")
    p.add_argument("--backends", default=None, help="Comma-separated: dgl,pyg (default: all that import).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    default = GPU_SIZES if a.device.startswith("cuda") else CPU_SIZES
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else default
    section = run(sizes, a.backends.split(",") if a.backends else None, a.device, a.repeats, a.warmup, budget_s=a.budget_s)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"kind": "train_throughput", "machine": describe(), **section}, indent=2) + "\n")


if __name__ == "__main__":
    main()
