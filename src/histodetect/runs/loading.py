"""Reading a run back: its config and its network. Weights come from safetensors only; nothing is unpickled."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file

from histodetect.errors import ConfigError
from histodetect.models import Classifier, create_model
from histodetect.runs.config import TrainConfig, read_settings
from histodetect.runs.layout import CONFIG, WEIGHTS


def load_config(run: str | os.PathLike[str]) -> TrainConfig:
    """The run's ``config.yaml``; a bad setting's message names the file."""
    run = Path(run)
    if not (run / CONFIG).exists():
        raise FileNotFoundError(f"{run}: not a run folder (no {CONFIG}); create one with `histodetect train`")
    try:
        settings = read_settings(run / CONFIG)
        if "model" not in settings:  # train writes every setting: an empty or partial file is a damaged run
            raise ConfigError(f"{run / CONFIG}: names no model; not the config.yaml of a run")
        return TrainConfig.from_dict(settings, source=str(run / CONFIG))
    except ConfigError as exc:  # a setting's own message does not say which file holds it
        if str(run / CONFIG) in str(exc):
            raise
        raise ConfigError(f"{run / CONFIG}: {exc}") from exc


def load_model(run: str | os.PathLike[str]) -> tuple[Classifier, TrainConfig]:
    """The run's best network in eval mode, rebuilt from its config; weights come from safetensors only."""
    run = Path(run)
    config = load_config(run)
    weights = run / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{run}: no {WEIGHTS}; the run has not finished an epoch (try `train --resume`)")
    model = create_model(config.model, pretrained="none", dropout=config.dropout, image_size=config.image_size)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ConfigError(f"{weights}: unreadable weights file ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{weights}: does not fit {config.model} ({str(exc).splitlines()[0]})") from exc
    return model.eval(), config
