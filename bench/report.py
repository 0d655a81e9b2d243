"""Tables from benchmark JSON: the generated part of bench/README.md, and each run's markdown.

Numbers in bench/README.md come only from the JSON in bench/results/ (written by real runs of
bench/accuracy.py and bench/throughput.py); this script renders them, so no figure is typed by
hand. ``python bench/report.py`` rewrites the part of the README between the markers;
``--check`` fails when the README is not what the committed JSON renders to.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import short  # noqa: E402

RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN = "<!-- BEGIN GENERATED: python bench/report.py (do not edit by hand) -->"
END = "<!-- END GENERATED -->"

METRICS: tuple[tuple[str, str], ...] = (
    ("pcc_all", "PCC-ALL"), ("pcc_heg", "PCC-HEG"), ("pcc_hvg", "PCC-HVG"), ("mse", "MSE"), ("mae", "MAE"),
)
#: The accuracy runs the README must show (dataset, protocol); missing ones are marked as such.
EXPECTED_ACCURACY: tuple[tuple[str, str], ...] = (("her2st", "slide-loso"), ("her2st", "patient-kfold"))
#: What an ablation record shares with the full run it is shown beside (which ran its seeds too),
#: at the top level and in its training settings.
ABLATION_MATCH = ("dataset", "protocol", "genes", "encoder", "backend")
ABLATION_MATCH_FIT = ("epochs", "patience", "lr", "weight_decay", "preset")
GPU_COMMAND = "bash bench/gpu.sh OUTDIR"
#: Records of hgc's own defaults name no preset, or this one (hgc.train.presets.DEFAULT_PRESET).
DEFAULT_PRESET = "hgc"


def fmt(x: Any, digits: int = 3) -> str:
    """Floats with ``digits`` decimals, or as whole numbers with separators from 100 up (rates)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def commit(c: str | None) -> str:
    """A commit id shortened to 10 characters, keeping a ``+dirty`` mark."""
    if not c:
        return "unknown"
    head, _, mark = c.partition("+")
    return head[:10] + (f"+{mark}" if mark else "")


def commits(r: dict[str, Any]) -> str:
    """The commit of a record, or of each of its seeds when combined runs were made at several."""
    made = {}
    for run in r.get("runs", []):
        made.setdefault(run.get("git_commit") or r["git_commit"], []).append(run["seed"])
    if len(made) < 2:
        return f"commit {commit(r['git_commit'])}"
    return "commits " + ", ".join(f"{commit(c)} (seed{'s' * (len(s) > 1)} {', '.join(map(str, s))})" for c, s in made.items())


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


#: Keys every record of a kind carries (what the tables and readers rely on).
REQUIRED: dict[str, tuple[str, ...]] = {
    "accuracy": ("schema", "mode", "dataset", "protocol", "genes", "n_genes", "encoder", "backend", "seeds", "fit",
                 "space", "n_slides", "hgc_version", "git_commit", "machine", "wall_s", "methods", "published"),
    "throughput": ("schema", "set", "device", "machine", "wall_s", "stages"),
    "predict-wsi": ("schema", "encoder", "machine", "slide", "n_spots", "n_ref", "stages", "wall_s", "peak_mib"),
    "virtual-spots": ("slide", "method", "n_real", "n_virtual", "median_distance_px", "space", "scores", "machine"),
    "variant-ablation": ("schema", "dataset", "encoder", "protocol", "n_genes", "metric", "variants", "rows", "backend",
                 "epochs", "machine"),
    "resolution-robustness": ("schema", "dataset", "encoder", "genes", "factor", "seeds", "epochs", "test_slide",
                              "validation_slide", "train_slides", "low_resolution_mpp", "settings", "rows", "summary",
                              "machine"),
}
RESOLUTION_ROW_KEYS = ("setting", "role", "seed", "method", "slide", "resolution", "pcc_all", "pcc_heg")
ABLATION_ROW_KEYS = ("variant", "seed", "fold", "val_slides", "val_pcc", "best_epoch", "epochs_run")
#: Stages of a predict-wsi record, in order, with what each one does.
PREDICT_STAGES = (("read_mask", "open, tissue mask, virtual spots"), ("embed", "patches + embedding"),
                  ("graph", "near + refer edges"), ("model", "forward pass"), ("write", "prediction .h5ad"))
