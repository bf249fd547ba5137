"""``train --folds K --all-folds``: every fold of a K-fold split, and the out-of-fold predictions.

Each fold is an ordinary run folder (``<out>/fold-0`` ...), trained by :func:`histodetect.train.run.train` with
``fold`` set, so evaluate, predict (``predict <out>/fold-*`` ensembles them) and compare take them as they are. The
out-of-fold predictions (each labeled patch scored by the one model that did not train on it) give one ROC AUC
over every labeled patch, the Kaggle habit for judging a recipe: steadier than any single fold's hold-out.

Re-running the same command continues: finished folds (``summary.json``) are kept, an interrupted one is resumed
from its last checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.utilities import rank_zero_only
from sklearn.metrics import roc_auc_score

from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.infer.sources import StoreRows
from histodetect.io import atomic_path, atomic_write_json
from histodetect.train.config import ConfigError, TrainConfig
from histodetect.train.run import train
from histodetect.train.runfolder import CONFIG, SUMMARY, held_out_rows

OOF = "oof.csv"
CV_SUMMARY = "cv.json"


def cross_validate(store: Store, out: str | os.PathLike[str], config: TrainConfig) -> dict[str, Any]:
    """Train fold 0..K-1 of ``config`` into ``out/fold-I``; write ``oof.csv`` and ``cv.json``; return the latter."""
    if config.folds < 2:
        raise ConfigError("--all-folds needs --folds K with K >= 2")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folds: list[dict[str, Any]] = []
    predictions: list[pd.DataFrame] = []
    for fold in range(config.folds):
        run = out / f"fold-{fold}"
        if (run / SUMMARY).exists():
            summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
        else:  # a fold never started, or one interrupted (its config.yaml is there): resume it
            summary = train(store, run, config.replace(fold=fold), resume=(run / CONFIG).exists())
        if rank_zero_only.rank != 0:  # other DDP processes helped train; the bookkeeping is rank zero's
            continue
        predictions.append(_held_out_predictions(store, run, fold))
        folds.append({"fold": fold, "run": str(run), "best_val_auc": summary.get("best_val_auc")})
    if rank_zero_only.rank != 0:
        return {}
    oof = pd.concat(predictions, ignore_index=True).sort_values("id", kind="stable")
    with atomic_path(out / OOF) as tmp:
        oof.to_csv(tmp, index=False)
    aucs = np.array([f["best_val_auc"] for f in folds if f["best_val_auc"] is not None], dtype=float)
    result = {
        "folds": folds,
        "oof_auc": round(float(roc_auc_score(oof["label"], oof["probability"])), 6),
        "oof_patches": len(oof),
        "fold_auc_mean": round(float(aucs.mean()), 6) if len(aucs) else None,
        "fold_auc_std": round(float(aucs.std(ddof=1)), 6) if len(aucs) > 1 else None,
        "model": config.model,
        "store": str(store.path),
    }
    atomic_write_json(out / CV_SUMMARY, result)
    return result


def _held_out_predictions(store: Store, run: Path, fold: int) -> pd.DataFrame:
    """The fold's model on every patch its ``split.csv`` held out (not only the per-epoch validation subset)."""
    rows = held_out_rows(run, store)
    probabilities = Predictor([run]).predict(StoreRows(store, rows), label=f"fold {fold}")
    return pd.DataFrame(
        {"id": store.ids[rows], "label": store.labels[rows], "probability": probabilities, "fold": fold}
    )
