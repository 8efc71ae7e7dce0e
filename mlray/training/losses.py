"""Multi-label losses made for imbalance: ``bce``, ``bce_weighted``, ``focal``, ``asl``.

All take raw logits and multi-hot float targets of shape (N, C) and return the
sum over labels averaged over images, so the gradient per logit does not shrink
as the vocabulary grows (a mean over N*C would divide it by C: 1000 labels,
1000x smaller steps). Computed in float32 even under autocast.

Each takes an optional per-row ``weight`` (N,): the average over images is then
weighted, ``sum(w_i * loss_i) / sum(w_i)`` (0 when every weight is 0). Training
gives rows that failed to decode weight 0, so a batch keeps its shape (no
recompile under ``torch.compile``, no device sync for a boolean mask) and its
loss is that of its good rows alone.

* ``bce_weighted``: ``pos_weight = negatives / positives`` per label from the
  training split, clipped to ``[1, max_pos_weight]``.
* ``focal`` (Lin et al. 2017): down-weights easy examples by ``(1 - p_t)^gamma``.
* ``asl`` (Ridnik et al. 2021): asymmetric focusing, ``gamma_neg > gamma_pos``, and
  probability shifting (``clip``) that discards very easy negatives — the flood of
  zeros in a 1000-label problem.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlray.config import LossConfig


def _reduce(per_element: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    per_row = per_element.sum(dim=1)
    if weight is None:
        return per_row.mean()
    w = weight.to(per_row.dtype)
    total = w.sum()
    # on the device, no branch on the host: an all-zero batch gives 0 (and zero gradients)
    return (per_row * w).sum() / torch.where(total > 0, total, torch.ones_like(total))


class BCELoss(nn.Module):
    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return _reduce(
            F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight, reduction="none"),
            weight,
        )


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        x, y = logits.float(), targets.float()
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p = torch.sigmoid(x)
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t).pow(self.gamma)
        if self.alpha is not None:
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        return _reduce(loss, weight)


class AsymmetricLoss(nn.Module):
    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        x, y = logits.float(), targets.float()
        p = torch.sigmoid(x)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        pos = y * torch.log(p.clamp(min=self.eps))
        neg = (1 - y) * torch.log((1 - p_neg).clamp(min=self.eps))
        if self.gamma_pos > 0:
            pos = pos * (1 - p).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            neg = neg * p_neg.pow(self.gamma_neg)
        return _reduce(-(pos + neg), weight)


def pos_weight_from_counts(positives: Sequence[float], n_images: int, max_weight: float) -> torch.Tensor:
    pos = np.asarray(positives, dtype=np.float64)
    w = np.where(pos > 0, (n_images - pos) / np.maximum(pos, 1), max_weight)
    return torch.tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


def create_loss(cfg: LossConfig, positives: Sequence[float] | None = None, n_images: int | None = None) -> nn.Module:
    """Build the configured loss; ``bce_weighted`` needs the training label counts."""
    if cfg.name == "bce":
        return BCELoss()
    if cfg.name == "bce_weighted":
        if positives is None or n_images is None:
            raise ValueError("loss.name=bce_weighted needs the training split's label counts")
        return BCELoss(pos_weight_from_counts(positives, n_images, cfg.max_pos_weight))
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha)
    return AsymmetricLoss(cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