MACHINE_KEYS = ("cpu", "cores", "ram_gib", "gpu", "versions", "hgc_version", "git_commit", "timestamp")
METHOD_KEYS = ("mean", "std", "per_slide", "n")
TRAIN_ROW_KEYS = ("backend", "device", "n_spot", "n_ref", "status")
TRAIN_KEYS = ("n_edges", "train_step_s", "graph_steps_per_s", "train_spots_per_s", "peak_train_mib", "memory_kind")
INFER_KEYS = ("n_edges", "infer_s", "infer_spots_per_s", "peak_infer_mib", "memory_kind")
#: Keys a training-throughput row carries, by status.
TRAIN_STATUS_KEYS = {"ok": TRAIN_KEYS + INFER_KEYS, "train oom": INFER_KEYS}


def check_record(r: dict[str, Any]) -> list[str]:
    """Problems with a result record's schema (empty when valid): what every reader relies on."""
    kind = r.get("kind")
    if kind not in REQUIRED:
        return [f"unknown kind {kind!r}; expected one of {sorted(REQUIRED)}"]
    problems = [f"missing key {k!r}" for k in REQUIRED[kind] if k not in r]
    problems += [f"machine lacks {k!r}" for k in MACHINE_KEYS if k not in r.get("machine", {})]
    if kind == "accuracy":
        if not r.get("methods"):
            problems.append("no methods")
        for name, m in r.get("methods", {}).items():
            problems += [f"method {name} lacks {k!r}" for k in METHOD_KEYS if k not in m]
            for part in ("mean", "std"):
                problems += [f"method {name} {part} lacks {k}" for k, _ in METRICS if k not in m.get(part, {})]
            problems += [f"method {name} slide row lacks seed/slide" for row in m.get("per_slide", [])
                         if "seed" not in row or "slide" not in row][:1]
        problems += [f"published row {p} lacks method/pcc_all/note" for p in r.get("published", [])
                     if not {"method", "pcc_all", "note"} <= set(p)]
    elif kind == "variant-ablation":
        problems += [f"ablation row lacks {k!r}" for row in r.get("rows", [])[:1] for k in ABLATION_ROW_KEYS
                     if k not in row]
        problems += [f"row of unknown variant {row.get('variant')!r}" for row in r.get("rows", [])
                     if row.get("variant") not in r.get("variants", {})][:1]
    elif kind == "resolution-robustness":
        problems += [f"resolution row lacks {k!r}" for row in r.get("rows", [])[:1] for k in RESOLUTION_ROW_KEYS
                     if k not in row]
        seen: dict[tuple, set[str]] = {}
        for x in r.get("rows", []):
            seen.setdefault((x["setting"], x["role"], x["method"], x["seed"]), set()).add(x["resolution"])
        problems += [f"{k} lacks a full- or a low-resolution row" for k, v in seen.items() if v != {"full", "low"}][:1]
    elif kind == "virtual-spots":
        problems += [f"scores of {name} lack {k}" for name, sc in r.get("scores", {}).items()
                     for k in ("pcc_all", "pcc_heg", "pcc_hvg") if k not in sc]
    elif kind == "predict-wsi":
        problems += [f"stage {name} lacks seconds/peak_mib" for name, _ in PREDICT_STAGES
                     if not {"seconds", "peak_mib"} <= set(r.get("stages", {}).get(name, {}))]
    else:
        for name, stage in r.get("stages", {}).items():
            if "status" not in stage:
                problems.append(f"stage {name} has no status")
        train = r.get("stages", {}).get("train", {})
        for row in train.get("rows", []):
            need = TRAIN_ROW_KEYS + TRAIN_STATUS_KEYS.get(row.get("status"), ())
            problems += [f"train row {row.get('backend')}/{row.get('n_spot')} lacks {k!r}" for k in need if k not in row]
    return problems


