"""``histodetect evaluate``: a run on labeled patches -> metrics with a confidence interval and an HTML
report.

By default a run is scored on its own validation patches (``split.csv``, part ``val``); ``--split test`` scores
its untouched test patches (``train --test-fraction``), the only number no choice was made on. The metrics are
written to ``OUT/metrics.json`` (with the report) and also to ``<run>/evaluation/<split>/metrics.json``, one file
per split, so scoring ``all`` never replaces the val evaluation; ``histodetect compare`` reads only ``val`` and
``test`` there, each labelled with its split. Every metrics file names its split and its numeric precision:
fp32 by default, the arithmetic of the exported model one deploys.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from histodetect.data.augment import STAIN_SHIFTS
from histodetect.data.store import Store
from histodetect.infer.engine import InferError, PatchReader, Predictor
from histodetect.infer.predict import check_finite
from histodetect.infer.sources import StoreRows
from histodetect.io import atomic_write_json, check_output_dir
from histodetect.metrics import roc_auc
from histodetect.report.evaluation import json_safe, write_evaluation_report
from histodetect.report.metrics import binary_metrics
from histodetect.runs import load_config
from histodetect.runs.layout import STORE_SPLIT, check_store, evaluation_file, held_out_rows

RUN_PARTS = ("val", "test")  # split names that mean the run's own held-out parts


def evaluate(
    run: str | os.PathLike[str],
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "val",
    tta: str = "none",
    threshold: float = 0.5,
    precision: str = "fp32",
    stain_norm: str | None = None,
    stain_reference: str | os.PathLike[str] | None = None,
    stain_shifts: bool = False,
    stain_fit: str = "patch",
) -> dict[str, Any]:
    """Score ``run`` on ``split`` of ``store`` and write the report into ``out``; returns the metrics.

    ``split``: ``val`` or ``test`` (the run's own held-out ids: the store must be the one it was trained on),
    ``all`` (every labeled patch) or a store split, ``NAME`` or ``store:NAME`` (all of whose patches must be
    labeled).

    ``stain_shifts``: also score the same patches re-stained by each of
    :data:`~histodetect.data.augment.STAIN_SHIFTS` (as other labs' slides might look); ``metrics["stain_shifts"]``
    holds each one's ROC AUC beside the untouched one. ``stain_fit``: ``patch`` (each patch normalised by its own
    fit) or ``set`` (one fit for the patches, and one for each re-staining: each is one lab's).
    """
    run, out = Path(run), Path(out)
    check_output_dir(out)
    if not 0.0 <= threshold <= 1.0:
        raise InferError(f"--threshold {threshold}: must be within [0, 1]")
    config = load_config(run)
    data = Store(store)
    rows = _rows(run, data, split)
    patches = StoreRows(data, rows)
    predictor = Predictor([run], tta=tta, precision=precision, stain_norm=stain_norm, stain_reference=stain_reference)
    stain = predictor.fit_stain_set(patches, stain_fit)
    p = check_finite(predictor.predict(patches, label="evaluate", stain=stain), predictor.sources)
    y = data.labels[rows].astype(np.int64)
    metrics = binary_metrics(y, p, threshold=threshold)
    stain = predictor.stain.describe() if predictor.stain is not None else None  # counts of the untouched patches
    if stain_shifts:
        metrics["stain_shifts"] = _stain_shifts(predictor, patches, y, metrics["roc_auc"], stain_fit)
    metrics = {
        **metrics,
        "run": str(run),
        "model": config.model,
        "store": str(data.path),
        "store_fingerprint": data.fingerprint,
        "split": split,
        "tta": tta,
        "numeric_precision": predictor.precision,  # not "precision": that is the PPV
        "stain_norm": stain if stain is None else {**stain, "fit": stain_fit},
    }
    write_evaluation_report(
        out,
        y,
        p,
        metrics,
        patches=patches,
        ids=data.ids[rows].tolist(),
        title=f"{run.name}: {config.model} on {_described(split)} ({data.path.name})",
    )
    copy = evaluation_file(run, split)
    if copy.resolve() != (out / "metrics.json").resolve():
        atomic_write_json(copy, json_safe(metrics))
    return metrics


def score_rows(runs: list[Path], store: Store, rows: np.ndarray, *, label: str, precision: str) -> np.ndarray:
    """The mean probability of ``runs`` on ``rows`` of ``store``, through the one :class:`Predictor`: how
    ``train --all-folds`` scores its out-of-fold and test patches (the CLI hands this to
    :func:`histodetect.train.crossval.cross_validate`, since the train layer may not import this one)."""
    return Predictor(runs, precision=precision).predict(StoreRows(store, rows), label=label)


class Restained:
    """``patches`` re-stained by ``shift`` (a :class:`StainShift` or any uint8-to-uint8 re-staining) a slice at a
    time (a :class:`~histodetect.infer.engine.PatchReader`)."""

    def __init__(self, patches: PatchReader, shift: Callable[[np.ndarray], np.ndarray]) -> None:
        self.patches = patches
        self.shift = shift

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: slice) -> np.ndarray:
        return self.shift(self.patches[index])


def _stain_shifts(
    predictor: Predictor, patches: StoreRows, y: np.ndarray, untouched: float, stain_fit: str
) -> dict[str, Any]:
    """ROC AUC of the patches under each of :data:`STAIN_SHIFTS`, and its difference from the untouched one."""
    shifts: dict[str, Any] = {}
    for name, shift in STAIN_SHIFTS.items():
        shifted = Restained(patches, shift)
        auc = roc_auc(y, predictor.predict(shifted, label=name, stain=predictor.fit_stain_set(shifted, stain_fit)))
        shifts[name] = {**asdict(shift), "roc_auc": auc, "delta": auc - untouched}
    return shifts


def _described(split: str) -> str:
    return {"val": "its validation patches", "test": "its untouched test patches"}.get(split, f"split {split}")


def _rows(run: Path, store: Store, split: str) -> np.ndarray:
    """Store rows to score, sorted (sequential reads); every one labeled."""
    if split in RUN_PARTS:
        check_store(run, store)
        return held_out_rows(run, store, split)
    check_store(run, store, strict=False)
    if split == "all":
        rows = store.rows(labeled=True)
        if len(rows) == 0:
            raise InferError(f"{store.path}: no labeled patches to evaluate on")
        return rows
    name = split.removeprefix(STORE_SPLIT)
    rows = store.rows(name)
    unlabeled = int((store.labels[rows] < 0).sum())
    if unlabeled:
        raise InferError(
            f"{store.path}: split {name!r} has {unlabeled} unlabeled patch(es) of {len(rows)}; "
            "evaluation needs labels (try --split all for every labeled patch)"
        )
    return rows
