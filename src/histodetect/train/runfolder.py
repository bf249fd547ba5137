"""The run folder's contract (DEVELOPERS.md): its file names, and reading a run back.

``train`` writes a run; every later command (evaluate, predict, explain, export, slide, serve, cross-validation)
reads it through this module, so the layout is defined once and nothing in a run is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file

from histodetect.data.store import Store
from histodetect.errors import ConfigError, InferError
from histodetect.models import Classifier, create_model
from histodetect.train.config import TrainConfig

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
SPLIT = "split.csv"
CHECKPOINTS = "checkpoints"
SHOWN_IDS = 5  # ids quoted in an error message


def load_config(run: str | os.PathLike[str]) -> TrainConfig:
    run = Path(run)
    if not (run / CONFIG).exists():
        raise FileNotFoundError(f"{run}: not a run folder (no {CONFIG}); create one with `histodetect train`")
    try:
        return TrainConfig.load(run / CONFIG)
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


def held_out_rows(run: Path, store: Store) -> np.ndarray:
    """Rows of the run's validation ids; an id the store lacks means it is not the store the run was trained
    on."""
    path = run / SPLIT
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {SPLIT}, so its held-out patches are unknown; pass --split all or a split")
    table = pd.read_csv(path, dtype={"id": str, "part": str}, keep_default_na=False)
    ids = table.loc[table["part"] == "val", "id"].to_numpy()
    if len(ids) == 0:
        raise InferError(f"{path}: the run held out no patches (val_fraction 0?); pass --split all or a split")
    row_of = pd.Series(np.arange(len(store)), index=store.ids)
    missing = [i for i in ids if i not in row_of.index]
    if missing:
        shown = ", ".join(missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
        raise InferError(
            f"{store.path}: lacks {len(missing)} of the {len(ids)} held-out ids of {run} ({shown}); "
            "evaluate on the store the run was trained on, or pass --split"
        )
    rows = np.sort(row_of.loc[ids].to_numpy())
    if (store.labels[rows] < 0).any():
        raise InferError(f"{store.path}: some held-out ids of {run} are unlabeled in this store")
    return rows
