"""Throughput of every stage, one JSON per machine: embedding, similarity search, graph building,
training and inference.

Usage (from the repository root)::

    python bench/throughput.py --set cpu --out bench/results/throughput-cpu.json
    python bench/throughput.py --set gpu --out OUTDIR/throughput-gpu.json      # what bench/gpu.sh runs
    python bench/throughput.py --set ivf --stages search --out bench/results/throughput-ivf.json

The stages are measured by ``bench/embed_throughput.py``, ``bench/graph_throughput.py`` and
``bench/train_throughput.py``; this script fixes the sizes of each *set* (``cpu``: minutes on 2
cores; ``gpu``: under 8 minutes on one GPU; ``ivf``: approximate search at 100k and 1M
references), runs them, and writes one record with the machine described (:mod:`machine`). A
stage that fails or cannot run here (a missing package, no data) is recorded with its reason and
the others still run, so one GPU session always yields a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from machine import REPO, describe, shared_data_root  # noqa: E402
from train_throughput import CPU_SIZES, GPU_SIZES, timed  # noqa: E402

log = logging.getLogger("bench.throughput")

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchSet:
    """One throughput set: keyword arguments of each stage's ``run`` (sizes, encoders, ...).

    ``budget_s`` caps a stage's own time where the stage supports it; ``her2st`` adds building
    the her2st folds' graphs (needs the real data); ``synthetic`` builds graphs of synthetic
    slides (sizes in spots, the device, and the time after which larger sizes are not run).
    """

    name: str
    device: str
    embed: dict[str, Any]
    search: list[dict[str, Any]]
    train: dict[str, Any]
    her2st: bool
    synthetic: dict[str, Any] = field(default_factory=dict)
    repeats: int = 3
    budget_s: dict[str, float] = field(default_factory=dict)


SETS: dict[str, BenchSet] = {
    "cpu": BenchSet(
        name="cpu",
        device="cpu",
        embed={"encoders": ("effnet-lite0",), "batch_sizes": (32, 64), "dtypes": ("fp32",),
               "end_to_end": {"slides": ["B4"], "workers": 1, "batch_sizes": (64,), "repeats": 2},
               "loader": {"slides": ["B4", "C2"], "batch_sizes": (64,), "repeats": 3}},
        # fewer queries for larger pools keep each case near 10 s (exact search costs pool x queries);
        # no IVF there: its k-means training alone takes many minutes on 2 cores
        search=[{"sizes": ((10_000, 1_000),), "devices": ("cpu",)},
                {"sizes": ((100_000, 100), (1_000_000, 10)), "devices": ("cpu",), "exclude": ("faiss-ivf",)}],
        train={"sizes": CPU_SIZES},
        her2st=True,
        synthetic={"spots": (1_000, 2_000, 5_000, 10_000, 20_000, 50_000), "device": "cpu", "max_seconds": 60.0},
        budget_s={"train": 300.0},
    ),
    # IVF at pool sizes of many slides (HEST-1k: ~2M spots): time and recall@7 against exact faiss on
    # the same 1,000 queries; each case runs once (k-means and exact L1 at 1M take minutes on a CPU)
    "ivf": BenchSet(
        name="ivf",
        device="cpu",
        embed={},
        search=[{"sizes": ((100_000, 1_000), (1_000_000, 1_000)), "devices": ("cpu",), "exclude": ("torch",)}],
        train={},
        her2st=False,
        repeats=0,
    ),
    "gpu": BenchSet(
        name="gpu",
        device="cuda",
        embed={"encoders": ("effnet-lite0", "uni", "uni2-h"), "batch_sizes": (32, 128, 512), "dtypes": ("fp32", "bf16")},
        search=[
            {"sizes": ((10_000, 10_000), (100_000, 10_000), (1_000_000, 1_000)), "devices": ("cuda",), "max_seconds": 10.0},
            {"sizes": ((10_000, 1_000),), "devices": ("cpu",), "max_seconds": 10.0},
        ],
        train={"sizes": GPU_SIZES},
        her2st=False,
        synthetic={"spots": (1_000, 5_000, 10_000, 20_000, 50_000), "device": "cuda", "max_seconds": 30.0},
        budget_s={"embedding": 120.0, "train": 120.0},
    ),
}

STAGES: tuple[str, ...] = ("embedding", "search", "train")


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def bare_forward(
    encoder: str, batch_size: int, dtype: str, device: str, repeats: int, warmup: int = 1
) -> dict[str, Any]:
    """patches/s of the encoder's forward pass alone on random input: the ceiling of ``hgc embed``.

    The architecture is built with random weights (same compute as the real ones, and no weights
    download or licence needed, so UNI and UNI2-h can be timed anywhere).
    """
    import torch

    from hgc.embed.registry import build_model, get_spec

    spec = get_spec(encoder)
    dev = torch.device(device)
    model = build_model(spec)
    model.reset_classifier(0)
    model = model.eval().to(dev)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch_size, 3, spec.input_px, spec.input_px, device=dev).contiguous(memory_format=fmt)
    cast = getattr(torch, DTYPES[dtype])
    autocast = torch.autocast(dev.type, dtype=cast, enabled=cast != torch.float32)

    def forward() -> None:
        with torch.inference_mode(), autocast:
            model(x)

    runs = timed(forward, dev, repeats, warmup)
    seconds = statistics.median(runs)
    model = x = None  # free the GPU memory before the next encoder
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "encoder": encoder, "arch": spec.arch, "weights": "random", "batch_size": batch_size, "dtype": dtype,
        "device": str(dev), "patches_per_s": batch_size / seconds, "batch_s": seconds, "batch_s_runs": runs,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),  # fp32 rows: full fp32 unless True
    }


def stage_embedding(s: BenchSet, data_root: Path | None) -> dict[str, Any]:
    """The encoders' bare forward pass (random weights) and, with real data, ``hgc embed`` end to end."""
    budget = s.budget_s.get("embedding")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for encoder in s.embed["encoders"]:
        for batch in s.embed["batch_sizes"]:
            for dtype in s.embed["dtypes"]:
                row = {"encoder": encoder, "batch_size": batch, "dtype": dtype, "kind": "bare forward"}
                if budget is not None and time.perf_counter() - t0 > budget:
                    rows.append({**row, "status": f"skipped: time budget of {budget:.0f} s spent"})
                    continue
                try:
                    rows.append({**row, **bare_forward(encoder, batch, dtype, s.device, s.repeats), "status": "ok"})
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest batch
                    log.warning("bare forward %s batch %d %s failed: %s", encoder, batch, dtype, exc)
                    rows.append({**row, "status": f"error: {type(exc).__name__}: {str(exc)[:200]}"})
    if s.embed.get("loader") and data_root is not None:  # the loader alone, one core: can N cores feed a GPU?
        import embed_throughput

        spec = dict(s.embed["loader"])
        for batch in spec.pop("batch_sizes"):
            for crops_only in (False, True):
                r = embed_throughput.loader(REPO / "examples" / "her2st.tsv", batch_size=batch, crops_only=crops_only,
                                            data_root=data_root, **spec)
                kind = "loader, crops only (GPU path), 1 core" if crops_only else "loader, 1 core"
                rows.append({"encoder": "effnet-lite0 input, no model", "batch_size": batch,
                             "dtype": "uint8" if crops_only else "fp32",
                             "kind": kind, "device": "cpu", **r, "status": "ok"})
    end_to_end: list[dict[str, Any]] | dict[str, Any]
    if s.embed.get("end_to_end") and data_root is not None:
        import embed_throughput

        e2e = dict(s.embed["end_to_end"])
        batch_sizes, repeats = e2e.pop("batch_sizes", s.embed["batch_sizes"]), e2e.pop("repeats", s.repeats)
        end_to_end = []
        for batch in batch_sizes:
            r = embed_throughput.run(REPO / "examples" / "her2st.tsv", encoder="effnet-lite0", batch_size=batch,
                                     device=s.device, repeats=repeats, data_root=data_root, **e2e)
            r.pop("machine", None)
            end_to_end.append(r)
    else:
        end_to_end = _skipped("needs the her2st data and the effnet-lite0 weights" if s.embed.get("end_to_end")
                              else f"not part of the {s.name} set")
    return {"rows": rows, "end_to_end": end_to_end}


