"""The training loss, chosen by a run's ``loss`` setting."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from histodetect.loss.consistency import paired_divergence
from histodetect.loss.focal import BCELoss, FocalLoss, smooth_labels

__all__ = ["BCELoss", "FocalLoss", "LossSettings", "build_loss", "paired_divergence", "smooth_labels"]


class LossSettings(Protocol):
    """The settings a loss reads (``TrainConfig`` has them); a protocol so that ``loss`` needs nothing above it."""

    loss: str
    pos_weight: float | None
    label_smoothing: float
    focal_gamma: float
    focal_alpha: float


def build_loss(cfg: LossSettings) -> nn.Module:
    """The loss module for a run: called as ``loss(logits (B,), targets float (B,)) -> scalar``."""
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha, cfg.label_smoothing)
    return BCELoss(cfg.pos_weight, cfg.label_smoothing)