def load(folder: Path = RESULTS) -> list[dict[str, Any]]:
    """Every result record in ``folder``, with its file name, sorted by name; invalid ones refused."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        problems = check_record(record)
        if problems:
            raise ValueError(f"{path} is not a valid result record: {'; '.join(problems)}")
        record["_file"] = path.name
        records.append(record)
    return records


# -- accuracy -------------------------------------------------------------------------------------
def accuracy_caption(r: dict[str, Any]) -> str:
    fit = r["fit"]
    preset = r.get("preset") or DEFAULT_PRESET
    model = "" if preset == DEFAULT_PRESET else f"model preset **`{preset}`** (row hgc), "
    return (
        f"**{r['dataset']}**, protocol **{r['protocol']}**, genes `{r['genes']}` ({r['n_genes']} genes), "
        f"encoder `{r['encoder']}`, {model}backend {r['backend']}, {r['mode']} mode: {fit['epochs']} epochs, "
        f"seeds {r['seeds']}; expression space {r['space']}; mean ± std over held-out slides x seeds "
        f"(column n; {r['n_slides']} held-out slides in all). hgc {r['hgc_version']}, "
        f"{commits(r)}, {short(r['machine'])}; {fmt(r['wall_s'] / 60, 1)} min. "
        f"Source: `bench/results/{r['_file']}`."
    )


def accuracy_markdown(r: dict[str, Any]) -> str:
    """Measured rows per method, then the published figures, labelled and never mixed in."""
    head = ["method", "source"] + [label for _, label in METRICS] + ["n", "constant genes"]
    rows = []
    for name, m in r["methods"].items():
        cells = [f"{fmt(m['mean'][k])} ± {fmt(m['std'][k])}" for k, _ in METRICS]
        const = [row["n_constant"] for row in m["per_slide"]]
        rows.append([f"**{name}**", "measured here"] + cells + [m["n"], f"{min(const)}–{max(const)} of {r['n_genes']}"])
    for p in r.get("published", []):
        rows.append([p["method"], f"published ({p['note']})", fmt(p["pcc_all"])] + ["—"] * (len(METRICS) + 1))
    return "\n".join([accuracy_caption(r), "", *table(head, rows)]) + "\n"


def preset_markdown(r: dict[str, Any], default: dict[str, Any]) -> str:
    """A preset's hgc beside hgc's default preset on the same graphs and seeds, per held-out slide
    (mean over seeds), with ridge of the default run for scale."""
    def per_slide(record: dict[str, Any], method: str) -> dict[str, tuple[float, float]]:
        rows = [x for x in record["methods"][method]["per_slide"] if x["seed"] in r["seeds"]]
        slides = dict.fromkeys(x["slide"] for x in rows)
        return {s: tuple(float(sum(x[k] for x in rows if x["slide"] == s) / sum(x["slide"] == s for x in rows))
                         for k in ("pcc_all", "pcc_heg")) for s in slides}

    mine, base, ridge = per_slide(r, "hgc"), per_slide(default, "hgc"), per_slide(default, "ridge")
    head = ["held-out slide", f"hgc `{r['preset']}`", f"hgc `{DEFAULT_PRESET}`", "ridge"]
    rows = [[s, *(" / ".join(fmt(v) for v in t[s]) for t in (mine, base, ridge))] for s in mine if s in base]
    caption = (f"The `{r['preset']}` preset beside hgc's default on the same embeddings, graphs, folds and seeds "
               f"{r['seeds']} (PCC-ALL / PCC-HEG per held-out slide, mean over seeds; `{r['_file']}` beside "
               f"`{default['_file']}`).")
    return "\n".join([caption, "", *table(head, rows)]) + "\n"


def summarise_rows(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and std over (slide, seed) rows, by the evaluator's own rule (NaN slides left out)."""
    from hgc.evaluate.metrics import SlideMetrics, summarise

    names = set(SlideMetrics.__dataclass_fields__)
    return summarise([SlideMetrics(**{k: v for k, v in r.items() if k in names}) for r in rows])


def ablation_markdown(full: dict[str, Any], ablations: list[dict[str, Any]]) -> str:
    """The model with one part taken out, beside the full model on the same inputs and seeds.

    Ablations may use fewer seeds than the full run; its row then covers those seeds only.
    """
    seeds = ablations[0]["seeds"]
    head = ["model", "PCC-ALL", "PCC-HEG", "PCC-HVG", "MSE", "MAE", "n", "source"]
    rows = []
    for label, r in [("full model", full)] + [(a["ablation"], a) for a in ablations]:
        per_slide = [row for row in r["methods"]["hgc"]["per_slide"] if row["seed"] in seeds]
        mean, std = summarise_rows(per_slide)
        rows.append([label] + [f"{fmt(mean[k])} ± {fmt(std[k])}" for k, _ in METRICS]
                    + [len(per_slide), f"`{r['_file']}`"])
    caption = (f"hgc with one part taken out or one option added (`bench/accuracy.py --ablation NAME`): "
               f"**{full['dataset']}**, "
               f"**{full['protocol']}**, genes `{full['genes']}`, encoder `{full['encoder']}`, seeds "
               f"{seeds}; mean ± std over held-out slides x seeds. `no-contrast`: no contrastive "
               f"loss; `no-masking`: no feature masking or edge dropping; `no-near` / `no-refer`: the graphs "
               f"without that relation; `no-masked-supervision`: masked views for the contrast only, the "
               f"supervised terms on the unmasked graph (as at inference); `full-rank-head`: the head's "
               f"output in every gene's direction, not in the span of the training expression's 10 leading "
               f"principal axes (hgc's default head); `ensemble-3`: three models per fold (successive seeds), "
               f"their mean predicted; `cosine`: graphs whose `refer` and `close` neighbours are found by "
               f"cosine similarity instead of L1 distance.")
    return "\n".join([caption, "", *table(head, rows)]) + "\n"