def stage_search(s: BenchSet, data_root: Path | None) -> dict[str, Any]:
    """kNN search on synthetic pools, building synthetic slides' graphs, and (with the real data)
    building the her2st folds' graphs.

    ``s.search`` is a list of cases, each sizes (pool, queries) on some devices: the backends that
    run there (faiss if installed, torch; less any in ``exclude``) are timed.
    """
    import graph_throughput

    her2st = s.her2st and data_root is not None
    if her2st:
        os.environ["HGC_DATA"] = str(data_root)
    available = graph_throughput.available_backends()
    rows: list[dict[str, Any]] = []
    graph_rows = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(s.search):
            backends = [b for b in available if b[1] in case["devices"] and b[0] not in case.get("exclude", ())]
            out = graph_throughput.run(
                Path(tmp) / "graph.json", sizes=case["sizes"], dim=case.get("dim", 1024), repeats=s.repeats,
                max_seconds=case.get("max_seconds", 60.0), backends=backends,
                manifest=REPO / "examples" / "her2st.tsv" if her2st and i == 0 else None,
            )
            rows += out["search"]
            graph_rows = graph_rows or out.get("her2st")
    synthetic = s.synthetic
    return {
        "search": rows,
        "graph_build_her2st": graph_rows or _skipped(
            "her2st data not available here" if s.her2st else f"not part of the {s.name} set"
        ),
        "graph_build_synthetic": graph_throughput.bench_synthetic(
            synthetic["spots"], 1024, repeats=s.repeats, max_seconds=synthetic["max_seconds"],
            device=synthetic["device"]) if synthetic else _skipped(f"not part of the {s.name} set"),
        "graph_machine": out["machine"],
    }


