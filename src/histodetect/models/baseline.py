"""The from-scratch baseline: the classic four conv blocks of the Kaggle kernels for this competition.

It is the reference every pretrained backbone has to beat, and a model that trains in minutes on a CPU.
It mirrors the shape of a timm backbone created with ``num_classes=0`` (``forward`` returns pooled features,
``num_features`` gives their width, ``blocks`` holds the stages) so ``Classifier`` treats both alike.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

CHANNELS = (32, 64, 128, 256)
# From scratch there is no pretraining distribution to match; 0.5/0.5 maps [0, 1] onto [-1, 1], centred for
# the first convolution (the BatchNorm after it would absorb any other fixed affine map anyway).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv 3x3 - BatchNorm - ReLU - maxpool 2x2: halves the resolution, so 96 px ends at 6x6 after four."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class BaselineCNN(nn.Module):
    """Four conv blocks then global average pooling: normalised ``(B, 3, H, W)`` -> ``(B, 256)`` features."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(conv_block(a, b) for a, b in pairwise((3, *channels))))
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = channels[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation suits the ReLUs; PyTorch's default (meant for tanh-like units) trains slower here.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.blocks(x))
