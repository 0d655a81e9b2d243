"""Accuracy of SpaHGC and the baselines on a dataset, one protocol, several seeds: the figures we quote.

Usage (from the repository root)::

    python bench/accuracy.py --dataset her2st --protocol patient-kfold --seeds 0,1,2
    python bench/accuracy.py --dataset her2st --protocol slide-loso --seeds 0,1,2
    python bench/accuracy.py --dataset her2st --protocol patient-kfold --quick      # CI smoke run
    python bench/accuracy.py --manifest my.tsv --protocol patient-kfold --genes top-mean:250 --out r.json

Each seed is one ``hgc run`` (:func:`hgc.train.pipeline.run_pipeline`) in one work folder, so the
embeddings and graphs are made once and only training and prediction repeat per seed. The
baselines (ridge, kNN retrieval, training mean) run beside the model on the same slides, genes,
splits and features. The record (``bench/results/<name>.json``) keeps every slide's metrics per
seed, their mean ± std over slides and seeds, the settings, machine, hgc version and commit; the
published figures of the brief (§4) are stored beside ours, labelled, never mixed in.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from hgc.embed.registry import DEFAULT_ENCODER  # noqa: E402
from hgc.train.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from machine import REPO, describe, shared_data_root  # noqa: E402
from report import accuracy_markdown, summarise_rows  # noqa: E402

log = logging.getLogger("bench.accuracy")

SCHEMA_VERSION = 1
PROTOCOLS = ("patient-kfold", "slide-loso")
#: ``--quick``: one seed, a few epochs; a CI check that the harness runs, not figures to quote.
QUICK_EPOCHS = 2
QUICK_SEEDS = (0,)
FULL_SEEDS = (0, 1, 2)
#: ``--ablation``: the model with one part taken out, or one option added (``hgc fit`` options); the
#: full model is ``None``.
#: ``no-masked-supervision`` keeps the masked views for the contrast only: the supervised terms see
#: the unmasked graph, as inference does (``ModelConfig.supervise="clean"``).
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-contrast": {"contrast": "none"},
    "no-masking": {"masking": False},
    "no-near": {"relations": ("refer", "close")},
    "no-refer": {"relations": ("near", "close")},
    "no-masked-supervision": {"model": {"supervise": "clean"}},
    "full-rank-head": {"model": {"gene_rank": None}},  # the head before hgc 0.2 made it low-rank (rank 10)
    "ensemble-3": {"ensemble": 3},  # not a part taken out: three seeds per fold, averaged
    # graph options (the key ``graph``): ``refer``/``close`` neighbours by cosine similarity (SpaHGC's
    # paper) instead of L1 distance (its code, hgc's default)
    "cosine": {"graph": {"metric": "cosine"}},
}


@dataclass(frozen=True)
class Dataset:
    """A named dataset: its manifest in examples/, its cohort (for published figures), gene panels."""

    manifest: str
    cohort: str
    panels: dict[str, str]  # protocol -> gene panel spec


DATASETS: dict[str, Dataset] = {
    "her2st": Dataset("examples/her2st.tsv", "HER2+", {"slide-loso": "hist2st-her2st", "patient-kfold": "top-mean:250"}),
    "cscc": Dataset("examples/cscc.tsv", "cSCC", {"slide-loso": "hist2st-cscc", "patient-kfold": "top-mean:250"}),
}

_OTHER = "full {cohort} set, UNI-class features; other data and features than ours"
#: The brief's §4 table: PCC-ALL per (protocol, cohort), as published.
PUBLISHED: dict[tuple[str, str], tuple[tuple[str, float], ...]] = {
    ("slide-loso", "HER2+"): (("Hist2ST", 0.144), ("THItoGene", 0.173), ("BLEEP", 0.187), ("mclSTExp", 0.230)),
    ("slide-loso", "cSCC"): (("Hist2ST", 0.184), ("THItoGene", 0.237), ("BLEEP", 0.245), ("mclSTExp", 0.324)),
    ("patient-kfold", "HER2+"): (("TRIPLEX", 0.314), ("DKAN", 0.330), ("Gene-DML", 0.331)),
    ("patient-kfold", "cSCC"): (("TRIPLEX", 0.374), ("DKAN", 0.407), ("Gene-DML", 0.433)),
}


def published(protocol: str, cohort: str | None) -> list[dict[str, Any]]:
    rows = PUBLISHED.get((protocol, cohort or ""), ())
    return [{"method": m, "pcc_all": v, "note": _OTHER.format(cohort=cohort)} for m, v in rows]


def combine(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per method: every slide's metrics tagged with its seed, and mean ± std over all of them."""
    from hgc.evaluate.report import json_safe

    methods: dict[str, Any] = {}
    for seed, report in reports.items():
        for name, m in report["methods"].items():
            rows = methods.setdefault(name, {"per_slide": []})["per_slide"]
            rows += [{"seed": seed, **{k: (float("nan") if v is None else v) for k, v in row.items()}}
                     for row in m["per_slide"]]
    for name, m in methods.items():
        m["mean"], m["std"] = summarise_rows(m["per_slide"])
        m["seed_means"] = {
            str(seed): summarise_rows([r for r in m["per_slide"] if r["seed"] == seed])[0] for seed in reports
        }
        m["n"] = len(m["per_slide"])
    return json_safe(methods)


