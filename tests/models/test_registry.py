"""create_model and Classifier: each family builds, trains a step on real patches and honours the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from histodetect.models import (
    Classifier,
    ModelError,
    create_model,
    freeze_backbone,
    list_models,
    unfreeze_top,
)

# Small stand-ins for each family the presets and docs mention (resnet18 for resnet50).
# The two EfficientNets take seconds a test on 2 cores: slow, the others keep the quick loop covering each test.
FAMILIES = [
    "baseline-cnn",
    "resnet18",
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("tf_efficientnet_lite0", marks=pytest.mark.slow),
    "convnext_atto",
]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> Classifier:
    torch.manual_seed(0)
    return create_model(request.param, dropout=0.2)


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_forward_backward_on_real_patches(model: Classifier, patches: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = patches[0][:4], patches[1][:4]
    model.train()
    logits = model(x)
    assert logits.shape == (4,)
    assert torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(logits, y).backward()
    first = next(model.stages()[0].parameters())
    assert model.head[1].weight.grad is not None and first.grad is not None
    assert torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.slow
def test_resnet50_forward_at_native_size(patches: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = create_model("resnet50").eval()
    with torch.no_grad():
        assert model(patches[0][:2]).shape == (2,)


def test_resizes_to_image_size(patches: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = create_model("baseline-cnn", image_size=128).eval()
    seen: list[tuple[int, ...]] = []
    model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        resized = model(patches[0][:2])
        native = model(F.interpolate(patches[0][:2], size=128, mode="bilinear", align_corners=False))
    assert seen == [(2, 3, 128, 128)] * 2
    assert resized.shape == (2,)
    torch.testing.assert_close(resized, native)


def test_auto_image_size_is_the_backbones_pretrained_input_size() -> None:
    resnet = create_model("resnet18", image_size="auto")
    assert resnet.image_size == resnet.backbone.pretrained_cfg["input_size"][-1] == 224
    assert create_model("baseline-cnn", image_size="auto").image_size == 96


def test_normalises_with_the_backbones_own_statistics() -> None:
    model = create_model("resnet18")
    cfg = model.backbone.pretrained_cfg
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(cfg["mean"]))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(cfg["std"]))
    assert {"mean", "std"} <= set(model.state_dict())  # travels with the weights
    lite = create_model("tf_efficientnet_lite0")
    assert lite.data_config == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "image_size": 96}


def test_stages_are_ordered_bottom_to_top_and_cover_the_backbone(
    model: Classifier, patches: tuple[torch.Tensor, torch.Tensor]
) -> None:
    stages = model.stages()
    assert len(stages) >= 4
    order: list[int] = []
    handles = [
        stage.register_forward_hook(lambda *_a, i=i: order.append(i))
        for i, stage in enumerate(stages)
        if not isinstance(stage, nn.ModuleList)  # a group's members are hooked below
    ]
    for i, stage in enumerate(stages):
        if isinstance(stage, nn.ModuleList):
            handles += [m.register_forward_hook(lambda *_a, i=i: order.append(i)) for m in stage]
    with torch.no_grad():
        model.eval()(patches[0][:1])
    for handle in handles:
        handle.remove()
    assert order == sorted(order) and set(order) == set(range(len(stages)))
    in_stages = [id(p) for stage in stages for p in stage.parameters()]
    assert sorted(in_stages) == sorted(id(p) for p in model.backbone.parameters())  # each exactly once


def test_top_stage_includes_what_follows_the_last_block() -> None:
    model = create_model("efficientnet_b0")
    top = model.stages()[-1]
    assert any(m is model.backbone.conv_head for m in top)
    assert any(m is model.backbone.bn2 for m in top)


def test_cam_layer_is_a_spatial_feature_map(model: Classifier, patches: tuple[torch.Tensor, torch.Tensor]) -> None:
    shapes: list[torch.Size] = []
    handle = model.cam_layer.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    with torch.no_grad():
        model.eval()(patches[0][:1])
    handle.remove()
    assert len(shapes) == 1 and len(shapes[0]) == 4 and shapes[0][-1] > 1


def _sgd_step(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    F.binary_cross_entropy_with_logits(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_freezing_freezes_weights_and_batchnorm_statistics(
    patches: tuple[torch.Tensor, torch.Tensor],
) -> None:
    model = create_model("resnet18")
    freeze_backbone(model)
    model.train()
    assert all(not bn.training for bn in _batchnorms(model.backbone))
    backbone, head = _snapshot(model.backbone), _snapshot(model.head)
    _sgd_step(model, patches[0][:4], patches[1][:4])
    assert not _changed(backbone, model.backbone)  # weights and running statistics alike
    assert _changed(head, model.head)


@pytest.mark.slow
def test_unfreeze_top_trains_only_the_top_stages(patches: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = create_model("efficientnet_b0")
    freeze_backbone(model)
    unfrozen = unfreeze_top(model, 1)
    assert len(unfrozen) == 1 and list(unfrozen[0]) == list(model.stages()[-1])  # a group, same members
    assert all(bn.training for bn in _batchnorms(unfrozen[0]))
    assert not any(bn.training for bn in _batchnorms(model.stages()[0]))
    top, bottom = _snapshot(model.stages()[-1]), _snapshot(model.stages()[0])
    _sgd_step(model.train(), patches[0][:4], patches[1][:4])
    assert _changed(top, model.stages()[-1])
    assert not _changed(bottom, model.stages()[0])
    assert len(unfreeze_top(model, 99)) == len(model.stages())
    with pytest.raises(ValueError):
        unfreeze_top(model, 0)


def test_lightning_freezing_keeps_frozen_batchnorm_in_eval(
    patches: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """As the training loop does it: BaseFinetuning freezes with train_bn=False, then unfreezes stages."""
    model = create_model("resnet18")
    BaseFinetuning.freeze(model.backbone, train_bn=False)
    model.train()
    before = _snapshot(model.backbone)
    _sgd_step(model, patches[0][:4], patches[1][:4])
    assert not _changed(before, model.backbone)
    BaseFinetuning.make_trainable(model.stages()[-1])
    model.train()
    assert all(bn.training for bn in _batchnorms(model.stages()[-1]))
    assert not any(bn.training for bn in _batchnorms(model.stages()[0]))


def test_unknown_name_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"timm\.list_models") as info:
        create_model("resnet5O")
    assert isinstance(info.value, ModelError)
    assert "resnet50" in str(info.value)  # the close match is suggested


def test_list_models_starts_with_our_own() -> None:
    assert list_models()[0] == "baseline-cnn"
    assert "tf_efficientnet_lite0" in list_models("*lite0")
    assert "baseline-cnn" not in list_models("resnet*")
