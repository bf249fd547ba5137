"""The training loss, chosen by ``TrainConfig.loss``."""

from __future__ import annotations

from torch import nn

from histodetect.loss.focal import BCELoss, FocalLoss, smooth_labels
from histodetect.train.config import TrainConfig

__all__ = ["BCELoss", "FocalLoss", "build_loss", "smooth_labels"]


def build_loss(cfg: TrainConfig) -> nn.Module:
    """The loss module for a run: called as ``loss(logits (B,), targets float (B,)) -> scalar``."""
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha, cfg.label_smoothing)
    return BCELoss(cfg.pos_weight, cfg.label_smoothing)