def run(
    manifest: Path,
    protocol: str,
    genes: str,
    encoder: str,
    seeds: Sequence[int],
    work_dir: Path,
    *,
    epochs: int,
    patience: int | None | str,
    mode: str,
    dataset: str,
    cohort: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    data_root: Path | None = None,
    fit_overrides: dict[str, Any] | None = None,
    ablation: str | None = None,
    preset: str = "hgc",
) -> dict[str, Any]:
    """Run the pipeline once per seed in ``work_dir`` and return the JSON-ready record.

    ``patience`` ``"preset"`` takes the preset's own early-stopping choice."""
    import torch

    from hgc.nn import get_backend
    from hgc.train.config import FitConfig
    from hgc.train.pipeline import run_pipeline

    t0 = time.perf_counter()
    reports: dict[int, dict[str, Any]] = {}
    runs = []
    given = {"patience": patience} if patience != "preset" else {}
    change = dict(ABLATIONS[ablation]) if ablation else {}
    graph_options = change.pop("graph", {})
    fit = FitConfig.from_preset(preset, backend=backend, device=device, epochs=epochs, progress=False, **given,
                                **merge_overrides(fit_overrides or {}, change))
    for seed in seeds:
        t_seed = time.perf_counter()
        cfg = replace(fit, seed=seed)
        log.info("seed %d: hgc run %s (%s, %s, %s) in %s", seed, manifest, protocol, genes, encoder, work_dir)
        reports[seed] = run_pipeline(manifest, protocol, genes, encoder, work_dir, fit_config=cfg, device=device,
                                     data_root=data_root, progress=False, graph_options=graph_options)
        runs.append({"seed": seed, "wall_s": round(time.perf_counter() - t_seed, 2)})
    first = next(iter(reports.values()))
    methods = combine(reports)
    all_rows = [r for m in methods.values() for r in m["per_slide"]]
    machine = describe()
    fit_record = {k: v for k, v in fit.to_dict().items() if k not in ("seed", "progress")}
    return {
        "schema": SCHEMA_VERSION,
        "kind": "accuracy",
        "mode": mode,
        "ablation": ablation,
        "preset": preset,
        "dataset": dataset,
        "cohort": cohort,
        "manifest": str(manifest),
        "protocol": protocol,
        "genes": genes,
        "n_genes": int(all_rows[0]["n_genes"]),
        "encoder": encoder,
        "backend": get_backend(backend).name,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "seeds": list(seeds),
        "fit": fit_record,
        "graph_options": graph_options,
        "space": first["space"],
        "n_top_genes": first.get("n_top_genes"),
        "constant_genes": first.get("constant_genes"),
        "n_slides": len({r["slide"] for r in all_rows}),
        "hgc_version": machine["hgc_version"],
        "git_commit": machine["git_commit"],
        "machine": machine,
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 2),
        "methods": methods,
        "published": published(protocol, cohort),
    }


#: What records merged by ``--combine`` must share (seeds and timings may differ).
SAME_RUN = ("kind", "mode", "ablation", "preset", "dataset", "manifest", "protocol", "genes", "encoder", "backend",
            "fit", "graph_options")


def combine_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record from records of the same run made for different seeds (e.g. in parallel)."""
    from hgc.evaluate.report import json_safe

    def setting(record: dict[str, Any], key: str) -> Any:
        value = record.get(key)  # an option recorded as None (or no options) is the option left unset, as in
        if isinstance(value, dict):  # older records
            return {k: v for k, v in value.items() if v is not None} or None
        return value

    first = records[0]
    for r in records[1:]:
        differ = [k for k in SAME_RUN if setting(r, k) != setting(first, k)]
        if differ:
            raise SystemExit(f"records differ in {differ}; only seeds of one run can be combined")
    seeds = [s for r in records for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"records repeat seeds {seeds}")
    methods: dict[str, Any] = {}
    for name in first["methods"]:
        rows = [row for r in records for row in r["methods"][name]["per_slide"]]
        mean, std = summarise_rows(rows)
        seed_means = {k: v for r in records for k, v in r["methods"][name]["seed_means"].items()}
        methods[name] = {"per_slide": rows, "mean": mean, "std": std, "seed_means": seed_means, "n": len(rows)}
    first = {k: v for k, v in first.items() if k != "_source"}
    runs = [{**x, "git_commit": x.get("git_commit") or r["git_commit"]} for r in records for x in r["runs"]]
    return {**first, "seeds": seeds, "runs": runs,  # each run keeps the commit it was made at
            "wall_s": round(sum(r["wall_s"] for r in records), 2), "methods": json_safe(methods),
            "combined_from": [r.get("_source", "") for r in records]}  # wall_s: their sum (compute, not elapsed)


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``hgc fit`` options with ``extra`` on top; ``model`` overrides merge key by key."""
    model = {**base.get("model", {}), **extra.get("model", {})}
    return {**base, **extra, **({"model": model} if model else {})}


