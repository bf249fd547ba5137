"""One typed object describes a training run; it is saved as ``config.yaml`` in every run folder.

Precedence when a run is configured: the defaults below < ``--preset`` < ``--config FILE`` < flags given on the
command line, and each layer overrides only the keys it sets (a file that sets ``lr`` keeps the preset's model).
Every value is checked against the field's type annotation and coerced where that is unambiguous (YAML 1.1 reads
``1e-3`` as a string), so a wrong type is one line naming the key before any run folder is made.
``CONFIG_VERSION`` is bumped whenever a field changes meaning, and older files are refused with a message rather
than misread.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from histodetect.data.stain import METHODS as STAIN_METHODS
from histodetect.errors import ConfigError
from histodetect.io import atomic_write_text

CONFIG_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings; anything larger is refused before it is parsed
MAX_SEED = 2**32 - 1
PRECISIONS = ("auto", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true", "64", "64-true")
DEVICES = re.compile(r"auto|[0-9]+(,[0-9]+)*,?")  # auto, a count, or a list of device numbers
MAX_WORKERS = 64  # DataLoader processes: more only exhausts memory (as slide --workers)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024  # below 32 px a CNN pools to nothing; above 1024 a batch fills any GPU
MIN_MPP, MAX_MPP = 0.05, 50.0  # microns a pixel: below any optical scanner, above a 0.2x thumbnail

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULERS = ("cosine", "onecycle", "plateau", "none")
LOSSES = ("bce", "focal")
LOGGERS = ("csv", "tensorboard", "mlflow")  # csv (metrics.csv) is always written; the others add to it


@dataclass
class TrainConfig:
    """Everything that decides what a training run does. Field comments are the user-facing documentation."""

    # model
    model: str = "baseline-cnn"  # a registry name: baseline-cnn, or any timm model name
    pretrained: str = "auto"  # auto | none | path to a .safetensors/.pth file
    freeze: str = "none"  # none | frozen | top:K (head first, then the top K stages after warmup_epochs)
    warmup_epochs: int = 1  # epochs of head-only training before top:K stages are unfrozen
    backbone_lr_scale: float = 0.1  # learning rate of unfrozen backbone layers, as a fraction of lr
    dropout: float = 0.3
    # Pixels a side the network sees (patches are resized, bilinear): 96 = native; "auto" = the backbone's own
    # pretrained input size (224 for most ImageNet models: ~5x the compute of 96).
    image_size: int | str = 96
    # Microns per pixel of the training patches: PCam and the Kaggle data are Camelyon16's 40x scans (0.243 um/px)
    # downsampled 4x. `slide` resamples every slide to this scale.
    mpp: float = 0.972
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd and rmsprop only
    batch_size: int = 64
    epochs: int = 10
    scheduler: str = "cosine"
    lr_warmup_epochs: float = 0.0  # linear warm-up of the learning rate, in epochs (fractions allowed)
    # loss
    loss: str = "bce"
    pos_weight: float | None = None  # bce only: weight of the positive class
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    label_smoothing: float = 0.0
    # augmentation, applied to whole batches as tensors
    aug_dihedral: bool = True  # the 8 flips and 90-degree rotations
    aug_hed: float = 0.05  # strength of H&E colour perturbation (0 = off)
    aug_brightness: float = 0.1  # 0 = off
    aug_contrast: float = 0.1  # 0 = off
    # Another lab's staining, per sample (data/augment.py stain_jitter): H and E amounts times exp(U(-s, s)), H/E
    # bleeding into each other, a yellow cast and a white balance outside H&E; 0 = off, 0.5 = strong.
    stain_aug: float = 0.0
    # Weight of a loss asking for the same prediction on a patch and on its re-staining (loss/consistency.py): each
    # batch is followed by its patches re-stained at stain_aug's strength (twice the compute); 0 = off.
    stain_consistency: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off
    # stain normalisation (data/stain.py), before augmentation and in every command that scores this run
    stain_norm: str = "none"  # none | macenko | reinhard
    # The target's look: an image (a patch or region of the target lab) or a stain.json; None = the run's own
    # training patches (recorded in the run folder's stain.json either way)
    stain_reference: str | None = None
    # validation
    # An untouched test split, drawn first (stratified, by group with ``groups``) and held out of every fold: no
    # training, checkpoint choice, early stopping or tuning sees it; ``evaluate --split test`` scores it.
    test_fraction: float = 0.0
    val_fraction: float = 0.2  # stratified hold-out of what the test split leaves; ignored when folds > 1
    groups: str | None = None  # auto (the store's slides) or a CSV of id,group: each group kept on one side
    folds: int = 1  # K-fold cross-validation when > 1 ...
    fold: int = 0  # ... and this is the fold held out
    patience: int = 5  # early stopping on validation ROC AUC; 0 = off
    max_time: float | None = None  # minutes; stops cleanly and keeps the best checkpoint
    limit_train: int | None = None  # use at most this many training patches (quick looks, tests)
    # An epoch of at most this many training patches, a fresh random draw each epoch (None = the whole training
    # split): on a large store validation, checkpoints, early stopping and the LR schedule keep the pace they have
    # on a small one, and a time budget never ends a run before its first validation.
    epoch_patches: int | None = None
    val_patches: int | None = None  # validate each epoch on a fixed stratified subset of this size (None = all)
    # weight averaging (train/averaging.py): validation, the best checkpoint and model.safetensors use the average
    ema: float | None = None  # exponential moving average of the weights with this decay per step; 0 = off
    swa_epochs: int = 0  # stochastic weight averaging: equal average of the weights after each of the last N epochs
    # linear probe (train/embeddings.py): with freeze=frozen, embed every labeled patch once (8 dihedral views
    # when aug_dihedral, else 1) and train the head on the cached embeddings
    cache_embeddings: bool = False
    cache_dir: str | None = None  # None = $HISTODETECT_CACHE/embeddings, else ~/.cache/histodetect/embeddings
    # hardware
    seed: int = 42
    accelerator: str = "auto"  # auto | cpu | cuda | gpu | mps
    devices: str = "auto"  # auto, a count, or a list like "0,1"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...: handed to Lightning unchanged
    precision: str = "auto"  # auto | 32 | bf16-mixed | 16-mixed
    channels_last: bool | None = None  # None = on for conv nets where it helps (GPU, and CPU with bf16)
    compile: bool = False  # torch.compile the model (GPU)
    num_workers: int | None = None  # DataLoader workers; None = chosen from the device
    logger: str = "csv"  # comma list of csv, tensorboard, mlflow
    preset: str | None = None  # the preset these values started from, for the record
    version: int = CONFIG_VERSION
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hints = _field_types()
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        for f in fields(self):  # NaN passes every comparison below, and inf trains NaN: no number may be either
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, not {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}")
        if any(name.strip() not in LOGGERS for name in self.logger.split(",")):
            raise ConfigError(f"logger must be a comma list of {', '.join(LOGGERS)}, not {quoted(self.logger)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        freeze_top_k(self.freeze)  # raises on a bad value
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"val_fraction + test_fraction must leave patches to train on, not {self.val_fraction}"
                f" + {self.test_fraction}"
            )
        if self.folds < 1 or not 0 <= self.fold < max(self.folds, 1):
            raise ConfigError(f"fold must be in [0, folds), got fold={self.fold} folds={self.folds}")
        if self.image_size != "auto" and not (
            isinstance(self.image_size, int) and MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE
        ):
            raise ConfigError(
                f"image_size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels or auto, not {quoted(self.image_size)}"
            )
        if not MIN_MPP <= self.mpp <= MAX_MPP:
            raise ConfigError(f"mpp must be {MIN_MPP}..{MAX_MPP} microns a pixel, not {self.mpp}")
        for name in ("lr", "batch_size", "epochs", "pos_weight", "max_time"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.focal_alpha > 1.0:  # a negative alpha turns the class weighting off (loss.focal)
            raise ConfigError(f"focal_alpha must be at most 1 (negative: off), not {self.focal_alpha}")
        for name in ("lr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        for name in (
            "weight_decay",
            "momentum",
            "label_smoothing",
            "mixup",
            "cutmix",
            "warmup_epochs",
            "backbone_lr_scale",
            "lr_warmup_epochs",
            "focal_gamma",
            "aug_hed",
            "aug_brightness",
            "aug_contrast",
            "swa_epochs",
            "patience",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        for name in ("limit_train", "epoch_patches", "val_patches"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive or unset, not {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {quoted(self.precision)}")
        if not DEVICES.fullmatch(self.devices) or self.devices.strip(", ") in ("", "0"):
            raise ConfigError(
                f"devices must be auto, a count of at least 1 or a list like 0,1, not {quoted(self.devices)}"
            )
        if self.num_nodes < 1:
            raise ConfigError(f"num_nodes must be at least 1, not {self.num_nodes}")
        if not 0 <= self.seed <= MAX_SEED:  # what numpy's generators accept
            raise ConfigError(f"seed must be 0..{MAX_SEED}, not {quoted(self.seed)}")
        if self.num_workers is not None and not 0 <= self.num_workers <= MAX_WORKERS:  # each forks the process
            raise ConfigError(f"num_workers must be 0..{MAX_WORKERS} loader processes, not {self.num_workers}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be a decay in (0, 1), e.g. 0.998, or 0 for none, not {self.ema}")
        if not 0 <= self.swa_epochs <= self.epochs:
            raise ConfigError(f"swa_epochs must be in [0, epochs={self.epochs}], not {self.swa_epochs}")
        if self.ema and self.swa_epochs:
            raise ConfigError(
                "ema and swa_epochs are two ways to average the weights: choose one (--ema 0 turns off a preset's EMA)"
            )
        if self.cache_embeddings and self.freeze != "frozen":
            raise ConfigError(f"cache_embeddings needs freeze=frozen (a fixed backbone), not {self.freeze!r}")
        if self.cache_embeddings and (self.mixup or self.cutmix):
            raise ConfigError("cache_embeddings cannot mix patches (mixup/cutmix need the pixels): set them to 0")
        if self.stain_norm not in STAIN_METHODS:
            raise ConfigError(f"stain_norm must be one of {STAIN_METHODS}, not {self.stain_norm!r}")
        if not 0.0 <= self.stain_aug < 1.0:
            raise ConfigError(f"stain_aug must be in [0, 1), not {self.stain_aug}")
        if self.stain_consistency < 0 or (self.stain_consistency and not self.stain_aug):
            raise ConfigError(
                f"stain_consistency must be >= 0 and needs stain_aug > 0 (the strength of the re-stainings it "
                f"compares), not {self.stain_consistency} with stain_aug {self.stain_aug}"
            )
        if self.stain_consistency and self.cache_embeddings:
            raise ConfigError(
                "cache_embeddings cannot re-stain patches (stain_consistency needs the pixels): set it to 0"
            )
        if self.cache_embeddings and self.stain_norm != "none":
            raise ConfigError("cache_embeddings embeds the stored pixels: it cannot normalise stains (stain_norm none)")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is not supported (expected {CONFIG_VERSION})")

    # ---- persistence ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = "config") -> TrainConfig:
        """A config from a mapping; errors start with ``source`` (the file's path) unless it is None."""
        prefix = f"{source}: " if source else ""
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            listed = ", ".join(quoted(k) for k in unknown[:10]) + (
                f" and {len(unknown) - 10:,} more" if len(unknown) > 10 else ""
            )
            raise ConfigError(f"{prefix}unknown setting(s) {listed}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainConfig:
        return cls.from_dict(read_settings(path), source=str(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a YAML file sets, as written (not yet coerced): only these override a lower layer.

    Hostile files are bounded before parsing: at most ``MAX_CONFIG_BYTES``, UTF-8, and no YAML aliases (a config
    never needs one, and an alias bomb expands a small file into billions of values)."""
    path = Path(path)
    data = safe_yaml(path, "configuration") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing anchors and aliases (the expansion of an alias bomb)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
            raise yaml.YAMLError(
                f"YAML anchors and aliases are not allowed (line {self.peek_event().start_mark.line + 1})"
            )
        return super().compose_node(parent, index)


def safe_yaml(path: Path, what: str) -> Any:
    """A small YAML file parsed safely, or a one-line ConfigError naming ``path``: too large, not UTF-8, not YAML,
    or using anchors/aliases."""
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read for good
            raise ConfigError(f"{path}: not a regular file; cannot read {what}")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes; a {what} file is at most {MAX_CONFIG_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); cannot read {what}") from None
    except (OSError, yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(
            f"{path}: cannot read {what} ({quoted(str(exc).splitlines()[0] if str(exc) else exc)})"
        ) from None


def quoted(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never quotes a whole hostile value."""
    if isinstance(value, (dict, list, tuple, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value):,} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the annotated type ``hint``, or a ConfigError naming ``name`` and ``value``.

    Unambiguous conversions only: a number written as text (``"1e-3"``) to a float or int, an integral float to an
    int, a number to text (``devices: 2``). A bool is never taken for a number, nor a number for a bool.
    """
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    if value is None and type(None) in options:
        return None
    for kind in [o for o in options if o is not type(None)]:  # the first that takes the value wins
        converted = _as(kind, value)
        if converted is not _NO:
            return converted
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options).replace("NoneType", "unset")
    raise ConfigError(f"{name}: expected {wanted}, not {quoted(value)}")


_NO = object()


def _as(kind: Any, value: Any) -> Any:
    """``value`` converted to ``kind``, or ``_NO``."""
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):
        return _NO
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        return _NO
    if kind is float:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if kind is str:
        return value if isinstance(value, str) else str(value) if isinstance(value, int | float) else _NO
    if typing.get_origin(kind) is dict:
        return dict(value) if isinstance(value, dict) else _NO
    return value


def freeze_top_k(freeze: str) -> int | None:
    """Parse a freeze policy: None for 'none', 0 for 'frozen', K for 'top:K'."""
    if freeze == "none":
        return None
    if freeze == "frozen":
        return 0
    if freeze.startswith("top:"):
        try:
            k = int(freeze.split(":", 1)[1])
        except ValueError:
            k = -1
        if k >= 1:
            return k
    raise ConfigError(f"freeze must be none, frozen or top:K with K >= 1, not {freeze!r}")


# Presets: the settings that gave the best validation AUC for the time on that hardware (docs/training.md).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        # Measured on a 2-core AVX2 CPU (fp32, channels_last) with the 5,000-patch hcd-subset, 4,000 trained on and a
        # 1,000-patch test split never seen: ROC AUC 0.9676, 0.9747 with d4 TTA, in 18 min 15 s (docs). Against the
        # earlier preset (backbone at 0.1x, no EMA, 12 epochs): 0.969 with TTA on a held-out 1,000 (the backbone rate
        # and EMA were changed together, not measured one at a time). EMA 0.995 averages over ~3 epochs of steps.
        "model": "tf_efficientnet_lite0",
        "pretrained": "auto",
        "freeze": "none",
        "backbone_lr_scale": 1.0,
        "image_size": 128,
        "batch_size": 64,
        "epochs": 10,
        "lr": 1e-3,
        "ema": 0.995,
        "lr_warmup_epochs": 0.5,
        "scheduler": "cosine",
        "max_time": 18.0,
        # The same pace on any store: 10 epochs of 4,096 patches (the 4,000 of hcd-subset's training split are all
        # of an epoch), validation on at most 4,096 of the held-out patches.
        "epoch_patches": 4096,
        "val_patches": 4096,
    },
    "gpu": {
        "model": "resnet50",
        "pretrained": "auto",
        "freeze": "none",
        "image_size": 96,
        "batch_size": 512,
        "epochs": 15,
        "lr": 1e-3,
        "lr_warmup_epochs": 1.0,
        "scheduler": "cosine",
        "precision": "bf16-mixed",
        "mixup": 0.2,
    },
}


def build_config(
    *, preset: str | None = None, config_file: str | os.PathLike[str] | None = None, **overrides: Any
) -> TrainConfig:
    """Resolve defaults < preset < config file < overrides, each layer overriding only the keys it sets
    (``None`` overrides are unset flags)."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        data.update(PRESETS[preset], preset=preset)
    if config_file is not None:
        settings = read_settings(config_file)
        TrainConfig.from_dict(settings, source=str(config_file))  # a bad value in the file is named with the file
        data.update(settings)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data, source=None)  # the file was checked above: what is left is a flag
