"""``hgc embed`` and ``hgc patches``: spot image embeddings and optional patch export."""
from __future__ import annotations

from pathlib import Path

import click

from ..embed.extract import BATCH_SIZE
from ..embed.patches import TTA_VIEWS, PatchViews
from ..embed.registry import DEFAULT_ENCODER, ENCODERS
from . import data_root_option, device_option

#: The working-resolution option, shared by every command that embeds a training manifest.
batch_size_option = click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
                                 help="Patches per forward pass of the encoder.")
patch_mpp_option = click.option(
    "--patch-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Working resolution in µm/px: patches of sharper slides are first downsampled to it. Set it to "
         "the coarsest slide you will predict (e.g. 2 for slides scanned at 5x), so the model learns from "
         "patches no sharper than those it will see (default: each slide's own).",
)


def _multiples(ctx, param, value: str | None) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",")) if value else ()
    except ValueError:
        raise click.BadParameter(f"expected comma-separated multiples of the patch width, e.g. 2,4; got {value!r}")


def patch_views_options(f):
    """``--context`` and ``--tta`` (:class:`~hgc.embed.patches.PatchViews`), for every command that embeds."""
    f = click.option(
        "--tta", type=click.Choice([str(n) for n in TTA_VIEWS]), default="1", show_default=True,
        help="Test-time augmentation: each patch's embedding is the mean over its 4 rotations, or 8 with their "
             "mirror images (that many times the embedding cost).",
    )(f)
    return click.option(
        "--context", callback=_multiples, default=None, metavar="MULTIPLES",
        help="Wider fields of view around each spot, as multiples of the patch width (e.g. 2,4): each is "
             "embedded too and its features follow the spot's own (one more embedding cost each).",
    )(f)


def patch_views(context: tuple[float, ...], tta: str) -> PatchViews:
    return PatchViews(context, int(tta))


def _patch_options(f):
    f = patch_mpp_option(f)
    f = click.option(
        "--patch-native-px",
        type=click.IntRange(min=1),
        default=None,
        help="Patch width in full-resolution image pixels instead of µm (ignores the slide's resolution).",
    )(f)
    return click.option(
        "--patch-um",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Patch width in µm (default: the encoder's input size at 0.5 µm/px, e.g. 112 µm for 224 px).",
    )(f)


@click.command("embed")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--encoder", default=DEFAULT_ENCODER, show_default=True, help=f"Encoder name: {', '.join(ENCODERS)}, "
              "or timm:<model> with --weights (-stages: the intermediate stages pooled beside the final features); "
              "several names joined by + embed with each and keep their features side by side.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Embedding HDF5 file to create or update.")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Local weights file (state dict or .safetensors) instead of the default source.")
@device_option()
@batch_size_option
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers cutting patches (default: 0 on CPU, spare cores up to 8 on GPU).")
@_patch_options
@patch_views_options
@data_root_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def embed_command(manifest, encoder, out, weights, device, batch_size, workers, patch_um, patch_native_px,
                  patch_mpp, context, tta, data_root, no_progress) -> None:
    """Embed every spot's H&E patch for each slide of MANIFEST into OUT (HDF5, one group per slide).

    Rerunning skips slides already embedded with the same encoder, weights and patch settings and
    completes an interrupted run. UNI/UNI2-h weights are gated on the Hugging Face hub: set HF_TOKEN
    (or log in with `hf auth login`) after requesting access, or pass --weights.
    """
    from ..embed import embed_manifest

    path = embed_manifest(
        manifest, encoder, out, weights=weights, device=device, batch_size=batch_size, workers=workers,
        patch_um=patch_um, patch_native_px=patch_native_px, patch_mpp=patch_mpp, views=patch_views(context, tta),
        progress=not no_progress, data_root=data_root,
    )
    click.echo(f"embeddings: {path}")


@click.command("patches")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder receiving one <slide>.h5 per slide.")
@click.option("--px", type=click.IntRange(min=8), default=224, show_default=True, help="Patch size in pixels.")
@_patch_options
@data_root_option
def patches_command(manifest, out_dir, px, patch_um, patch_native_px, patch_mpp, data_root) -> None:
    """Export every spot's patch to OUT/<slide>.h5 (uint8 `img`, `barcode`, `coords`; HEST layout).

    Optional: `hgc embed` cuts patches itself and does not need these files.
    """
    from .._outputs import check_writable, safe_name
    from .._progress import progress
    from ..data.manifest import read_manifest
    from ..embed import PatchSpec, export_patches

    m = read_manifest(manifest, data_root)
    spec = PatchSpec(out_px=px, um=patch_um, native_px=patch_native_px, mpp=patch_mpp)
    check_writable(Path(out_dir) / "probe")
    for slide_id in progress(m.slide_ids, desc="slides", unit="slide"):
        export_patches(m.load(slide_id, expression=False), spec, Path(out_dir) / f"{safe_name(slide_id)}.h5")
    click.echo(f"patches: {out_dir} ({len(m.slide_ids)} slides)")


def register(main: click.Group) -> None:
    main.add_command(embed_command)
    main.add_command(patches_command)
