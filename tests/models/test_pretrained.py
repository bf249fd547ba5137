"""Starting weights: the offline Lite0 checkpoint, local files, refusals that name the file, the HF cache."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from histodetect.models import ModelError, create_model, load_weights
from histodetect.models.pretrained import lite0_state_dict, lite0_weights_path


@pytest.fixture(scope="module")
def lite0() -> dict[str, torch.Tensor]:
    return lite0_state_dict()


def _timm_lite0(state: dict[str, torch.Tensor]) -> nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_lite0_mapping_covers_every_key_one_to_one(lite0: dict[str, torch.Tensor]) -> None:
    expected = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    raw = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(lite0) == len(raw) == len(expected)
    assert {k: v.shape for k, v in lite0.items()} == {k: v.shape for k, v in expected.items()}
    _timm_lite0(lite0)  # strict


def test_auto_loads_the_package_weights_strictly(
    lite0: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        model = create_model("tf_efficientnet_lite0", pretrained="auto")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, lite0[key]), key
    assert "ignored 2 classifier key(s) (classifier.weight, classifier.bias)" in caplog.text


def _batchnorm_agreement(model: nn.Module, x: torch.Tensor) -> float:
    """Mean correlation, over BatchNorm layers, between the log-variance of each channel of the layer's input
    on ``x`` and the running variance learned on ImageNet: high only if every layer got its own statistics."""
    scores: list[torch.Tensor] = []

    def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        var = inputs[0].transpose(0, 1).flatten(1).var(dim=1).clamp_min(1e-12).log()
        scores.append(torch.corrcoef(torch.stack([var, module.running_var.log()]))[0, 1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model((x - 0.5) / 0.5)
    for handle in handles:
        handle.remove()
    return torch.stack(scores).nanmean().item()


@pytest.mark.slow
def test_lite0_weights_make_sense_on_real_patches(
    lite0: dict[str, torch.Tensor], patches: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Shapes cannot catch swapped same-shaped BatchNorms; their statistics can. As a control, swap the two
    same-shaped BatchNorms of every inverted-residual block and watch agreement and predictions collapse."""
    x = patches[0]
    swapped = dict(lite0)
    for key in lite0:
        if key.startswith("blocks.") and not key.startswith("blocks.0.") and ".bn1." in key:
            other = key.replace(".bn1.", ".bn2.")
            swapped[key], swapped[other] = lite0[other], lite0[key]
    good, bad = _timm_lite0(lite0), _timm_lite0(swapped)
    agreement = _batchnorm_agreement(good, x)
    assert agreement > 0.6
    assert _batchnorm_agreement(bad, x) < agreement - 0.2
    with torch.no_grad():
        logits = good((x - 0.5) / 0.5)
    assert torch.isfinite(logits).all()
    assert len(set(logits.argmax(1).tolist())) > 3  # varied ImageNet guesses, not one class for everything


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ModelError, match="missing") as info:
        create_model("tf_efficientnet_lite0", pretrained=str(path))
    message = str(info.value)
    assert str(path) in message and "unexpected" in message and "conv_stem.weight" in message


def test_wrong_shapes_are_refused(tmp_path: Path, lite0: dict[str, torch.Tensor]) -> None:
    state = dict(lite0)
    state["conv_head.weight"] = torch.zeros(8, 320, 1, 1)
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"1 with the wrong shape \(conv_head.weight \(8, 320, 1, 1\)"):
        create_model("tf_efficientnet_lite0", pretrained=str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_files_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    with pytest.raises(ModelError, match="cannot read weights") as info:
        create_model("baseline-cnn", pretrained=str(path))
    assert str(path) in str(info.value)


def test_missing_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such weights file"):
        create_model("baseline-cnn", pretrained=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ModelError, match="not a weights file"):
        create_model("baseline-cnn", pretrained=str(tmp_path / "weights.txt"))
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="not a state dict"):
        create_model("baseline-cnn", pretrained=str(path))


@pytest.mark.slow
def test_classifier_round_trip_through_safetensors(tmp_path: Path, patches: tuple[torch.Tensor, torch.Tensor]) -> None:
    source = create_model("resnet18", image_size=64).eval()
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    copy = create_model("resnet18", pretrained=str(path), image_size=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(copy(patches[0][:4]), source(patches[0][:4]))


def test_backbone_checkpoint_in_a_training_wrapper(tmp_path: Path) -> None:
    """A timm checkpoint with its ImageNet classifier, nested as training scripts save it, and without the
    BatchNorm counters older checkpoints lack."""
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if k not in counters}, "epoch": 90}, path)
    model = create_model("resnet18")
    report = load_weights(model, path)
    assert report.ignored == ["fc.weight", "fc.bias"]
    assert sorted(report.missing) == sorted(counters)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_auto_uses_timm_weights_only_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=r"--pretrained path/to/weights\.safetensors") as info:
        create_model("resnet18", pretrained="auto")
    assert "timm/resnet18.a1_in1k" in str(info.value) and "--pretrained none" in str(info.value)

    # Lay out the cache as huggingface_hub does after a download; then auto finds and loads it.
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(state, repo / "snapshots" / "abc123" / "model.safetensors")
    model = create_model("resnet18", pretrained="auto")
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_auto_for_the_baseline_is_random_init() -> None:
    assert create_model("baseline-cnn", pretrained="auto").name == "baseline-cnn"
