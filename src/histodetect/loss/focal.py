"""Binary losses on logits: focal loss and (optionally class-weighted) BCE, sharing one label smoothing.

Both take logits ``(B,)`` and float targets ``(B,)`` in ``[0, 1]``: hard labels, or the soft labels MixUp and
CutMix produce, so neither may assume targets are exactly 0 or 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from histodetect.errors import ConfigError


def smooth_labels(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Pull targets towards 0.5 (``t * (1 - s) + 0.5 * s``): binary label smoothing, which keeps the network
    from driving logits to infinity on the few mislabelled patches in the training set."""
    return targets * (1.0 - smoothing) + 0.5 * smoothing


def _check_smoothing(smoothing: float) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), not {smoothing}")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): BCE scaled by ``(1 - p_t) ** gamma`` so easy patches weigh less.

    ``alpha`` in ``[0, 1]`` weights positives by ``alpha`` and negatives by ``1 - alpha``; a negative
    ``alpha`` turns that weighting off (torchvision's convention); with ``gamma = 0`` too, the loss is BCE.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal_gamma must be >= 0, not {gamma}")
        if alpha > 1:
            raise ConfigError(f"focal_alpha must be <= 1 (negative = off), not {alpha}")
        _check_smoothing(label_smoothing)
        self.gamma = gamma
        self.alpha = alpha
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # float32 whatever the training precision: the log-sigmoid of a bf16 logit loses too much.
        logits, targets = logits.float(), smooth_labels(targets.float(), self.label_smoothing)
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="mean")


class BCELoss(nn.Module):
    """Binary cross-entropy on logits; ``pos_weight`` multiplies the positive term (for imbalanced data)."""

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: float | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if pos_weight is not None and pos_weight <= 0:
            raise ConfigError(f"pos_weight must be positive, not {pos_weight}")
        _check_smoothing(label_smoothing)
        self.label_smoothing = label_smoothing
        # A buffer, so it follows the module to the batch's device.
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(pos_weight))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), smooth_labels(targets.float(), self.label_smoothing)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)
