"""An encoder's intermediate stages pooled beside its final features, in one vector per patch.

The final features of an ImageNet CNN describe objects; the earlier stages keep texture, nuclei and
stroma at finer scales, which is much of what expression follows in H&E. Global average pooling of
every stage's feature map and concatenating them (final features first) costs no extra forward
pass: the stages are computed anyway.
"""
from __future__ import annotations

import torch


class StagePooled(torch.nn.Module):
    """``model``'s pooled final features followed by the mean of each intermediate stage's map.

    ``model`` is a timm CNN with ``forward_intermediates`` and ``feature_info`` (EfficientNet,
    ResNet, ConvNeXt ...), its classifier removed.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stage_channels = [int(f["num_chs"]) for f in model.feature_info]
        self.num_features = int(model.num_features) + sum(self.stage_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, stages = self.model.forward_intermediates(x)
        return torch.cat([self.model.forward_head(final), *(s.mean(dim=(-2, -1)) for s in stages)], dim=1)
