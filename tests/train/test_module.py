"""The optimiser LitClassifier builds: which parameters decay, at which learning rate."""

from __future__ import annotations

import pytest
import torch

from histodetect.models import create_model
from histodetect.runs.config import TrainConfig
from histodetect.train.module import LitClassifier


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