def variant_ablation_markdown(r: dict[str, Any]) -> str:
    """Validation-slide scores per variant (mean ± std over seeds and folds), beside hgc's default."""
    import statistics

    by: dict[str, list[dict[str, Any]]] = {}
    for row in r["rows"]:
        by.setdefault(row["variant"], []).append(row)
    reference = r.get("reference", "hgc")
    base = [x["val_pcc"] for x in by.get(reference, [])]
    ref = statistics.fmean(base) if base else float("nan")
    head = ["variant", "changes", "validation PCC-ALL", f"Δ vs {reference}", "best epoch", "epochs run", "runs"]
    rows = []
    for name, v in r["variants"].items():
        got = by.get(name)
        if not got:
            continue
        pcc = [x["val_pcc"] for x in got]
        sd = statistics.stdev(pcc) if len(pcc) > 1 else float("nan")
        given = {**v["options"].get("model", {}), **{k: x for k, x in v["options"].items() if k != "model"}}
        options = ", ".join(f"{k}={val}" for k, val in given.items())
        preset = v["preset"] if v["preset"] != reference or not options else ""
        changes = " + ".join(x for x in (preset, options) if x)
        rows.append([f"**{name}**" if name == v["preset"] and not v["options"] else name, f"`{changes}`",
                     f"{fmt(statistics.fmean(pcc))} ± {fmt(sd)}", fmt(statistics.fmean(pcc) - ref),
                     fmt(statistics.fmean(x["best_epoch"] for x in got), 0),
                     fmt(statistics.fmean(x["epochs_run"] for x in got), 0), len(got)])
    folds = sorted({(x["fold"], ",".join(x["val_slides"])) for x in r["rows"]})
    seeds = sorted({x["seed"] for x in r["rows"]})
    caption = (f"`bench/ablation.py`: **{r['dataset']}**, {r['protocol']}, folds "
               f"{', '.join(f'{f} (validation {v})' for f, v in folds)}, {r['n_genes']} genes, encoder "
               f"`{r['encoder']}`, backend {r['backend']}, up to {r['epochs']} epochs, seeds {seeds}. Score: "
               f"{r['metric']}; no test slide is read. Each row is `{reference}` with the published code's "
               f"choice (or another option) switched in, or a preset (whole or with one option); "
               f"{short(r['machine'])}. Source: `bench/results/{r['_file']}`.")
    if r.get("note"):
        caption += f" Note: {r['note']}."
    return "\n".join([caption, "", *table(head, rows)]) + "\n"