def stage_train(s: BenchSet, data_root: Path | None) -> dict[str, Any]:
    import train_throughput

    return train_throughput.run(device=s.device, repeats=s.repeats, budget_s=s.budget_s.get("train"), **s.train)


RUNNERS: dict[str, Callable[[BenchSet, Path | None], dict[str, Any]]] = {
    "embedding": stage_embedding,
    "search": stage_search,
    "train": stage_train,
}


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": f"skipped: {reason}"}


def run_stage(name: str, s: BenchSet, data_root: Path | None) -> dict[str, Any]:
    """One stage's record with its wall time; a failure becomes ``status: error`` with the reason."""
    t0 = time.perf_counter()
    try:
        record = {"status": "ok", **RUNNERS[name](s, data_root)}
    except ModuleNotFoundError as exc:
        log.warning("stage %s cannot run: %s", name, exc)
        record = _skipped(f"module {exc.name!r} is not available")
    except Exception as exc:  # noqa: BLE001 - one stage's failure must not lose the others' figures
        log.error("stage %s failed:\n%s", name, traceback.format_exc())
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    record["wall_s"] = round(time.perf_counter() - t0, 2)
    return record


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run(
    bench_set: str | BenchSet,
    stages: Sequence[str] = STAGES,
    data_root: Path | None = None,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a set's stages (a name in :data:`SETS`, or a set of one's own); the JSON-ready record.

    ``on_stage`` gets the record so far after every stage (to save it, so that an interrupted run
    keeps what it measured).
    """
    s = SETS[bench_set] if isinstance(bench_set, str) else bench_set
    if s.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"the {s.name} set needs a CUDA GPU; torch {torch.__version__} sees none")
    data_root = data_root or shared_data_root()
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "kind": "throughput",
        "set": s.name,
        "device": s.device,
        "machine": describe(),
        "data_root": str(data_root) if data_root else None,
        "torch_threads": _torch_threads(),
        "wall_s": 0.0,
        "stages": {},
    }
    for name in stages:
        log.info("stage %s (%s set)", name, s.name)
        record["stages"][name] = run_stage(name, s, data_root)
        record["wall_s"] = round(time.perf_counter() - t0, 2)
        if on_stage is not None:
            on_stage(record)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="set_name", choices=sorted(SETS), default="cpu")
    p.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {','.join(STAGES)}.")
    p.add_argument("--data-root", type=Path, default=None, help="Real data (default: $HGC_DATA, else ../shared/data).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 on a CPU shared with other jobs).")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    stages = [x for x in a.stages.split(",") if x]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; expected some of {list(STAGES)}")
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save(record: dict[str, Any]) -> None:
        a.out.write_text(json.dumps(record, indent=2) + "\n")
        log.info("wrote %s", a.out)

    run(a.set_name, stages, a.data_root, on_stage=save)


if __name__ == "__main__":
    main()
