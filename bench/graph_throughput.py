"""Throughput of graph construction: her2st folds end to end, synthetic slides of 1k-50k spots,
and kNN search on synthetic pools.

Usage::

    python bench/graph_throughput.py --out bench_graph.json                      # small sizes
    python bench/graph_throughput.py --sizes 10000x1000,100000x10000,1000000x10000 --dim 1024
    python bench/graph_throughput.py --slides 1000,5000,20000,50000 --manifest ''

Each case runs once to warm up, then ``repeats`` times; the median is reported. A warm-up slower
than ``max_seconds`` is reported alone (``repeats: 0``) so a slow backend cannot stall the run.
``faiss-ivf`` rows also carry recall@k against exact faiss on the same queries.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # machine.py, when imported from elsewhere
DEFAULT_SIZES = ((10_000, 1_000),)


def _time(fn: Callable[[], object], repeats: int, max_seconds: float) -> tuple[float, int, object]:
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    if first > max_seconds or repeats < 1:
        return first, 0, result
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), repeats, result


def _machine() -> dict:
    """The shared machine description (:mod:`machine`) plus what ``auto`` picks and faiss GPU support."""
    import torch

    from hgc._optional import available
    from hgc.graph.knn import resolve_backend
    from machine import describe

    faiss_gpu = False
    if available("faiss"):
        import faiss

        faiss_gpu = hasattr(faiss, "StandardGpuResources")
    return {**describe(), "torch_threads": torch.get_num_threads(), "auto_backend": resolve_backend("auto"),
            "faiss_gpu": faiss_gpu}


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can run: faiss if installed, torch, and CUDA if present."""
    import torch

    from hgc._optional import available
    from hgc.graph import knn

    out = [("faiss", "cpu"), ("faiss-ivf", "cpu")] if available("faiss") else []
    out.append(("torch", "cpu"))
    if torch.cuda.is_available():
        out.append(("torch", "cuda"))
        if knn.resolve_backend("auto", "cuda") == "faiss":
            out.append(("faiss", "cuda"))
    return out