def resolution_markdown(r: dict[str, Any]) -> str:
    """PCC at full and low resolution, and their ratio, per setting, role and method."""
    order = {"validation": 0, "test": 1, "hgc": 0, "ridge": 1, "knn": 2, "native": 0, "coarse": 1}
    rows = [[f"{x['role']} ({x['slide']})", x["method"], f"`{x['setting']}`",
             fmt(x["pcc_all_full"]), fmt(x["pcc_all_low"]), f"**{x['pcc_all_ratio']:.2f}**",
             fmt(x["pcc_heg_full"]), fmt(x["pcc_heg_low"]), x["n_seeds"]]
            for x in sorted(r["summary"], key=lambda x: (order[x["role"]], order.get(x["method"], 9), order[x["setting"]]))]
    mpp = r["low_resolution_mpp"]
    caption = (f"`bench/lowres.py`: **{r['dataset']}**, genes `{r['genes']}`, encoder `{r['encoder']}`. A copy of "
               f"the test slide {r['test_slide']} and of the validation slide {r['validation_slide']}, downscaled "
               f"{r['factor']}x ({', '.join(f'{s}: {v:.2f} µm/px' for s, v in mpp.items())}; a PNG whose spots map by "
               f"`coord_scale`), is predicted beside the full-resolution slide by models trained on the full-resolution "
               f"sections {', '.join(r['train_slides']['test'])} (validation role: without "
               f"{r['validation_slide']}), up to {r['epochs']} epochs, seeds {r['seeds']} (mean over seeds). "
               f"`native`: every slide's patches at its own resolution (hgc's default); `coarse`: every patch first "
               f"brought down to {max(mpp.values()):.2f} µm/px (`--patch-mpp`). The choice is read on the validation "
               f"rows; {short(r['machine'])}. Source: `bench/results/{r['_file']}`.")
    head = ["role (slide)", "method", "setting", "PCC-ALL full", "PCC-ALL low", "low / full", "PCC-HEG full",
            "PCC-HEG low", "seeds"]
    return "\n".join([caption, "", *table(head, rows)]) + "\n"


# -- throughput -----------------------------------------------------------------------------------
TRAIN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("backend", "backend"), ("n_spot", "spots"), ("n_edges", "edges"), ("train_step_s", "train step (s)"),
    ("graph_steps_per_s", "graph-steps/s"), ("train_spots_per_s", "train spots/s"),
    ("infer_spots_per_s", "inference spots/s"), ("peak_train_mib", "peak train MiB"),
    ("peak_infer_mib", "peak inference MiB"), ("status", "status"),
)


EMBED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("encoder", "encoder"), ("batch_size", "batch"), ("dtype", "dtype"), ("device", "device"),
    ("patches_per_s", "patches/s"), ("status", "status"),
)
SYNTHETIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_spot", "spots per slide"), ("n_edges", "edges"), ("metric", "metric"), ("device", "device"),
    ("median_s", "seconds"), ("spots_per_s", "spots/s"), ("status", "status"),
)
E2E_COLUMNS: tuple[tuple[str, str], ...] = (
    ("encoder", "encoder"), ("batch_size", "batch"), ("device", "device"), ("workers", "workers"),
    ("spots", "spots"), ("end_to_end_patches_per_s", "end to end patches/s"),
    ("ceiling_patches_per_s", "forward-only patches/s"), ("fraction_of_ceiling", "fraction of ceiling"),
)


def rows_markdown(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """A table of scalar fields; ``columns`` (key, label) or every scalar key in first-seen order."""
    if columns is None:
        keys = list(dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, (dict, list))))
        columns = [(k, k) for k in keys]
    return table([label for _, label in columns], ([row.get(k) for k, _ in columns] for row in rows))


def _stage_rows(stage: dict[str, Any], key: str = "rows") -> list[dict[str, Any]] | None:
    value = stage.get(key)
    return value if isinstance(value, list) and value else None


def throughput_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    threads = r.get("torch_threads") or r["stages"].get("train", {}).get("config", {}).get("torch_threads")
    out = [
        f"{r['set'].upper()} set ({', '.join(r['stages'])}) on **{short(m)}**; numpy {m['versions'].get('numpy')}, "
        f"torch threads {fmt(threads)}, {m['cores']} CPU cores, "
        f"{m['ram_gib']} GiB RAM; hgc {m['hgc_version']}, commit {commit(m['git_commit'])}, {m['timestamp']}. "
        f"Medians over repeats after warm-up. Source: `bench/results/{r['_file']}`.",
    ]
    stages = r["stages"]
    sections = (
        ("Embedding: encoder forward pass alone (random weights; the ceiling), and the patch loader alone "
         "(kind `loader`: one core cutting, resampling and normalising patches, or cutting only as on a GPU)",
         "embedding", "rows", EMBED_COLUMNS),
        ("Embedding: `hgc embed` end to end (real her2st slides)", "embedding", "end_to_end", E2E_COLUMNS),
        ("Similarity search", "search", "search", None),
        ("Graph building, her2st folds", "search", "graph_build_her2st", None),
        ("Graph building, synthetic slides (one slide-LOSO fold of three slides of n spots, 1024-d "
         "features; the test target's pool holds 2n references)", "search", "graph_build_synthetic",
         SYNTHETIC_COLUMNS),
        ("Training and inference (synthetic graphs)", "train", "rows", TRAIN_COLUMNS),
    )
    for title, name, key, columns in sections:
        if name not in stages:
            continue
        stage = stages[name]
        out += ["", f"**{title}**", ""]
        rows = _stage_rows(stage, key)
        if rows is None:
            inner = stage.get(key) if isinstance(stage.get(key), dict) else {}
            if key not in stage and stage.get("status") == "ok":
                reason = "this record predates the measurement"
            else:
                reason = inner.get("status") or stage.get("error") or stage.get("status") or "stage not run"
            out.append(f"Not measured in this run ({reason}).")
            continue
        out += rows_markdown(rows, columns)
        if key == "rows" and "scaling" in stage:
            fits = [f"{b}: train time ~ edges^{fmt(s['train_exponent'], 2)} ({s['n_sizes']} sizes), inference ~ "
                    f"edges^{fmt(s['infer_exponent'], 2)} ({s.get('n_sizes_infer', s['n_sizes'])} sizes)"
                    for b, s in stage["scaling"].items()]
            out += ["", "Scaling exponents (log-log fit of time vs edges): " + "; ".join(fits) + "."]
    return "\n".join(out) + "\n"


