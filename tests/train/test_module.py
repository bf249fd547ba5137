"""The optimiser LitClassifier builds (which parameters decay, at which learning rate) and its validation AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from histodetect.models import create_model
from histodetect.runs.config import TrainConfig
from histodetect.train.module import LitClassifier, _val_auc


@pytest.mark.parametrize(("model", "optimizer"), [("baseline-cnn", "adamw"), ("resnet18", "sgd")])
def test_norm_and_bias_parameters_get_no_weight_decay(model: str, optimizer: str) -> None:
    config = TrainConfig(model=model, pretrained="none", optimizer=optimizer, weight_decay=0.05, scheduler="plateau")
    net = create_model(model, pretrained="none")
    built = LitClassifier(config, net).configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in built.param_groups for p in group["params"]}
    assert len(decay_of) == sum(1 for _ in net.parameters())  # every parameter, once
    norms = {
        id(p) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()
    }
    assert norms
    for name, p in net.named_parameters():
        expected = 0.0 if p.ndim <= 1 or name.endswith(".bias") else 0.05
        assert decay_of[id(p)] == expected, name
        if id(p) in norms:
            assert decay_of[id(p)] == 0.0, name
    head = {id(p) for p in net.head.parameters()}
    assert all(group["lr"] == config.lr for group in built.param_groups if head & {id(p) for p in group["params"]})


def test_validation_auc_is_the_one_roc_auc_and_matches_torchmetrics() -> None:
    """val_auc moved from torchmetrics' binary_auroc to histodetect.metrics.roc_auc: the same numbers (to float32
    rounding) on tied scores, and 0.0 as before for a validation set of one class."""
    rng = np.random.default_rng(0)
    for n in (7, 100, 2000):
        targets = torch.from_numpy(rng.integers(0, 2, n)).int()
        targets[:2] = torch.tensor([0, 1], dtype=torch.int32)
        probs = torch.sigmoid(torch.from_numpy(rng.normal(size=n).round(1)).float())  # many ties
        assert _val_auc(targets, probs) == pytest.approx(binary_auroc(probs, targets).item(), abs=1e-6)
    assert _val_auc(torch.ones(5, dtype=torch.int32), torch.rand(5)) == 0.0
