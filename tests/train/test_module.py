"""The optimiser LitClassifier builds (which parameters decay, at which learning rate) and its validation AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from histodetect.data.augment import to_float
from histodetect.loss import paired_divergence
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


def test_stain_consistency_pairs_the_batch_and_adds_their_divergence() -> None:
    """``stain_consistency``: the batch and its re-stainings go through the model together, and the loss is the
    usual one on both plus the weighted divergence of each pair."""
    no_other_augmentation = {"aug_dihedral": False, "aug_hed": 0.0, "aug_brightness": 0.0, "aug_contrast": 0.0}
    config = TrainConfig(
        model="baseline-cnn", pretrained="none", stain_aug=0.5, stain_consistency=4.0, **no_other_augmentation
    )
    module = LitClassifier(config, create_model("baseline-cnn", pretrained="none"))
    module.model.eval()  # the same logits on a second pass: no dropout, no batch statistics
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    forward, seen = module.forward_fn, []
    module.__dict__["forward_fn"] = lambda x: seen.append(x) or forward(x)
    pixels = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 0, 1, 1])

    loss = module.training_step((pixels, targets, torch.arange(5)), 0)

    (x,) = seen
    assert x.shape[0] == 10 and torch.equal(x[:5], to_float(pixels))
    assert not torch.allclose(x[5:], x[:5])
    logits = forward(x)
    expected = module.loss_fn(logits.float(), torch.cat([targets, targets]).float()) + 4.0 * paired_divergence(logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
