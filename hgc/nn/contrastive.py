"""Agreement losses between the two augmented views' node embeddings.

- ``bgrl`` (default; Thakoor et al., "Large-scale representation learning on graphs via
  bootstrapping"): the online encoder's embedding of view 1, passed through a predictor MLP, is
  pulled towards the EMA target encoder's embedding of view 2 (computed under ``no_grad``) by
  ``1 - cosine``. The target is updated by :func:`ema_update` after every optimiser step, with
  BGRL's cosine momentum schedule from ``base`` to 1. (The published SpaHGC code used a frozen
  random copy instead of an EMA target and no predictor.)
- ``infonce`` (GRACE, Zhu et al. 2020): both views through the online encoder and a projection
  head; each node's positive is itself in the other view, negatives are all other nodes of the
  same type in both views; temperature ``tau``; at most ``max_nodes`` nodes (sampled with the
  trainer's generator) to bound the O(n^2) similarity matrix.
- ``none``: no agreement term (ablation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .masking import randperm


def bgrl_loss(online_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between predicted and (detached) target embeddings, in [0, 2]."""
    return (1 - F.cosine_similarity(online_pred, target.detach(), dim=1)).mean()


def infonce_loss(
    z1: torch.Tensor, z2: torch.Tensor, tau: float, max_nodes: int, generator: torch.Generator | None
) -> torch.Tensor:
    """GRACE's symmetric NT-Xent with intra- and inter-view negatives."""
    n = z1.shape[0]
    if n > max_nodes:
        idx = randperm(n, generator, z1.device)[:max_nodes]
        z1, z2 = z1[idx], z2[idx]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    return 0.5 * (_semi_loss(z1, z2, tau) + _semi_loss(z2, z1, tau)).mean()


def _semi_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    between = a @ b.T / tau
    within = (a @ a.T / tau).masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), float("-inf"))
    return torch.logsumexp(torch.cat([between, within], dim=1), dim=1) - between.diagonal()


def ema_momentum(base: float, step: int, total_steps: int | None) -> float:
    """BGRL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``; constant if no total."""
    if not total_steps:
        return base
    progress = min(step, total_steps) / total_steps
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter."""
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.lerp_(po, 1 - momentum)