# -- README ---------------------------------------------------------------------------------------
def ablation_of(a: dict[str, Any], full: dict[str, Any]) -> bool:
    """Whether ablation record ``a`` was run beside full run ``full`` (same inputs, settings, seeds)."""
    return (all(a[k] == full[k] for k in ABLATION_MATCH) and set(a["seeds"]) <= set(full["seeds"])
            and all(a["fit"].get(k) == full["fit"].get(k) for k in ABLATION_MATCH_FIT))


def with_ablations(r: dict[str, Any], ablated: list[dict[str, Any]], full: Sequence[dict[str, Any]] = ()
                   ) -> list[str]:
    """A full run's table, then the table of its ablations (same data, genes, encoder, seeds) if any,
    and for a non-default preset its comparison with the default-preset run of the same inputs."""
    same = [a for a in ablated if ablation_of(a, r)]
    tables = []
    for seeds in dict.fromkeys(tuple(a["seeds"]) for a in same):
        tables.append(ablation_markdown(r, [a for a in same if tuple(a["seeds"]) == seeds]))
    if (r.get("preset") or DEFAULT_PRESET) != DEFAULT_PRESET:
        default = [d for d in full if (d.get("preset") or DEFAULT_PRESET) == DEFAULT_PRESET
                   and all(d[k] == r[k] for k in ABLATION_MATCH) and set(r["seeds"]) <= set(d["seeds"])]
        tables += [preset_markdown(r, d) for d in default[:1]]
    return [accuracy_markdown(r)] + tables


