"""Spot image embeddings: patches, encoders, batched extraction and the embedding HDF5 file."""
from .extract import embed_manifest, embed_slide
from .patches import PatchSpec, PatchViews, crop_boxes, export_patches
from .registry import ENCODERS, Encoder, EncoderSpec, get_spec, load_encoder
from .store import read_attrs, read_embeddings

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "PatchSpec",
    "PatchViews",
    "crop_boxes",
    "embed_manifest",
    "embed_slide",
    "export_patches",
    "get_spec",
    "load_encoder",
    "read_attrs",
    "read_embeddings",
]
