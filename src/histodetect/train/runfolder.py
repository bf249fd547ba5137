"""The run folder's contract (DEVELOPERS.md): its file names, and reading a run back.

``train`` writes a run; every later command (evaluate, predict, explain, export, slide, serve, cross-validation)
reads it through this module, so the layout is defined once and nothing in a run is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file

from histodetect.data.stain import (
    STAIN_FILE,
    StainFit,
    fit_stains,
    read_reference,
    reference_patches,
    spread,
    write_reference,
)
from histodetect.data.store import INDEX, MANIFEST, Store
from histodetect.errors import ConfigError, InferError, StoreError
from histodetect.io import atomic_write_json
from histodetect.models import Classifier, create_model
from histodetect.train.config import TrainConfig, read_settings

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
SPLIT = "split.csv"
CHECKPOINTS = "checkpoints"
STORE = "store.json"  # the store the run was trained on: path and fingerprint
EVALUATION = "evaluation"  # evaluation/<split>/metrics.json, one per split evaluate scored
PARTS = ("train", "val", "test")  # the parts of split.csv
SHOWN_IDS = 5  # ids quoted in an error message


def load_config(run: str | os.PathLike[str]) -> TrainConfig:
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


def store_fingerprint(store: Store) -> str:
    """What a store holds, in one string: the SHA-256 of its ``manifest.json`` and ``index.csv`` (ids, labels,
    splits and each patch's SHA-1), so a re-ingested or edited store at the same path is told apart."""
    digest = hashlib.sha256()
    for name in (MANIFEST, INDEX):
        digest.update((store.path / name).read_bytes())
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def record_store(run: Path, store: Store) -> Path:
    """Write ``store.json``: where the run's patches came from and their fingerprint (see :func:`check_store`)."""
    return atomic_write_json(run / STORE, {"path": str(store.path.resolve()), "fingerprint": store_fingerprint(store)})


def record_stain(run: Path, store: Store, rows: np.ndarray, config: TrainConfig) -> StainFit:
    """Write ``stain.json``: the stain reference the run normalises to, and its source. ``--stain-reference`` when
    given; else fitted on up to 512 of the run's training patches (``rows``), so that any command can normalise to
    this run's own training data without a flag, whichever ``--stain-norm`` it chooses. A resumed run keeps its
    file."""
    path = run / STAIN_FILE
    if path.is_file():
        return read_reference(path)
    if config.stain_reference is not None:
        reference, source = read_reference(config.stain_reference), str(config.stain_reference)
    else:
        patches = reference_patches(store.read(rows[spread(len(rows))]))
        reference, source = fit_stains(patches), f"{len(patches)} training patches of {store.path}"
    write_reference(path, reference, source=source)
    return reference


def run_stain(run: Path) -> StainFit | None:
    """The stain reference ``run`` recorded (``stain.json``), or None for a run from before references were
    recorded."""
    path = Path(run) / STAIN_FILE
    return read_reference(path) if path.is_file() else None


def check_store(run: Path, store: Store, *, strict: bool = True) -> None:
    """Refuse a store that differs from the one ``run`` was trained on, naming both.

    ``strict`` (resume; evaluate on the run's own val/test ids): any other store is refused. Otherwise (predict,
    evaluate on a store split) another store is fine, but the store at the run's recorded path must still hold
    what it held. Runs from before ``store.json`` existed are not checked.
    """
    path = run / STORE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not readable JSON ({str(exc)[:80]}); the run folder is damaged") from None
    if not isinstance(recorded, dict):
        raise StoreError(f"{path}: a JSON {type(recorded).__name__}, not a run's store record; the run is damaged")
    now = store_fingerprint(store)
    if now == recorded.get("fingerprint"):
        return
    if not strict and Path(recorded.get("path", "")) != store.path.resolve():
        return
    raise StoreError(
        f"{store.path} ({now[:19]}) is not the store {run} was trained on: {recorded.get('path')} "
        f"({str(recorded.get('fingerprint'))[:19]}); use that store, or train a new run on this one"
    )


def read_split(run: Path, store: Store, parts: tuple[str, ...] = PARTS) -> dict[str, np.ndarray]:
    """Sorted store rows of each of ``parts`` of the run's ``split.csv`` (empty when the run has none of a part).

    An id the store lacks means it is not the store the run was trained on: a StoreError naming a few.
    """
    path = run / SPLIT
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {SPLIT}, so its held-out patches are unknown; pass --split all or a split")
    try:
        table = pd.read_csv(path, dtype={"id": str, "part": str}, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not a readable CSV ({str(exc)[:80]}); the run folder is damaged") from None
    if not {"id", "part"} <= set(table.columns):
        raise StoreError(f"{path}: no id and part columns; the run folder is damaged")
    row_of = pd.Series(np.arange(len(store)), index=store.ids)
    rows: dict[str, np.ndarray] = {}
    for part in parts:
        ids = table.loc[table["part"] == part, "id"].to_numpy()
        missing = [i for i in ids if i not in row_of.index]
        if missing:
            shown = ", ".join(missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
            raise StoreError(
                f"{store.path}: lacks {len(missing)} of the {len(ids)} {part} ids of {run} ({shown}); "
                "use the store the run was trained on"
            )
        rows[part] = np.sort(row_of.loc[ids].to_numpy()).astype(np.int64)
    return rows


def held_out_rows(run: Path, store: Store, part: str = "val") -> np.ndarray:
    """Rows of the run's held-out ``part`` (val or test), every one labeled."""
    rows = read_split(run, store, (part,))[part]
    if len(rows) == 0:
        how = "--val-fraction 0?" if part == "val" else "train with --test-fraction F to have one"
        raise InferError(f"{run / SPLIT}: the run held out no {part} patches ({how}); pass --split all or a split")
    if (store.labels[rows] < 0).any():
        raise InferError(f"{store.path}: some {part} ids of {run} are unlabeled in this store")
    return rows
