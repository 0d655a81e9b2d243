"""Device names (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``): checked once, in one place."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (CUDA when usable, else CPU), cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def check_device(spec: str) -> str:
    """``spec`` if it names a device hgc can use, else an InputError listing the choices."""
    spec = str(spec).strip().lower()
    if not _DEVICE.fullmatch(spec):
        raise InputError(f"unknown device '{spec}'; expected {DEVICE_HELP}")
    return spec


def resolve_device(spec: str) -> "torch.device":
    """The torch device ``spec`` stands for on this machine; an unusable one is an InputError."""
    import torch

    spec = check_device(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{spec}' was requested but no CUDA GPU is usable by this torch build")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"device '{spec}' was requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was requested but Apple's Metal backend is not available")
    return torch.device(spec)