def reuse_inputs(source: Path, work: Path) -> None:
    """Copy the embeddings and graphs of ``source`` (a run folder) into ``work`` when it lacks them.

    The pipeline checks each file's stamp, so a copy made with other settings is simply rebuilt.
    """
    import shutil

    for name in ("embeddings.h5", "graphs.h5"):
        pair = [f"{name}", f"{name}.stamp.json"]  # a file and its stamp travel together, or not at all
        if all((source / f).is_file() for f in pair) and not any((work / f).exists() for f in pair):
            work.mkdir(parents=True, exist_ok=True)
            for f in pair:
                shutil.copy2(source / f, work / f)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--combine", type=Path, nargs="+", default=None,
                     help="Merge records of one run made for different seeds (parallel runs) into --out.")
    src.add_argument("--dataset", choices=sorted(DATASETS), help="A named dataset (manifest in examples/).")
    src.add_argument("--manifest", type=Path, help="Any hgc manifest.")
    p.add_argument("--protocol", choices=PROTOCOLS, help="Required unless --combine.")
    p.add_argument("--genes", default=None, help="Gene panel (default for a dataset: its panel for the protocol).")
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--seeds", default=None, help=f"Comma-separated (default: {FULL_SEEDS}; quick: {QUICK_SEEDS}).")
    p.add_argument("--epochs", type=int, default=None, help=f"Default 200 (quick: {QUICK_EPOCHS}).")
    p.add_argument("--patience", type=int, default=None,
                   help="Early-stopping patience in epochs (0: none; default: the preset's).")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="Model and training choices (hgc.train.presets); a non-default preset names the record.")
    p.add_argument("--quick", action="store_true", help="One seed, few epochs: a smoke run, not figures to quote.")
    p.add_argument("--ablation", choices=sorted(ABLATIONS), default=None,
                   help="Train the model with one part taken out (features and graphs are reused from the "
                        "full run's folder when it has them).")
    p.add_argument("--backend", default="auto", choices=["auto", "dgl", "pyg"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 on a CPU shared with other jobs).")
    p.add_argument("--data-root", type=Path, default=None, help="Default: $HGC_DATA, else ../shared/data.")
    p.add_argument("--work-dir", type=Path, default=None, help="Pipeline folder (default: runs/bench/<name>).")
    p.add_argument("--name", default=None, help="Result name (default: accuracy-<dataset>-<protocol>-<encoder>).")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: bench/results/<name>.json).")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.combine:
        records = [{**json.loads(f.read_text()), "_source": f.name} for f in a.combine]
        if not a.out:
            p.error("--combine needs --out")
        record = combine_records(records)
        a.out.write_text(json.dumps(record, indent=2) + "\n")
        print(accuracy_markdown({**record, "_file": a.out.name}))
        return
    if not a.protocol:
        p.error("--protocol is required")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.dataset:
        ds = DATASETS[a.dataset]
        manifest, cohort, dataset = REPO / ds.manifest, ds.cohort, a.dataset
        ds_genes = ds.panels[a.protocol]
        genes = a.genes or ds_genes
        if not manifest.is_file():
            p.error(f"dataset {a.dataset}: manifest {manifest} is not in this checkout")
    else:
        manifest, cohort, dataset = a.manifest, None, a.manifest.stem
        if not a.genes:
            p.error("--genes is required with --manifest")
        genes = ds_genes = a.genes
    data_root = a.data_root or shared_data_root()
    quick = a.quick
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(QUICK_SEEDS if quick else FULL_SEEDS)
    epochs = a.epochs or (QUICK_EPOCHS if quick else 200)
    base = f"accuracy-{dataset}-{a.protocol}-{a.encoder}" + (f"-{genes}" if genes != ds_genes else "")
    name = a.name or base + (f"-{a.preset}" if a.preset != DEFAULT_PRESET else "") + (
        f"-{a.ablation}" if a.ablation else "") + ("-quick" if quick else "")
    work = a.work_dir or REPO / "runs" / "bench" / name
    out = a.out or HERE / "results" / f"{name}.json"
    if a.ablation or a.preset != DEFAULT_PRESET:
        reuse_inputs(REPO / "runs" / "bench" / base, work)

    patience = "preset" if a.patience is None else (a.patience or None)
    record = run(manifest, a.protocol, genes, a.encoder, seeds, work, epochs=epochs,
                 patience=patience, mode="quick" if quick else "full", dataset=dataset, cohort=cohort,
                 backend=a.backend, device=a.device, data_root=data_root, ablation=a.ablation, preset=a.preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    record["_file"] = out.name
    md = accuracy_markdown(record)
    (work / f"{name}.md").write_text(md)  # bench/results/ keeps JSON only; report.py renders the README
    print(md)


if __name__ == "__main__":
    main()
