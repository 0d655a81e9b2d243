"""Several encoders side by side: one embedding per patch holding each network's features in turn.

Networks trained differently (other depths, input sizes) describe the same patch differently, and
a linear read-out of their features together predicts expression better than any one of them
(issue 11's measurement: EfficientNet-Lite0, 1 and 2 together, +0.013 PCC-ALL for ridge on her2st
slide-LOSO, at 3.4 times the cost). The patch reaches this module as cut, in pixel values 0-255 at
the largest input size among the networks; each network gets it resampled to its own input size
and normalised its own way.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: One network of a combination: the module, its input size in pixels, its per-channel mean and std (0-1 scale).
Part = tuple[torch.nn.Module, int, Sequence[float], Sequence[float]]


class Combined(torch.nn.Module):
    """The features of ``parts`` concatenated in order, from one patch (B, 3, S, S) of pixel values 0-255."""

    def __init__(self, parts: Sequence[Part]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(model for model, *_ in parts)
        self.sizes = [px for _, px, _, _ in parts]
        for i, (_, _, mean, std) in enumerate(parts):
            self.register_buffer(f"mean{i}", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.num_features = sum(int(model.num_features) for model in self.models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i, (model, px) in enumerate(zip(self.models, self.sizes)):
            y = x if x.shape[-1] == px else F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False,
                                                         antialias=True)
            out.append(model((y - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")))
        return torch.cat(out, dim=1)
