"""Throughput of `hgc embed` end to end against the encoder's bare forward pass (the ceiling).

Usage::

    HGC_DATA=../shared/data python bench/embed_throughput.py examples/her2st.tsv --out bench_embed.json
    python bench/embed_throughput.py examples/her2st.tsv --slides B4,C2 --workers 0 --repeats 3

End to end = everything `hgc embed` does for a fresh output file: read each slide, decode its
image, cut and resample patches, run the model, write the HDF5 file. Ceiling = the same model on
random tensors of the same batch size, same device, same process. Both: one warm-up, then the
median of ``repeats`` timed runs. The ceiling is timed before and after the end-to-end runs (the
median of all those runs is reported) so load from other processes skews both alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _ceiling(model, px: int, batch_size: int, device, batches: int, repeats: int) -> list[float]:
    import torch

    from hgc.embed.extract import _precision

    autocast, _ = _precision(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch_size, 3, px, px, generator=torch.Generator().manual_seed(0))
    rates = []
    with torch.inference_mode(), autocast:
        model(x.to(device).contiguous(memory_format=fmt))  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(batches):
                model(x.to(device, non_blocking=True).contiguous(memory_format=fmt)).float().cpu()
            rates.append(batches * batch_size / (time.perf_counter() - t0))
    return rates


def loader(manifest: str | Path, *, encoder: str = "effnet-lite0", batch_size: int = 64, crops_only: bool = False,
           repeats: int = 3, slides: list[str] | None = None, data_root: str | Path | None = None) -> dict[str, Any]:
    """The patch loader alone, on one CPU core: patches/s of what a DataLoader worker does for
    ``encoder``-sized patches from decoded images (the median of ``repeats`` passes over the
    slides) — cutting, resampling and normalising, or with ``crops_only`` just cutting (the GPU
    path, which resamples on the device) — and the seconds to read a slide's spots and decode its
    image. The cores that keep a GPU busy are its forward-pass rate over this."""
    from hgc.data.manifest import read_manifest
    from hgc.embed import load_encoder
    from hgc.embed.patches import PatchBatches, PatchSpec, crop_boxes, patch_source

    m = read_manifest(manifest, data_root)
    ids = [s for s in m.slide_ids if not slides or s in set(slides)]
    enc = load_encoder(encoder)
    patch = PatchSpec(out_px=enc.spec.input_px)
    decode, batches = [], []
    for slide_id in ids:
        t0 = time.perf_counter()
        slide = m.load(slide_id, expression=False)
        source = patch_source(slide)
        decode.append(time.perf_counter() - t0)
        batches.append(PatchBatches(source, crop_boxes(slide, patch), patch.out_px, batch_size, enc.spec.mean,
                                    enc.spec.std, via_px=patch.via_px(slide), raw=crops_only))
    n_spots = sum(len(b.boxes) for b in batches)
    rates = []
    for i in range(repeats + 1):  # the first pass is the warm-up
        t0 = time.perf_counter()
        for data in batches:
            for j in range(len(data)):
                data[j]
        if i:
            rates.append(n_spots / (time.perf_counter() - t0))
    return {"patches_per_s": statistics.median(rates), "runs": rates, "crops_only": crops_only, "spots": n_spots,
            "slides": ids, "patch_px": enc.spec.input_px, "read_and_decode_s_per_slide": statistics.median(decode)}


def run(
    manifest: str | Path,
    out_json: str | Path | None = None,
    *,
    encoder: str = "effnet-lite0",
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    repeats: int = 3,
    slides: list[str] | None = None,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Measure and return (and write to ``out_json``) end-to-end and ceiling patches/s."""
    from hgc._devices import resolve_device
    from hgc.data.manifest import read_manifest
    from hgc.embed import embed_manifest, load_encoder
    from hgc.embed.extract import default_workers
    from machine import describe

    m = read_manifest(manifest, data_root)
    if slides:
        m = dataclasses.replace(m, entries=[e for e in m.entries if e.slide in set(slides)])
    n_spots = sum(m.load(s, expression=False).n_spots for s in m.slide_ids)
    dev = resolve_device(device)
    workers = default_workers(dev) if workers is None else workers
    enc = load_encoder(encoder)
    model = enc.build().to(dev)
    if dev.type == "cuda":
        import torch

        model = model.to(memory_format=torch.channels_last)
    batches = max(1, -(-n_spots // batch_size) // len(m.slide_ids))
    ceiling = _ceiling(model, enc.spec.input_px, batch_size, dev, batches, repeats)

    end_to_end = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):  # the first run is the warm-up
            out = Path(tmp) / f"run{i}.h5"
            t0 = time.perf_counter()
            embed_manifest(m, encoder, out, device=device, batch_size=batch_size, workers=workers, progress=False)
            if i:
                end_to_end.append(n_spots / (time.perf_counter() - t0))
    ceiling += _ceiling(model, enc.spec.input_px, batch_size, dev, batches, repeats)

    result = {
        "benchmark": "embed_throughput",
        "encoder": encoder,
        "device": dev.type,
        "batch_size": batch_size,
        "workers": workers,
        "slides": m.slide_ids,
        "spots": n_spots,
        "repeats": repeats,
        "end_to_end_patches_per_s": statistics.median(end_to_end),
        "ceiling_patches_per_s": statistics.median(ceiling),
        "end_to_end_runs": end_to_end,
        "ceiling_runs": ceiling,
        "machine": describe(),
    }
    result["fraction_of_ceiling"] = result["end_to_end_patches_per_s"] / result["ceiling_patches_per_s"]
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest")
    p.add_argument("--out", default=None, help="JSON file for the result")
    p.add_argument("--encoder", default="effnet-lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slides", default=None, help="comma-separated subset of slide ids")
    p.add_argument("--data-root", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = run(a.manifest, a.out, encoder=a.encoder, batch_size=a.batch_size, workers=a.workers, device=a.device,
            repeats=a.repeats, slides=a.slides.split(",") if a.slides else None, data_root=a.data_root)
    print(
        f"{r['encoder']} on {r['device']} (batch {r['batch_size']}, {r['workers']} workers, {r['spots']} spots): "
        f"end to end {r['end_to_end_patches_per_s']:.1f} patches/s, bare forward "
        f"{r['ceiling_patches_per_s']:.1f} patches/s = {100 * r['fraction_of_ceiling']:.0f}% "
        f"[{r['machine']['cpu']}]"
    )


if __name__ == "__main__":
    main()