def generated(records: list[dict[str, Any]]) -> str:
    acc = [r for r in records if r.get("kind") == "accuracy"]
    full = [r for r in acc if r.get("mode") == "full" and not r.get("ablation")]
    ablated = [r for r in acc if r.get("mode") == "full" and r.get("ablation")]
    quick = [r for r in acc if r.get("mode") == "quick"]
    thr = [r for r in records if r.get("kind") == "throughput"]
    out = ["## Accuracy", ""]
    for dataset, protocol in EXPECTED_ACCURACY:
        runs = [r for r in full if r["dataset"] == dataset and r["protocol"] == protocol]
        out += [f"### {dataset}, {protocol}", ""]
        if not runs:
            out += [f"Not yet measured: `python bench/accuracy.py --dataset {dataset} --protocol {protocol} "
                    f"--seeds 0,1,2`.", ""]
        for r in runs:
            out += with_ablations(r, ablated, full)
    others = [r for r in full if (r["dataset"], r["protocol"]) not in EXPECTED_ACCURACY]
    for r in others:
        out += [f"### {r['dataset']}, {r['protocol']}", ""] + with_ablations(r, ablated, full)
    orphans = [a for a in ablated if not any(ablation_of(a, r) for r in full)]
    if orphans:
        out += ["### Ablation runs without a matching full run (other model settings or hgc versions)", ""] + [
            accuracy_markdown(a) for a in orphans]
    variant_runs = [r for r in records if r.get("kind") == "variant-ablation"]
    if variant_runs:
        out += ["## Model and training choices, on validation slides", ""]
        out += [variant_ablation_markdown(r) for r in variant_runs]
    resolution = [r for r in records if r.get("kind") == "resolution-robustness"]
    if resolution:
        out += ["## Resolution robustness: a coarser scan of a slide", ""] + [resolution_markdown(r) for r in resolution]
    out += ["## Throughput", ""]
    for set_name in dict.fromkeys(["cpu", "gpu", *(r["set"] for r in thr)]):  # cpu and gpu always shown
        runs = [r for r in thr if r.get("set") == set_name]
        out += [f"### {set_name.upper()}", ""]
        if not runs:
            hint = (GPU_COMMAND if set_name == "gpu"
                    else "python bench/throughput.py --set cpu --out bench/results/throughput-cpu.json")
            out += [f"Not yet measured: `{hint}`.", ""]
        for r in runs:
            out += [throughput_markdown(r)]
    carried = [r for r in records if r.get("kind") == "virtual-spots"]
    if carried:
        out += ["## A slide predicted from its image alone (`bench/carry_virtual.py`)", ""]
    for r in carried:
        out += [f"`{r['_file']}`: slide {r['slide']}, method {r['method']}, {r['n_genes']} genes ({r['space']}); "
                f"{r['n_virtual']} virtual spots on the tissue found in its image, {r['n_real']} real spots; each real "
                f"spot takes the prediction of its nearest virtual spot (median distance "
                f"{fmt(r['median_distance_px'], 0)} px); {short(r['machine'])}.", ""]
        rows = [[name, *(fmt(sc[k]) for k in ("pcc_all", "pcc_heg", "pcc_hvg"))] for name, sc in r["scores"].items()]
        out += table(["predicted on", "PCC-ALL", "PCC-HEG", "PCC-HVG"], rows) + [""]
    wsi = [r for r in records if r.get("kind") == "predict-wsi"]
    out += ["## Predicting a whole-slide image with no spots (`bench/predict_wsi.py`)", ""]
    if not wsi:
        out += ["Not yet measured: `python bench/predict_wsi.py --out bench/results/predict-wsi-cpu.json`.", ""]
    for r in wsi:
        sl = r["slide"]
        out += [f"`{r['_file']}`: a synthetic {fmt(sl['width_mm'], 0)} x {fmt(sl['height_mm'], 0)} mm slide at "
                f"{sl['mpp']} µm/px ({sl['width_px']:,} x {sl['height_px']:,} px, {sl['levels']} pyramid levels of "
                f"JPEG tiles, {fmt(sl['file_mib'], 0)} MiB), {fmt(sl['tissue_mm2'], 0)} mm² of tissue, "
                f"{r['n_spots']:,} virtual Visium spots against a bank of {r['n_ref']:,} references; encoder "
                f"`{r['encoder']}`, {r['torch_threads']} torch threads; {short(r['machine'])}. Peak resident memory "
                f"of the whole prediction: **{fmt(r['peak_mib'] / 1024, 2)} GiB**.", ""]
        rows = [[label, fmt(r["stages"][name]["seconds"], 1), fmt(r["stages"][name]["peak_mib"], 0)]
                for name, label in PREDICT_STAGES]
        rows.append(["total", fmt(r["wall_s"], 1), fmt(r["peak_mib"], 0)])
        out += table(["stage", "seconds", "peak MiB (so far)"], rows) + [""]
    if quick:
        out += ["## Smoke runs (`--quick`: CI check that the harness runs, not figures to quote)", ""]
        head = ["file", "dataset", "protocol", "epochs", "hgc PCC-ALL", "minutes", "machine"]
        rows = [[f"`{r['_file']}`", r["dataset"], r["protocol"], r["fit"]["epochs"],
                 fmt(r["methods"].get("hgc", {}).get("mean", {}).get("pcc_all")), fmt(r["wall_s"] / 60, 1),
                 short(r["machine"])] for r in quick]
        out += table(head, rows) + [""]
    return "\n".join(out).rstrip() + "\n"


def render_readme(text: str, records: list[dict[str, Any]]) -> str:
    """``text`` with the part between the markers replaced (appended when the markers are absent)."""
    block = f"{BEGIN}\n\n{generated(records)}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="Exit 1 if the README is not up to date.")
    a = p.parse_args(argv)
    current = a.readme.read_text() if a.readme.is_file() else ""
    new = render_readme(current, load(a.results))
    if a.check:
        if new != current:
            print(f"{a.readme} is out of date with {a.results}; run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    a.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
