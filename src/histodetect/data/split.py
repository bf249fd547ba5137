"""Train/validation splits of a store's labeled patches.

Three ways, all stratified by label and all seeded: a random hold-out (``val_fraction``), K-fold cross-validation
(``folds``/``fold``), and either of them by group (``groups``: a CSV of ``id,group``, e.g. the whole-slide id) so
that patches of one slide never sit on both sides. A random split of patches from the same slides is optimistic;
the grouped one is what a new slide will see.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from histodetect.errors import ConfigError


def read_groups(path: str | os.PathLike[str], ids: np.ndarray) -> np.ndarray:
    """Group of each id, from a CSV with ``id`` and ``group`` columns; every id must have one."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read groups CSV ({exc})") from exc
    missing_cols = {"id", "group"} - set(frame.columns)
    if missing_cols:
        raise ConfigError(f"{path}: groups CSV needs columns id,group; missing {sorted(missing_cols)}")
    conflicts = frame.groupby("id")["group"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise ConfigError(f"{path}: {len(conflicts)} id(s) listed in several groups, e.g. {list(conflicts.index[:3])}")
    mapping = frame.drop_duplicates("id").set_index("id")["group"]
    groups = mapping.reindex(ids)
    absent = ids[groups.isna().to_numpy()]
    if len(absent):
        raise ConfigError(f"{path}: {len(absent)} training id(s) have no group, e.g. {list(absent[:3])}")
    return groups.to_numpy()


def split_rows(
    labels: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    folds: int = 1,
    fold: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of the training and validation patches.

    With ``folds > 1`` the validation part is fold ``fold`` of a stratified K-fold; otherwise a stratified hold-out of
    ``val_fraction``. With ``groups``, whole groups go to one side (StratifiedGroupKFold; a hold-out by group takes
    one fold of ``round(1 / val_fraction)``, the closest a grouped split can get to the asked fraction).
    """
    n = len(labels)
    positions = np.arange(n)
    if folds <= 1 and val_fraction == 0:
        return positions, np.empty(0, dtype=np.int64)
    if np.bincount(labels, minlength=2).min() < 2:
        raise ConfigError("a stratified split needs at least two patches of each class")
    if groups is not None:
        k = folds if folds > 1 else max(2, round(1 / val_fraction))
        if len(np.unique(groups)) < k:
            raise ConfigError(
                f"a grouped split into {k} parts needs at least {k} groups; found {len(np.unique(groups))}"
            )
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = list(splitter.split(positions, labels, groups))
        train, val = parts[fold if folds > 1 else 0]
        return np.sort(train), np.sort(val)
    if folds > 1:
        splitter_k = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = list(splitter_k.split(positions, labels))[fold]
        return np.sort(train), np.sort(val)
    train, val = train_test_split(positions, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``size`` of ``labels``, with the class balance of the whole (all when ``size`` covers
    them): a smaller validation set that still measures the same thing."""
    if size >= len(labels):
        return np.arange(len(labels))
    try:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    except ValueError:  # too few to hold every class in proportion (size below the number of classes)
        keep = np.random.default_rng(seed).choice(len(labels), size, replace=False)
    return np.sort(keep)
