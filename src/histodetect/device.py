"""Pick the fast path for the hardware at hand.

Measured on the project's 2-core AVX-512 CPU (tf_efficientnet_lite0, 128 px, batch 64, one training step):
fp32 36 img/s, fp32 + channels_last 58, bf16 autocast 76, bf16 + channels_last 86; on a 2-core AVX2 CPU without
bf16, fp32 + channels_last trained 1.38x faster than fp32 (26.3 against 19.1 img/s; the baseline CNN 1.1x). So on a
CPU with native bf16 (AVX512-BF16 or AMX) the default is bf16 autocast with channels_last, on other CPUs fp32 with
channels_last; on CUDA it is bf16 mixed precision (fp16 where bf16 is missing) with channels_last and more loader
workers. MPS keeps the default layout.

One exception on the CPU: oneDNN's bf16 backward of depthwise convolutions is about twice as slow as its fp32 one
(EfficientNet-Lite0 at 96 px: 610 ms against 326 ms of convolution backward a step), so under CPU autocast those
layers run in fp32 (:func:`depthwise_in_fp32`): 157 -> 204 training images/s for Lite0.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Hardware:
    accelerator: str  # what Lightning is given: cpu | cuda | mps
    precision: str  # 32-true | bf16-mixed | 16-mixed
    channels_last: bool
    num_workers: int
    pin_memory: bool

    @property
    def depthwise_fp32(self) -> bool:
        return self.accelerator == "cpu" and self.precision == "bf16-mixed"


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively; emulated bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_accelerator(name: str) -> str:
    if name in ("gpu", "cuda"):
        return "cuda"
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_hardware(
    accelerator: str = "auto",
    precision: str = "auto",
    channels_last: bool | None = None,
    num_workers: int | None = None,
) -> Hardware:
    """The training settings for this machine; ``None`` and ``auto`` mean "what is fast here"."""
    accelerator = resolve_accelerator(accelerator)
    if precision == "auto":
        if accelerator == "cuda":
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        elif accelerator == "cpu" and cpu_has_bf16():
            precision = "bf16-mixed"
        else:
            precision = "32-true"
    elif precision == "32":
        precision = "32-true"
    if channels_last is None:
        channels_last = accelerator in ("cpu", "cuda")
    if num_workers is not None:
        workers = num_workers
    elif accelerator == "cuda":
        workers = min(8, max(1, (os.cpu_count() or 2) - 1))
    else:
        workers = 0  # on a small CPU, loader processes take cores from the model; memmap reads are cheap
    return Hardware(accelerator, precision, channels_last, workers, pin_memory=accelerator == "cuda")


def depthwise_in_fp32(model: nn.Module) -> int:
    """Run every depthwise convolution of ``model`` in fp32 under CPU autocast; returns how many.

    The forward is replaced on each instance (weights, state-dict keys and the class are untouched), so saved
    weights and exports are the same as without it.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            module.forward = types.MethodType(_fp32_forward(type(module).forward), module)
            count += 1
    return count


def _fp32_forward(forward: Callable[..., torch.Tensor]) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Wraps any Conv2d subclass's forward (timm's Conv2dSame pads first)."""

    def run(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return forward(self, x.float())

    return run
