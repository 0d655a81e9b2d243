"""Slides, readers, manifests and preprocessing: everything up to a spots x genes matrix."""
from .image import SlideImage
from .manifest import Manifest, SlideEntry, data_root, read_manifest
from .readers.h5ad import read_h5ad
from .readers.hest import read_hest
from .readers.st import read_st
from .readers.visium import read_visium
from .slide import Slide

__all__ = [
    "Manifest",
    "Slide",
    "SlideEntry",
    "SlideImage",
    "data_root",
    "read_h5ad",
    "read_hest",
    "read_manifest",
    "read_st",
    "read_visium",
]
