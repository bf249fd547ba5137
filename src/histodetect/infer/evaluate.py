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
import re
from pathlib import Path
from typing import Any

import numpy as np

from histodetect.data.store import Store
from histodetect.infer.engine import InferError, Predictor
from histodetect.infer.predict import check_finite
from histodetect.infer.sources import StoreRows
from histodetect.io import atomic_write_json, check_output_dir
from histodetect.report.evaluation import json_safe, write_evaluation_report
from histodetect.report.metrics import binary_metrics
from histodetect.train.runfolder import EVALUATION, check_store, held_out_rows, load_config, store_fingerprint

RUN_PARTS = ("val", "test")  # split names that mean the run's own held-out parts
STORE_SPLIT = "store:"  # prefix naming a store split, for a store whose split is called val or test


def run_evaluation(run: Path, split: str) -> Path:
    """Where evaluate keeps its metrics for ``split`` inside the run folder: ``evaluation/<split>/metrics.json``
    (a store split ``store:NAME`` as ``store-NAME``, any character outside ``[A-Za-z0-9_.-]`` as ``_``)."""
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", split.replace(STORE_SPLIT, "store-", 1))
    return run / EVALUATION / folder / "metrics.json"


def evaluate(
    run: str | os.PathLike[str],
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "val",
    tta: str = "none",
    threshold: float = 0.5,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Score ``run`` on ``split`` of ``store`` and write the report into ``out``; returns the metrics.

    ``split``: ``val`` or ``test`` (the run's own held-out ids: the store must be the one it was trained on),
    ``all`` (every labeled patch) or a store split, ``NAME`` or ``store:NAME`` (all of whose patches must be
    labeled).
    """
    run, out = Path(run), Path(out)
    check_output_dir(out)
    if not 0.0 <= threshold <= 1.0:
        raise InferError(f"--threshold {threshold}: must be within [0, 1]")
    config = load_config(run)
    data = Store(store)
    rows = _rows(run, data, split)
    patches = StoreRows(data, rows)
    predictor = Predictor([run], tta=tta, precision=precision)
    p = check_finite(predictor.predict(patches, label="evaluate"), predictor.sources)
    y = data.labels[rows].astype(np.int64)
    metrics = {
        **binary_metrics(y, p, threshold=threshold),
        "run": str(run),
        "model": config.model,
        "store": str(data.path),
        "store_fingerprint": store_fingerprint(data),
        "split": split,
        "tta": tta,
        "numeric_precision": predictor.precision,  # not "precision": that is the PPV
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
    copy = run_evaluation(run, split)
    if copy.resolve() != (out / "metrics.json").resolve():
        atomic_write_json(copy, json_safe(metrics))
    return metrics


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
