"""The one shape every network has: a backbone behind a dropout + linear head giving one logit.

The caller hands a ``Classifier`` RGB in ``[0, 1]`` at whatever size the patches have, and the model resizes and
normalises itself with buffers, so the preprocessing travels with ``model.safetensors`` and into ONNX instead of
being re-implemented (and drifting) in every command that runs a model. ``registry.create_model`` builds one from
a name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class Classifier(nn.Module):
    """A backbone mapping normalised images to pooled features, plus a dropout + linear head giving one logit.

    ``stage_names`` partitions the backbone's parameterised submodules (by name) into stages, bottom to top;
    ``cam_name`` names the last convolutional stage. Names rather than modules are kept so that nothing is
    registered twice in the module tree (and in the state dict).
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        *,
        num_features: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        dropout: float,
        stage_names: list[list[str]],
        cam_name: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, 1))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._stage_names = stage_names
        self._cam_name = cam_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in ``[0, 1]`` -> logits ``(B,)``."""
        return self.head(self.features(x))[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in ``[0, 1]`` -> the backbone's pooled embedding ``(B, num_features)``, what the
        head reads (and what ``--cache-embeddings`` stores)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            # antialias=False: the antialiased kernel has no ONNX export.
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        return self.backbone((x - self.mean) / self.std)

    def stages(self) -> list[nn.Module]:
        """The backbone's stages, bottom to top. A stage of several modules comes as an ``nn.ModuleList``.

        The stem belongs to the first stage and everything after the last feature stage (e.g. EfficientNet's
        ``conv_head``/``bn2``, ConvNeXt's final norm) to the top one, so unfreezing the top K stages unfreezes
        everything above stage K. Parameters owned directly by the backbone (a ViT's position embedding)
        belong to no stage.
        """
        groups = [[self.backbone.get_submodule(name) for name in names] for names in self._stage_names]
        return [modules[0] if len(modules) == 1 else nn.ModuleList(modules) for modules in groups]

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional stage: the layer Grad-CAM reads activations and gradients from."""
        return self.backbone.get_submodule(self._cam_name)

    @property
    def data_config(self) -> dict[str, Any]:
        """What the model does to its input, for reports and exports (rounded past float32 noise)."""
        return {
            "mean": tuple(round(v, 6) for v in self.mean.flatten().tolist()),
            "std": tuple(round(v, 6) for v in self.std.flatten().tolist()),
            "image_size": self.image_size,
        }

    def train(self, mode: bool = True) -> Classifier:
        """Switch modes, but keep frozen BatchNorm layers in eval mode.

        A frozen BatchNorm must normalise with the statistics its weights were trained with; in train mode it
        would use (and, outside Lightning, overwrite) the statistics of each small histology batch instead.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, _BatchNorm) and _is_frozen(module):
                    module.eval()
        return self


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)
