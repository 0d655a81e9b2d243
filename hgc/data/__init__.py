"""Slides, readers, manifests and preprocessing: everything up to a spots x genes matrix."""
from .image import SlideImage
from .manifest import Manifest, SlideEntry, data_root, read_manifest
from .slide import Slide

__all__ = ["Manifest", "Slide", "SlideEntry", "SlideImage", "data_root", "read_manifest"]
