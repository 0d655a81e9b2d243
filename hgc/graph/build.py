"""Build SpaHGC's heterogeneous graphs: a target slide joined to a reference bank.

A fold (:class:`BankGraphs`) is the bank of its training slides with its slides as targets; a
trained model's bank takes new slides as targets (:func:`target_graph`). Per fold, in this order,
using the fold's training slides only for anything fitted:

1. the gene panel (:func:`hgc.data.genes.resolve_panel`) and the expression normaliser;
2. for every target (each training slide, then each test slide) its reference pool, from the one
   function that decides pools, :func:`reference_pool`, which raises on any leakage;
3. edges (relation names from :data:`hgc.graph.record.RELATIONS`):

   - ``near`` (spot -> spot): ``grid`` = legacy-ST 8-neighbourhood on the array grid, keeping
     the ``near_max`` (5) nearest by pixel distance; ``hex`` = Visium ring (row, col +- 2),
     (row +- 1, col +- 1); ``radius`` = all spots within ``near_radius_um`` (default 1.5 x the
     platform's spot pitch). ``auto`` picks grid / hex by platform when array coordinates
     exist, else radius. Weight 1.
   - ``refer`` (ref -> spot): each target spot's ``k_refer`` (7) nearest references by image
     embedding (``metric``, L1 by default), one batched search over the whole pool.
   - ``close`` (ref -> ref): each reference's ``k_close`` (3) nearest other references of its
     pool on [embedding, normalised expression]. Both blocks are z-scored per column over the
     fold's training spots, then each block is divided by its mean row norm in the search
     metric, so neither the 1,280-d embedding nor the 250-gene expression dominates the
     distance by its size. One search per fold serves every pool (see :func:`close_edges`).

   ``refer`` / ``close`` weights are similarities: cosine itself, or ``exp(-d / median d)`` over
   the relation's edges of that graph for distances (scale-free, in (0, 1]).

The result keeps each slide's embedding once and each fold's normalised expression once per
slide; a fold's bank and its :class:`SlideGraph` records are assembled on demand (by
:func:`joined_graph`, see :mod:`hgc.graph.store`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data.genes import check_panel_overlap, panel_coverage, resolve_panel
from ..data.normalize import make_normaliser
from ..data.slide import Slide
from ..data.splits import PROTOCOLS, Fold, isolates_patients, make_folds, validation_slides
from ..errors import InputError
from .bank import ReferenceBank
from .edges import close_edges, close_features, near_edges, refer_edges, self_refer_edges
from .fold import BANK, BankGraphs, FoldInfo, GraphConfig, GraphSet, Pool, SlideData, TargetEdges, joined_graph
from .record import SlideGraph
from .store import write_graphs

log = logging.getLogger(__name__)


def reference_pool(
    target: str,
    role: str,
    fold: Fold,
    patients: Mapping[str, str],
    protocol: str,
    exclude_same_patient: bool | None = None,
) -> list[str]:
    """Reference slides of ``target`` in ``fold``: the only place pools are decided.

    Test targets get every training slide; training targets the other training slides (minus
    their own patient's, see :attr:`GraphConfig.exclude_same_patient`). Raises
    :class:`InputError` if the pool would contain the target, a test slide, a slide outside the
    fold's training set, or (patient-kfold) any slide of a test patient. An empty list means a
    training target has no possible reference.
    """
    if role not in ("train", "test"):
        raise InputError(f"role must be 'train' or 'test', got '{role}'")
    members = fold.train if role == "train" else fold.test
    if target not in members:
        raise InputError(f"slide '{target}' is not a {role} slide of fold '{fold.name}'")
    if role == "test":
        pool = list(fold.train)
    else:
        pool = [s for s in fold.train if s != target]
        same = [s for s in pool if patients[s] == patients[target]]
        exclude = exclude_same_patient
        if exclude is None:
            exclude = isolates_patients(protocol) and len(same) < len(pool)
            if isolates_patients(protocol) and same and not exclude:
                log.warning("fold %s: training target %s keeps references of its own patient %s "
                            "(no other patient among the training slides)", fold.name, target, patients[target])
        if exclude:
            pool = [s for s in pool if s not in same]
    test_patients = {patients[s] for s in fold.test}
    leaks = sorted({s for s in pool if s in fold.test or s == target or s not in fold.train})
    if isolates_patients(protocol):
        leaks += sorted({s for s in pool if patients[s] in test_patients} - set(leaks))
    if leaks:
        raise InputError(
            f"reference leakage in fold '{fold.name}': target '{target}' ({role}) would use slides "
            f"{leaks} as references, which are test slides, the target itself, not training slides "
            f"or (patient-kfold) from a test patient {sorted(test_patients)}"
        )
    return pool


def check_new_target(slide: str, patient: str, bank: ReferenceBank) -> None:
    """Refuse to predict a slide from a bank that holds it (its own expression would be retrieved);
    a slide of a patient who has other slides in the bank is allowed, with a warning."""
    if slide in bank.slides:
        raise InputError(f"slide '{slide}' is one of the model's reference slides ({', '.join(bank.slides)}): "
                         "predicting it would retrieve its own expression; use a model trained without it")
    if patient in bank.patients:
        log.warning("slide %s: patient %s has other slides in the model's reference bank (a slide-level, "
                    "not a patient-level, prediction)", slide, patient)


def target_graph(slide: Slide, embeddings: np.ndarray, bank: ReferenceBank, config: GraphConfig, fold: str,
                 expression: np.ndarray | None = None) -> SlideGraph:
    """The graph of a new slide against a saved bank, by the rules that built the bank's own graphs:
    ``near`` edges among its spots, ``refer`` edges from the bank's spots, the bank's ``close`` edges.
    It equals the test graph of a cross-validation fold whose training slides are the bank's.

    Parameters
    ----------
    slide : Slide
        The new slide (spots and image; counts optional).
    embeddings : (n_spot, d) array
        Its spots' embeddings, rows in ``slide.barcodes`` order, made like the bank's.
    bank : ReferenceBank
        The model's references; ``config`` the graph settings the model was trained with.
    fold : str
        A name for messages; ``expression`` the slide's normalised expression when known.

    Returns
    -------
    SlideGraph
        ``n_spot`` spots and the bank's ``n_ref`` references, every relation of the table.
    """
    check_new_target(slide.id, slide.patient, bank)
    data = _slide_data(slide, embeddings)
    if data.x.shape[1] != bank.x.shape[1]:
        raise InputError(f"slide {slide.id}: its embeddings have {data.x.shape[1]} features, the model's reference "
                         f"bank {bank.x.shape[1]}; embed it with the model's encoder")
    near, near_w = near_edges(slide, config)
    refer, refer_w = refer_edges(data.x, bank.x, config)
    return joined_graph(data, bank, slice(None), fold, "test", {"near": near, "refer": refer, **bank.edges},
                        {"near": near_w, "refer": refer_w, **bank.edge_weight}, expression)


# --- edges -------------------------------------------------------------------------------------

def align_embeddings(slide: Slide, barcodes: np.ndarray, emb: np.ndarray, source: str) -> np.ndarray:
    """Embeddings reordered to ``slide.barcodes``; any barcode mismatch is an InputError."""
    import pandas as pd

    barcodes = np.asarray(barcodes).astype(str)
    if emb.ndim != 2 or emb.shape[0] != barcodes.shape[0]:
        raise InputError(f"slide {slide.id}: {source} holds {emb.shape} embeddings for {len(barcodes)} barcodes")
    pos = pd.Index(barcodes).get_indexer(slide.barcodes.astype(str)) if pd.Index(barcodes).is_unique else None
    if pos is None or len(barcodes) != slide.n_spots or (pos < 0).any():
        missing = [] if pos is None else list(slide.barcodes[pos < 0][:5])
        raise InputError(
            f"slide {slide.id}: the barcodes in {source} ({len(barcodes)}) do not match the manifest's "
            f"{slide.n_spots} spots{f'; missing e.g. {missing}' if missing else ''}; "
            "re-run `hgc embed` on this manifest"
        )
    return np.ascontiguousarray(emb[pos], dtype=np.float32)


def load_embeddings(path: str | Path, slides: Sequence[Slide]) -> dict[str, np.ndarray]:
    """Embeddings of ``slides`` from an embedding HDF5 (``hgc embed``), in each slide's spot order."""
    from ..embed import read_embeddings

    return {s.id: align_embeddings(s, *read_embeddings(path, s.id), str(path)) for s in slides}


def build_graphs(
    slides: Mapping[str, Slide],
    embeddings: Mapping[str, np.ndarray],
    folds: Sequence[Fold],
    protocol: str,
    config: GraphConfig,
    data_root: str | Path | None = None,
    manifest: str = "",
    encoder: Mapping[str, object] | None = None,
) -> GraphSet:
    """Graphs of every target of every fold. ``embeddings[s]`` rows follow ``slides[s].barcodes``;
    ``encoder`` records what made them (:func:`encoder_of`), so a trained model can embed new slides alike."""
    from .._progress import progress

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol '{protocol}'; expected one of {list(PROTOCOLS)}")
    used = list(dict.fromkeys(s for f in folds for s in (*f.train, *f.test)))
    unknown = [s for s in used if s not in slides]
    if unknown:
        raise InputError(f"folds name slides that were not loaded: {unknown}")
    absent = [s for s in used if s not in embeddings]
    if absent:
        raise InputError(f"no embeddings for slides {absent}")
    data = {s: _slide_data(slides[s], embeddings[s]) for s in used}
    dims = {s: d.x.shape[1] for s, d in data.items()}
    if len(set(dims.values())) > 1:
        raise InputError(f"embeddings have different feature sizes across slides: {dims}")
    patients = {s: slides[s].patient for s in used}
    near = {s: near_edges(slides[s], config) for s in used}
    encoder = dict(encoder or {})
    out = [_build_fold(fold, slides, data, near, patients, protocol, config, data_root, manifest, encoder)
           for fold in progress(folds, desc="folds", unit="fold", leave=False)]
    return GraphSet(config, protocol, data, out, encoder)


#: Embedding attributes that say how a slide was embedded; a model predicts new slides only from
#: embeddings made the same way (the patch width is patch_um, or patch_box_px in native-pixel mode).
ENCODER_KEYS = ("encoder", "weights_sha256", "patch_mode", "patch_um", "patch_box_px", "patch_px", "patch_mpp", "patch_context",
                "patch_tta", "resample")


def encoder_of(attrs: Mapping[str, Mapping[str, object]], slides: Sequence[str], source: str) -> dict[str, object]:
    """The encoder settings shared by ``slides`` in an embedding file's attributes (see ``read_attrs``).

    Slides embedded with different encoders, weights or patch sizes cannot share one reference
    bank: that is an InputError. The patch width is compared in the unit it was asked in: µm, or
    full-resolution pixels for native-pixel patches (whose width in µm differs by slide).
    """
    from ..embed.store import attr_value as value

    seen: dict[str, dict[str, object]] = {}
    for s in slides:
        a = attrs[s]
        native = value(a.get("patch_mode")) == "native-px"
        keys = [k for k in ENCODER_KEYS if k in a and k != ("patch_um" if native else "patch_box_px")]
        seen[s] = {k: value(a[k]) for k in keys}
    distinct = {json.dumps(v, sort_keys=True) for v in seen.values()}
    if len(distinct) > 1:
        first, other = slides[0], next(s for s in slides if seen[s] != seen[slides[0]])
        raise InputError(f"{source}: slides were embedded differently ({first}: {seen[first]}; {other}: "
                         f"{seen[other]}); embed all of them with one encoder and patch size")
    return next(iter(seen.values()), {})


def _slide_data(slide: Slide, emb: np.ndarray) -> SlideData:
    emb = np.ascontiguousarray(emb, np.float32)
    if emb.ndim != 2 or emb.shape[0] != slide.n_spots:
        raise InputError(f"slide {slide.id}: embeddings of shape {emb.shape} for {slide.n_spots} spots")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise InputError(f"slide {slide.id}: embeddings of {bad.size} spots contain NaN or infinity "
                         f"(e.g. {list(slide.barcodes[bad[:5]])}); re-run `hgc embed`")
    image = slide.image
    return SlideData(slide.id, slide.patient, emb, np.asarray(slide.barcodes, dtype=object),
                     np.asarray(slide.coords, np.float64), str(image.path.resolve()) if image else "",
                     float(image.scale) if image else 1.0, slide.platform, float(slide.microns_per_pixel))


def _build_fold(fold, slides, data, near, patients, protocol, config, data_root, manifest, encoder) -> BankGraphs:
    train = [slides[s] for s in fold.train]
    for s in train:
        s.require_expression(f"training slide of fold '{fold.name}'")
    panel = resolve_panel(config.genes, data_root, train)
    genes = list(panel.genes)
    normaliser = make_normaliser(config.normalize).fit(train, genes)
    members = [*fold.train, *fold.test]
    check_panel_overlap(panel, [slides[s] for s in members])
    info = FoldInfo(
        name=fold.name, protocol=protocol, train=list(fold.train),
        val=validation_slides(fold, patients, config.n_val, config.seed), test=list(fold.test),
        genes=genes, panel=panel.name, normaliser=normaliser.to_dict(),
        missing_genes=panel_coverage(panel, [slides[s] for s in members]), manifest=manifest,
    )
    expression = {s: normaliser.transform(slides[s], genes) for s in members if slides[s].has_expression}
    chosen = []
    for role, names in (("train", fold.train), ("test", fold.test)):
        for t in names:
            refs = reference_pool(t, role, fold, patients, protocol, config.exclude_same_patient)
            if not refs and fold.train == [t]:  # the only training slide still trains, on its own spots
                refs = [t]
                info.self_referenced.append(t)
                log.warning("fold %s: %s is the only training slide; its training graph references its own "
                            "spots, never a spot itself or its spatial neighbours", fold.name, t)
            if refs:
                chosen.append((t, role, tuple(refs)))
            else:
                info.skipped[t] = "every other training slide is of its own patient (exclude_same_patient)"
                log.warning("fold %s: training slide %s has no reference slide; no training graph for it", fold.name, t)
    # the bank (every training slide) is the test targets' references; a training target's pool is
    # some of its slides, and identical pools are stored once
    whole = tuple(fold.train)
    keys = {pool: f"pool{i}" for i, pool in enumerate(dict.fromkeys(p for _, _, p in chosen if p != whole))}
    keys[whole] = BANK
    feats = close_features(np.concatenate([data[s].x for s in fold.train]),
                           np.concatenate([expression[s] for s in fold.train]), config.metric)
    owner = np.concatenate([np.full(len(data[s].x), s, dtype=object) for s in fold.train])
    pools = {key: Pool(list(pool), {"close": close}, {"close": weight})
             for (pool, key), (close, weight) in zip(keys.items(), close_edges(feats, owner, list(keys), config))}
    whole_pool = pools.pop(BANK)
    targets = []
    for t, role, pool in chosen:
        if pool == (t,):
            refer, refer_w = self_refer_edges(data[t].x, near[t][0], config)
        else:
            refer, refer_w = refer_edges(data[t].x, np.concatenate([data[s].x for s in pool]), config)
        targets.append(TargetEdges(t, role, keys[pool], {"near": near[t][0], "refer": refer},
                                   {"near": near[t][1], "refer": refer_w}))
    return BankGraphs(info, data, targets, config, whole_pool, expression, pools, encoder)


def build_from_manifest(
    manifest: str | Path,
    embeddings: str | Path,
    protocol: str,
    out: str | Path,
    config: GraphConfig | None = None,
    split_file: str | Path | None = None,
    data_root: str | Path | None = None,
) -> Path:
    """Read ``manifest`` and ``embeddings``, build every fold's graphs and write them to ``out``.

    Everything is checked and built before the store is written; on any error nothing is written.
    """
    from .._outputs import check_writable
    from ..data import data_root as resolve_root
    from ..data import read_manifest
    from ..embed import read_attrs

    config = config or GraphConfig()
    check_writable(out)
    m = read_manifest(manifest, data_root)
    folds = make_folds(m.patients, protocol, split_file)
    used = list(dict.fromkeys(s for f in folds for s in (*f.train, *f.test)))
    stored = read_attrs(embeddings)
    absent = [s for s in used if s not in stored]  # fail before reading any slide
    if absent:
        raise InputError(f"embedding file {embeddings} has no complete embeddings for slides {absent}; "
                         f"run `hgc embed {manifest}` first")
    encoder = encoder_of(stored, used, f"embedding file {embeddings}")
    slides = {s: m.load(s) for s in used}
    emb = load_embeddings(embeddings, list(slides.values()))
    graphs = build_graphs(slides, emb, folds, protocol, config, resolve_root(data_root), str(m.path), encoder)
    return write_graphs(graphs, out)

