import torch
from torch import nn

from histodetect.device import depthwise_in_fp32, resolve_hardware
from histodetect.models import create_model


def test_depthwise_convolutions_run_in_fp32_under_cpu_autocast_and_keep_their_weights() -> None:
    model = create_model("tf_efficientnet_lite0")
    keys = list(model.state_dict())
    seen: list[torch.dtype] = []
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert depthwise_in_fp32(model) == len(depthwise) > 0
    depthwise[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 96, 96))
    assert seen == [torch.float32]
    assert out.shape == (2,)
    assert list(model.state_dict()) == keys


def test_precision_and_layout_follow_the_hardware() -> None:
    cpu32 = resolve_hardware(accelerator="cpu", precision="32")
    assert (cpu32.precision, cpu32.channels_last, cpu32.depthwise_fp32, cpu32.num_workers) == (
        "32-true",
        True,
        False,
        0,
    )
    assert resolve_hardware(accelerator="mps", precision="32").channels_last is False
    bf16 = resolve_hardware(accelerator="cpu", precision="bf16-mixed")
    assert (bf16.channels_last, bf16.depthwise_fp32) == (True, True)
