"""Train/validation/test splits of a store's labeled patches.

All stratified by label and all seeded: an untouched test hold-out first (``test_fraction``, none by default),
then of the rest a random validation hold-out (``val_fraction``) or K-fold cross-validation (``folds``/``fold``),
and any of them by group (``groups``: ``auto``, the slides recorded in the store at ingest, or a CSV of
``id,group``, e.g. the whole-slide id) so that patches of one slide never sit on both sides. A random split of
patches from the same slides is optimistic; the grouped one is what a new slide will see.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from histodetect.data.ids import shown
from histodetect.data.store import Store
from histodetect.errors import ConfigError

AUTO_GROUPS = "auto"  # ``--groups auto``: the groups the store holds (a file named auto is ``./auto``)


def groups_of(setting: str, store: Store, rows: np.ndarray) -> np.ndarray:
    """Group of each of ``rows``: those recorded in the store for ``auto``, else those of the CSV ``setting``."""
    if setting != AUTO_GROUPS:
        return read_groups(setting, store.ids[rows])
    groups = store.groups[rows]
    if not (groups != "").any():
        raise ConfigError(
            f"--groups auto: the store {store.path} holds no slide groups; ingest a PCam source with its _meta.csv "
            "files, or re-ingest with --pcam-meta DIR or --groups FILE (or give train --groups FILE)"
        )
    if (missing := np.flatnonzero(groups == "")).size:
        examples = ", ".join(shown(id_) for id_ in store.ids[rows[missing[:3]]])
        raise ConfigError(
            f"--groups auto: {missing.size} of the {len(rows)} labeled patches of {store.path} have no group, "
            f"e.g. {examples}; give train --groups FILE, or re-ingest with --groups FILE"
        )
    return groups


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


class Parts(NamedTuple):
    """Positions of the training, validation and test patches: sorted, disjoint, together every labeled one."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_rows(
    labels: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    folds: int = 1,
    fold: int = 0,
    test_fraction: float = 0.0,
) -> Parts:
    """Positions (into ``labels``) of the training, validation and test patches.

    The test part (``test_fraction``) is drawn first, from the seed alone, so every fold of a K-fold holds out the
    same test patches. Of the rest, the validation part is fold ``fold`` of a stratified K-fold when ``folds > 1``,
    otherwise a stratified hold-out of ``val_fraction``. With ``groups``, whole groups go to one side
    (StratifiedGroupKFold; a grouped hold-out takes one fold of ``round(1 / fraction)``, the closest a grouped
    split can get to the asked fraction).
    """
    rest, test = _hold_out(labels, test_fraction, seed, groups)
    labels_rest = labels[rest]
    groups_rest = None if groups is None else groups[rest]
    if folds > 1:
        _check_classes(labels_rest)
        if np.bincount(labels_rest, minlength=2).min() < folds:  # else a fold holds no patch of a class
            raise ConfigError(
                f"--folds {folds}: each class needs at least {folds} patches to split, has "
                f"{np.bincount(labels_rest, minlength=2).min()}"
            )
        positions = np.arange(len(rest))
        if groups_rest is not None:
            _check_groups(groups_rest, folds)
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            train, val = list(splitter.split(positions, labels_rest, groups_rest))[fold]
        else:
            splitter_k = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            train, val = list(splitter_k.split(positions, labels_rest))[fold]
    else:
        train, val = _hold_out(labels_rest, val_fraction, seed, groups_rest)
    return Parts(np.sort(rest[train]), np.sort(rest[val]), test)


def _hold_out(
    labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions kept and held out: a stratified hold-out of ``fraction`` (by group when given)."""
    positions = np.arange(len(labels))
    if fraction == 0:
        return positions, np.empty(0, dtype=np.int64)
    _check_classes(labels)
    if groups is not None:
        k = max(2, round(1 / fraction))
        _check_groups(groups, k)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        keep, held = next(splitter.split(positions, labels, groups))
    else:
        keep, held = train_test_split(positions, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(held)


def _check_classes(labels: np.ndarray) -> None:
    if np.bincount(labels, minlength=2).min() < 2:
        raise ConfigError("a stratified split needs at least two patches of each class")


def _check_groups(groups: np.ndarray, k: int) -> None:
    if len(np.unique(groups)) < k:
        raise ConfigError(f"a grouped split into {k} parts needs at least {k} groups; found {len(np.unique(groups))}")


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
