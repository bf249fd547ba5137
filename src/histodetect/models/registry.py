"""Build the network for a run from a name: ``baseline-cnn`` or any timm architecture, always behind one head.

Every model is a :class:`~histodetect.models.classifier.Classifier`; this module picks its backbone, stages and
normalisation by name, and :mod:`histodetect.models.pretrained` puts its starting weights in. Neither of those
imports this module.
"""

from __future__ import annotations

import difflib
import fnmatch

import timm
from timm.data import resolve_model_data_config
from torch import nn

from histodetect.data.store import PATCH_SHAPE
from histodetect.models.baseline import MEAN as BASELINE_MEAN
from histodetect.models.baseline import STD as BASELINE_STD
from histodetect.models.baseline import BaselineCNN
from histodetect.models.classifier import Classifier
from histodetect.models.pretrained import HF_HUB, ModelError, hub_errors, load_pretrained

BASELINE = "baseline-cnn"


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
