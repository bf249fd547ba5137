"""``histodetect evaluate``: a run on labeled patches -> metrics with a confidence interval and an HTML
report.

By default a run is scored on its own held-out patches (``split.csv``, part ``val``): the only patches of a
training store it has not been fitted on. The metrics are written to ``OUT/metrics.json`` (with the report)
and also to ``<run>/evaluation/metrics.json``, where ``histodetect compare`` looks for a run's evaluated AUC
and its interval: the run folder stays the one place that describes a run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from histodetect.data.store import Store
from histodetect.infer.engine import InferError, Predictor
from histodetect.infer.sources import StoreRows
from histodetect.io import atomic_write_json, check_output_dir
from histodetect.report.evaluation import json_safe, write_evaluation_report
from histodetect.report.metrics import binary_metrics
from histodetect.train.runfolder import held_out_rows, load_config

RUN_EVALUATION = Path("evaluation") / "metrics.json"  # inside the run folder; read by histodetect compare
SHOWN_IDS = 5


def evaluate(
    run: str | os.PathLike[str],
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "val",
    tta: str = "none",
    threshold: float = 0.5,
    precision: str = "auto",
) -> dict[str, Any]:
    """Score ``run`` on ``split`` of ``store`` and write the report into ``out``; returns the metrics.

    ``split``: ``val`` (the run's own held-out ids, all of which must be in the store), ``all`` (every labeled
    patch) or the name of a store split (all of whose patches must be labeled).
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
    p = predictor.predict(patches, label="evaluate")
    y = data.labels[rows].astype(np.int64)
    metrics = {
        **binary_metrics(y, p, threshold=threshold),
        "run": str(run),
        "model": config.model,
        "store": str(data.path),
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
        title=f"{run.name}: {config.model} on {split} ({data.path.name})",
    )
    copy = run / RUN_EVALUATION
    if copy.resolve() != (out / "metrics.json").resolve():
        atomic_write_json(copy, json_safe(metrics))
    return metrics


def _rows(run: Path, store: Store, split: str) -> np.ndarray:
    """Store rows to score, sorted (sequential reads); every one labeled."""
    if split == "val":
        return held_out_rows(run, store)
    if split == "all":
        rows = store.rows(labeled=True)
        if len(rows) == 0:
            raise InferError(f"{store.path}: no labeled patches to evaluate on")
        return rows
    rows = store.rows(split)
    unlabeled = int((store.labels[rows] < 0).sum())
    if unlabeled:
        raise InferError(
            f"{store.path}: split {split!r} has {unlabeled} unlabeled patch(es) of {len(rows)}; "
            "evaluation needs labels (try --split all for every labeled patch)"
        )
    return rows
