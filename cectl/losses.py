"""Losses: the weighted L2 reconstruction and the adversarial BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """The mean of w x (pred - target)^2 over every output element (N x 3 x H x W).

    The authors' normalisation (train.lua: the element-wise weights times the gradient of
    `nn.MSECriterion`), so that lambda_rec / lambda_adv = 0.999 / 0.001 balance the two
    terms as in the paper. `weights` is (N, 1, H, W).
    """
    return ((pred.float() - target.float()).square() * weights).mean()


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)