def bench_search(sizes: Sequence[tuple[int, int]], dim: int, metrics: Sequence[str], k: int,
                 repeats: int, max_seconds: float, backends: Sequence[tuple[str, str]] | None = None) -> list[dict]:
    from hgc.graph import knn

    rng = np.random.default_rng(0)
    backends = backends or available_backends()
    rows = []
    for n_ref, n_query in sizes:
        # clustered data: IVF recall on pure noise says nothing about embeddings
        # float32 throughout: a 1M x 1024 pool is 4 GB, twice that as float64
        centres = rng.standard_normal((256, dim), dtype=np.float32)
        refs = centres[rng.integers(0, 256, n_ref)] + 0.5 * rng.standard_normal((n_ref, dim), dtype=np.float32)
        queries = centres[rng.integers(0, 256, n_query)] + 0.5 * rng.standard_normal((n_query, dim), dtype=np.float32)
        for metric in metrics:
            exact = None
            for backend, device in backends:
                def call():
                    return knn.search(queries, refs, k, metric, backend=backend, device=device)

                seconds, reps, (idx, _) = _time(call, repeats, max_seconds)
                row = {"n_ref": n_ref, "n_query": n_query, "dim": dim, "k": k, "metric": metric,
                       "backend": backend, "device": device, "median_s": round(seconds, 4), "repeats": reps,
                       "queries_per_s": round(n_query / seconds, 1)}
                if backend == "faiss" and device == "cpu":
                    exact = idx
                if backend == "faiss-ivf" and exact is not None:
                    row["recall_at_k"] = round(knn.recall_at_k(idx, exact), 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_her2st(manifest: Path, embeddings: Path | None, genes: str, repeats: int, max_seconds: float,
                 backends: Sequence[str] = ("faiss", "torch")) -> list[dict]:
    """Build every fold of both protocols; embeddings from a file or random 1,280-d (timing only)."""
    from hgc.data import read_manifest
    from hgc.data.splits import make_folds
    from hgc.graph.build import build_graphs, load_embeddings
    from hgc.graph.fold import GraphConfig

    m = read_manifest(manifest)
    slides = {s.id: s for s in m.slides()}
    if embeddings is not None:
        emb = load_embeddings(embeddings, list(slides.values()))
    else:
        rng = np.random.default_rng(0)
        emb = {k: rng.normal(size=(s.n_spots, 1280)).astype(np.float32) for k, s in slides.items()}
    rows = []
    for protocol in ("patient-kfold", "slide-loso"):
        folds = make_folds(m.patients, protocol)
        for backend in backends:
            config = GraphConfig(genes=genes, knn_backend=backend)

            def call():
                return build_graphs(slides, emb, folds, protocol, config)

            seconds, reps, gs = _time(call, repeats, max_seconds)
            n_graphs = sum(len(f.targets) for f in gs.folds)
            row = {"protocol": protocol, "backend": backend, "genes": genes, "folds": len(folds),
                   "graphs": n_graphs, "dim": int(next(iter(emb.values())).shape[1]),
                   "embeddings": str(embeddings) if embeddings else "random",
                   "median_s": round(seconds, 3), "repeats": reps, "graphs_per_s": round(n_graphs / seconds, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def synthetic_slide(name: str, patient: str, n_spots: int, n_genes: int, rng: np.random.Generator):
    """A Visium-like slide without an image: spots on the hexagonal array (odd rows shifted one
    column, 100 µm apart at 1 µm/px) and Poisson counts."""
    import scipy.sparse as sp

    from hgc.data import Slide

    side = int(np.ceil(np.sqrt(n_spots)))
    row, col = np.divmod(np.arange(n_spots), side)
    col = 2 * col + row % 2
    return Slide(
        id=name, patient=patient, barcodes=np.array([f"{name}-{i}" for i in range(n_spots)]),
        coords=np.stack([col * 50.0, row * 86.6], axis=1), counts=sp.csr_matrix(rng.poisson(1.0, (n_spots, n_genes))),
        genes=np.array([f"G{i}" for i in range(n_genes)]), microns_per_pixel=1.0, mpp_source="synthetic",
        platform="visium", array_coords=np.stack([row, col], axis=1),
    )


def bench_synthetic(spots: Sequence[int], dim: int, repeats: int, max_seconds: float,
                    backend: str = "auto", device: str = "cpu", n_genes: int = 250) -> list[dict]:
    """One slide-LOSO fold of three synthetic slides of ``n`` spots each (two training slides, one
    test slide): three target graphs, the test target's pool holding 2n references.

    Sizes go up in order; once a build takes longer than ``max_seconds`` (or fails, e.g. out of
    memory) the larger ones are recorded as not run (the kNN part grows as n squared).
    """
    from hgc.data.splits import Fold
    from hgc.graph import knn
    from hgc.graph.build import build_graphs
    from hgc.graph.fold import GraphConfig

    rng = np.random.default_rng(0)
    config = GraphConfig(genes=f"top-mean:{n_genes}", knn_backend=backend, device=device)
    rows: list[dict] = []
    stop = None
    for n in spots:
        row = {"n_spot": n, "n_ref_test": 2 * n, "dim": dim, "genes": n_genes, "metric": config.metric,
               "backend": knn.resolve_backend(backend, device), "device": device}
        if stop is not None:
            rows.append({**row, "status": f"not run: {stop}"})
            continue
        slides = {name: synthetic_slide(name, f"P{i}", n, n_genes, rng) for i, name in enumerate("ABC")}
        centres = rng.standard_normal((64, dim), dtype=np.float32)
        emb = {k: centres[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
               for k in slides}
        fold = [Fold("C", train=["A", "B"], test=["C"])]
        try:
            seconds, reps, gs = _time(lambda: build_graphs(slides, emb, fold, "slide-loso", config), repeats,
                                      max_seconds)
        except Exception as exc:  # noqa: BLE001 - a size that fails (memory) must not lose the others
            rows.append({**row, "status": f"error: {type(exc).__name__}: {exc}"[:300]})
            stop = f"{n:,} spots failed"
            continue
        f = gs.folds[0]
        edges: dict[str, int] = {}
        for part in [f.whole, *f.pools.values(), *f.targets]:
            for r, e in part.edges.items():
                edges[r] = edges.get(r, 0) + e.shape[1]
        rows.append({**row, "graphs": len(f.targets), "n_edges": sum(edges.values()), "edges": edges,
                     "median_s": round(seconds, 3), "repeats": reps, "spots_per_s": round(3 * n / seconds, 1), "status": "ok"})
        print(json.dumps(rows[-1]), flush=True)
        if seconds > max_seconds:
            stop = f"{n:,} spots took longer than {max_seconds:.0f} s"
    return rows


def run(out_json: str | Path, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, dim: int = 1024,
        metrics: Sequence[str] = ("l1", "cosine"), k: int = 7, repeats: int = 3, max_seconds: float = 60.0,
        manifest: str | Path | None = REPO / "examples" / "her2st.tsv", embeddings: str | Path | None = None,
        genes: str = "top-mean:250", backends: Sequence[tuple[str, str]] | None = None,
        slides: Sequence[int] = ()) -> dict:
    """Run the benchmarks and write the results as JSON to ``out_json``."""
    result = {"machine": _machine(),
              "search": bench_search(sizes, dim, metrics, k, repeats, max_seconds, backends)}
    if slides:
        result["synthetic"] = bench_synthetic(slides, dim, repeats, max_seconds)
    if manifest is not None:
        result["her2st"] = bench_her2st(Path(manifest), Path(embeddings) if embeddings else None, genes,
                                        repeats, max_seconds)
    Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_graph_throughput.json")
    p.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="REFSxQUERIES,...")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--metrics", default="l1,cosine")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--manifest", default=str(REPO / "examples" / "her2st.tsv"), help="'' to skip her2st")
    p.add_argument("--embeddings", default=None)
    p.add_argument("--genes", default="top-mean:250")
    p.add_argument("--backends", default="", help="e.g. faiss:cpu,torch:cuda (default: all available)")
    p.add_argument("--slides", default="", help="synthetic slide sizes in spots, e.g. 1000,5000,20000,50000")
    a = p.parse_args()
    chosen = [tuple(b.split(":")) for b in a.backends.split(",") if b] or None
    run(a.out, a.sizes, a.dim, a.metrics.split(","), 7, a.repeats, a.max_seconds, a.manifest or None,
        a.embeddings, a.genes, chosen, [int(n) for n in a.slides.split(",") if n])
