"""Losses: the masked, overlap-weighted L2 reconstruction and the adversarial BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error; `weights` (N, 1, H, W) is 0 where nothing is predicted."""
    squared = (pred.float() - target.float()).square() * weights
    return squared.sum() / (weights.sum() * pred.shape[1]).clamp_min(1.0)


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)
