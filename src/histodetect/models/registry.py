"""Build the network for a run from a name: ``baseline-cnn`` or any timm architecture, always behind one head.

Every model is a ``Classifier``: the caller hands it RGB in ``[0, 1]`` at whatever size the patches have, and
the model resizes and normalises itself with buffers, so the preprocessing travels with ``model.safetensors``
and into ONNX instead of being re-implemented (and drifting) in every command that runs a model.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from histodetect.data.store import PATCH_SHAPE
from histodetect.models.baseline import MEAN as BASELINE_MEAN
from histodetect.models.baseline import STD as BASELINE_STD
from histodetect.models.baseline import BaselineCNN
from histodetect.models.pretrained import HF_HUB, ModelError, hub_errors, load_pretrained

BASELINE = "baseline-cnn"


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


# ---------------------------------------------------------------------------------------------- building
def create_model(
    name: str, *, pretrained: str = "none", dropout: float = 0.0, image_size: int | str = 96
) -> Classifier:
    """Build ``name`` (``baseline-cnn``, a timm model name, or ``hf-hub:ORG/NAME``) and load weights as
    ``pretrained`` says.

    ``image_size``: pixels a side the network sees; ``"auto"`` takes the backbone's pretrained input size (the
    baseline CNN's is the native 96).

    ``pretrained``: ``"none"`` (random init), ``"auto"`` (the weights available offline for this model, see
    ``histodetect.models.pretrained``) or a path to a ``.safetensors``/``.pth`` file. Raises ``ModelError`` (a
    ``ValueError``) for an unknown name or weights that cannot be loaded.
    """
    model = _build_baseline(dropout, image_size) if name == BASELINE else _build_timm(name, dropout, image_size)
    load_pretrained(model, pretrained)
    return model


def list_models(pattern: str = "*") -> list[str]:
    """Model names matching a shell-style pattern: ``baseline-cnn`` first, then timm's architectures."""
    import timm  # here, not at the top: timm pulls in torchvision and torch._dynamo (~1 s, ~100 MB), which a
    # command running a cached ONNX export never needs

    own = [BASELINE] if fnmatch.fnmatch(BASELINE, pattern) else []
    return own + timm.list_models(pattern)


def _build_baseline(dropout: float, image_size: int | str) -> Classifier:
    backbone = BaselineCNN()
    blocks = [f"blocks.{i}" for i in range(len(backbone.blocks))]
    return Classifier(
        BASELINE,
        backbone,
        num_features=backbone.num_features,
        mean=BASELINE_MEAN,
        std=BASELINE_STD,
        image_size=PATCH_SHAPE[0] if image_size == "auto" else int(image_size),
        dropout=dropout,
        stage_names=[[block] for block in blocks],
        cam_name=blocks[-1],
    )


def _build_timm(name: str, dropout: float, image_size: int | str) -> Classifier:
    import timm  # see list_models
    from timm.data import resolve_model_data_config

    if name.startswith(HF_HUB):
        with hub_errors(name):  # the architecture and its settings come from the hub's config.json (or its cache)
            backbone = timm.create_model(name, pretrained=False, num_classes=0)
    elif timm.is_model(name):
        # num_classes=0: timm keeps its own global pooling and returns (B, num_features); the head is ours.
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
    else:
        raise ModelError(_unknown_name_message(name))
    # mean/std and input size from the backbone's pretrained_cfg (timm's defaults for the rare model without one).
    data = resolve_model_data_config(backbone)
    features = _feature_modules(backbone)
    return Classifier(
        name,
        backbone,
        # The width of what forward returns: larger than num_features where a head conv follows the pooling.
        num_features=getattr(backbone, "head_hidden_size", None) or backbone.num_features,
        mean=data["mean"],
        std=data["std"],
        image_size=int(data["input_size"][-1]) if image_size == "auto" else int(image_size),
        dropout=dropout,
        stage_names=_partition(backbone, features) if features else [[""]],
        cam_name=features[-1] if features else "",
    )


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.75)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown model {name!r}: use {BASELINE!r} or a timm model name "
        f"(list them with python -c \"import timm; print(timm.list_models('*resnet*'))\").{hint}"
    )


def _feature_modules(backbone: nn.Module) -> list[str]:
    """Names of the modules timm reports as feature stages (its ``feature_info``), bottom to top.

    Empty for the few architectures without ``feature_info``: they get the whole backbone (name ``""``) as
    their one stage and CAM layer, so freezing still works and only ``top:K`` has nothing finer to unfreeze.
    """
    return [entry["module"] for entry in getattr(backbone, "feature_info", None) or []]


def _partition(backbone: nn.Module, features: list[str]) -> list[list[str]]:
    """Split the backbone's modules, in forward order, into one group per feature stage.

    Each group runs from just after the previous feature module up to and including its own, so the stem joins
    the first stage and anything after the last feature module (head convs, final norms) joins the top one.
    Modules without parameters are left out: there is nothing in them to freeze.
    """
    groups: list[list[str]] = [[]]
    for name in _units(backbone, set(features)):
        groups[-1].append(name)
        if name in features and len(groups) < len(features):
            groups.append([])
    with_params = [[n for n in group if _has_params(backbone.get_submodule(n))] for group in groups]
    return [group for group in with_params if group]


def _units(module: nn.Module, features: set[str], prefix: str = "") -> list[str]:
    """The backbone's submodules in registration (= forward, for timm) order, descending only where a feature
    module lies deeper, so every feature module is one unit and the units cover the whole backbone."""
    units: list[str] = []
    for child_name, child in module.named_children():
        name = prefix + child_name
        if name in features or not any(f.startswith(name + ".") for f in features):
            units.append(name)
        else:
            units.extend(_units(child, features, name + "."))
    return units


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


# ---------------------------------------------------------------------------------------------- freezing
def freeze_backbone(model: Classifier) -> None:
    """Freeze every backbone parameter (the head stays trainable); frozen BatchNorms switch to eval mode."""
    model.backbone.requires_grad_(False)
    model.train(model.training)


def unfreeze_top(model: Classifier, k: int) -> list[nn.Module]:
    """Make the top ``k`` stages trainable again and return them (to add as an optimiser parameter group).

    If the freezing is done elsewhere (Lightning's ``BaseFinetuning``), call ``model.train(model.training)``
    after it so that BatchNorm modes follow what is frozen.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    stages = model.stages()[-k:]
    for stage in stages:
        stage.requires_grad_(True)
    model.train(model.training)
    return stages
