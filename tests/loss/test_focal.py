"""Focal loss and BCE: agreement where they should agree, soft targets, smoothing, class weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from histodetect.loss import BCELoss, FocalLoss, build_loss, smooth_labels
from histodetect.runs.config import ConfigError, TrainConfig

LOGITS = torch.tensor([-4.0, -1.0, -0.2, 0.0, 0.3, 1.5, 3.0, 6.0])
HARD = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
SOFT = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0, 0.25, 0.7, 0.1])  # what MixUp/CutMix produce


@pytest.mark.parametrize("targets", [HARD, SOFT])
def test_focal_without_focusing_or_alpha_is_bce(targets: torch.Tensor) -> None:
    focal = FocalLoss(gamma=0.0, alpha=-1.0)(LOGITS, targets)
    torch.testing.assert_close(focal, F.binary_cross_entropy_with_logits(LOGITS, targets))
    torch.testing.assert_close(focal, BCELoss()(LOGITS, targets))


def test_focal_down_weights_easy_examples() -> None:
    easy, hard = torch.tensor([5.0]), torch.tensor([-1.0])
    target = torch.tensor([1.0])
    bce, focal = BCELoss(), FocalLoss(gamma=2.0, alpha=-1.0)
    assert focal(easy, target) / bce(easy, target) < 0.01
    assert focal(hard, target) / bce(hard, target) > 0.5


def test_focal_with_soft_targets_and_extreme_logits_is_finite() -> None:
    logits = torch.cat([LOGITS, torch.tensor([-80.0, 80.0])]).requires_grad_()
    targets = torch.cat([SOFT, torch.tensor([0.6, 0.4])])
    loss = FocalLoss(gamma=2.0, alpha=0.25, label_smoothing=0.1)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_label_smoothing_moves_the_optimum_off_infinity() -> None:
    torch.testing.assert_close(smooth_labels(torch.tensor([0.0, 1.0, 0.5]), 0.2), torch.tensor([0.1, 0.9, 0.5]))
    # With s = 0.2 the best logit for a positive is logit(0.9), where the gradient vanishes.
    logit = torch.logit(torch.tensor([0.9])).requires_grad_()
    BCELoss(label_smoothing=0.2)(logit, torch.tensor([1.0])).backward()
    assert logit.grad.abs().item() < 1e-6
    torch.testing.assert_close(
        FocalLoss(gamma=0.0, alpha=-1.0, label_smoothing=0.2)(LOGITS, HARD),
        F.binary_cross_entropy_with_logits(LOGITS, smooth_labels(HARD, 0.2)),
    )


def test_pos_weight_scales_the_positive_term() -> None:
    positives = torch.ones_like(LOGITS)
    torch.testing.assert_close(BCELoss(pos_weight=3.0)(LOGITS, positives), 3 * BCELoss()(LOGITS, positives))
    negatives = torch.zeros_like(LOGITS)
    torch.testing.assert_close(BCELoss(pos_weight=3.0)(LOGITS, negatives), BCELoss()(LOGITS, negatives))


def test_low_precision_logits_give_a_float32_loss() -> None:
    loss = BCELoss()(LOGITS.bfloat16(), HARD)
    assert loss.dtype == torch.float32


def test_build_loss_follows_the_config() -> None:
    bce = build_loss(TrainConfig(loss="bce", pos_weight=2.0, label_smoothing=0.1))
    assert isinstance(bce, BCELoss) and bce.pos_weight.item() == 2.0 and bce.label_smoothing == 0.1
    focal = build_loss(TrainConfig(loss="focal", focal_gamma=1.5, focal_alpha=-1.0))
    assert isinstance(focal, FocalLoss) and (focal.gamma, focal.alpha) == (1.5, -1.0)
    assert build_loss(TrainConfig())(LOGITS, HARD).shape == ()


@pytest.mark.parametrize(
    "changes",
    [
        {"label_smoothing": 1.0},
        {"label_smoothing": -0.1},
        {"pos_weight": 0.0},
        {"loss": "focal", "focal_gamma": -1.0},
    ],
)
def test_bad_settings_are_config_errors(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        build_loss(TrainConfig(**changes))
