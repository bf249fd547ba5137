"""``train --folds K --all-folds``: every fold of a K-fold split, and the out-of-fold predictions.

Each fold is an ordinary run folder (``<out>/fold-0`` ...), trained by :func:`histodetect.train.run.train` with
``fold`` set, so evaluate, predict (``predict <out>/fold-*`` ensembles them) and compare take them as they are. The
out-of-fold predictions (each labeled patch scored by the one model that did not train on it) give one ROC AUC
over every labeled patch, the Kaggle habit for judging a recipe: steadier than any single fold's hold-out.
The scoring is the inference layer's (``infer.evaluate.score_rows``, the one ``Predictor``): the caller hands it in
as ``score``, as it hands ``tune`` its report, since training sits below inference and may not import it.

Re-running the same command continues: finished folds (``summary.json``) are kept, an interrupted one is resumed
from its last checkpoint. The settings are recorded in ``cv-config.yaml`` before the first fold, and a re-run with
other settings is refused, naming them, so the out-of-fold AUC never mixes recipes; ``restart`` deletes the folds
that record lists (and nothing else) and starts over. With ``test_fraction`` every fold holds out the same test
patches (the split draws them first), which no fold trains, validates or stops on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from lightning.pytorch.utilities import rank_zero_only

from histodetect.data.store import Store
from histodetect.io import atomic_path, atomic_write_json
from histodetect.metrics import roc_auc
from histodetect.runs.config import ConfigError, TrainConfig
from histodetect.runs.layout import CONFIG, SUMMARY, held_out_rows, read_split, read_summary
from histodetect.runs.names import CV_CONFIG
from histodetect.train.run import train

OOF = "oof.csv"
CV_SUMMARY = "cv.json"
RECIPE = CV_CONFIG  # the settings of every fold (fold 0's config), written before the first fold trains
# How a fold runs rather than what it learns: these may change between a run and its continuation.
HOW = {"fold", "accelerator", "devices", "num_nodes", "strategy", "num_workers", "logger", "compile", "notes"}
PRECISION = "fp32"  # out-of-fold predictions are evaluation numbers: computed as the exported model computes


class Scorer(Protocol):
    """The mean probability of ``runs`` on ``rows`` of ``store`` at ``precision`` (``infer.evaluate.score_rows``);
    ``label`` names the pass in its progress bar."""

    def __call__(
        self, runs: list[Path], store: Store, rows: np.ndarray, *, label: str, precision: str
    ) -> np.ndarray: ...


def cross_validate(
    store: Store, out: str | os.PathLike[str], config: TrainConfig, *, score: Scorer, restart: bool = False
) -> dict[str, Any]:
    """Train fold 0..K-1 of ``config`` into ``out/fold-I``; score each fold's held-out patches (and the test part)
    with ``score``; write ``oof.csv`` and ``cv.json``; return the latter."""
    if config.folds < 2:
        raise ConfigError("--all-folds needs --folds K with K >= 2")
    out = Path(out)
    if rank_zero_only.rank == 0:  # DDP processes other than zero re-run this command once rank zero trains
        if restart:
            _start_over(out)
        _check_recipe(out, config)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RECIPE).is_file():
            config.replace(fold=0).save(out / RECIPE)
    folds: list[dict[str, Any]] = []
    predictions: list[pd.DataFrame] = []
    for fold in range(config.folds):
        run = out / f"fold-{fold}"
        if (run / SUMMARY).exists():
            summary = read_summary(run)
        else:  # a fold never started, or one interrupted (its config.yaml is there): resume it
            summary = train(store, run, config.replace(fold=fold), resume=(run / CONFIG).exists())
        if rank_zero_only.rank != 0:  # other DDP processes helped train; the bookkeeping is rank zero's
            continue
        predictions.append(_held_out_predictions(store, run, fold, score))
        folds.append({"fold": fold, "run": str(run), "best_val_auc": summary.get("best_val_auc")})
    if rank_zero_only.rank != 0:
        return {}
    oof = pd.concat(predictions, ignore_index=True).sort_values("id", kind="stable")
    with atomic_path(out / OOF) as tmp:
        oof.to_csv(tmp, index=False)
    aucs = np.array([f["best_val_auc"] for f in folds if f["best_val_auc"] is not None], dtype=float)
    result = {
        "folds": folds,
        "oof_auc": round(roc_auc(oof["label"].to_numpy(), oof["probability"].to_numpy()), 6),
        "oof_patches": len(oof),
        "fold_auc_mean": round(float(aucs.mean()), 6) if len(aucs) else None,
        "fold_auc_std": round(float(aucs.std(ddof=1)), 6) if len(aucs) > 1 else None,
        **_test_score(store, [Path(f["run"]) for f in folds], score),
        "numeric_precision": PRECISION,
        "model": config.model,
        "store": str(store.path),
    }
    atomic_write_json(out / CV_SUMMARY, result)
    return result


def _test_score(store: Store, runs: list[Path], score: Scorer) -> dict[str, Any]:
    """The folds' mean prediction on the test patches they all held out (``test_fraction``): the one number of a
    cross-validation that no fold trained, validated or stopped on."""
    rows = read_split(runs[0], store, ("test",))["test"]
    if len(rows) == 0:
        return {"test_patches": 0, "test_auc": None}
    probabilities = score(runs, store, rows, label="test", precision=PRECISION)
    return {"test_patches": len(rows), "test_auc": round(roc_auc(store.labels[rows], probabilities), 6)}


def _held_out_predictions(store: Store, run: Path, fold: int, score: Scorer) -> pd.DataFrame:
    """The fold's model on every patch its ``split.csv`` held out (not only the per-epoch validation subset)."""
    rows = held_out_rows(run, store)
    probabilities = score([run], store, rows, label=f"fold {fold}", precision=PRECISION)
    return pd.DataFrame(
        {"id": store.ids[rows], "label": store.labels[rows], "probability": probabilities, "fold": fold}
    )


def _check_recipe(out: Path, config: TrainConfig) -> None:
    """Refuse to continue folds trained with other settings, naming each key that differs."""
    recorded = out / RECIPE
    if not recorded.is_file():  # folds of a version before cv-config.yaml: compare with the first one there
        recorded = next(
            (out / f"fold-{i}" / CONFIG for i in range(config.folds) if (out / f"fold-{i}" / CONFIG).is_file()),
            recorded,
        )
    if not recorded.is_file():
        return
    old, new = TrainConfig.load(recorded).to_dict(), config.to_dict()
    differ = [f"{key} ({old[key]!r} -> {new[key]!r})" for key in old if key not in HOW and old[key] != new[key]]
    if differ:
        raise ConfigError(
            f"{out}: its folds were trained with other settings: {', '.join(differ)}; run the same command to "
            "continue them, or pass --restart to start over"
        )


def _start_over(out: Path) -> None:
    """Delete what an earlier ``--all-folds`` into ``out`` made: the folds its ``cv-config.yaml`` lists, oof.csv,
    cv.json. Fold folders without that record are not ours to delete."""
    recorded = out / RECIPE
    if not recorded.is_file():
        strays = sorted(p.name for p in out.glob("fold-*")) if out.is_dir() else []
        if strays:
            raise ConfigError(
                f"{out}: holds {', '.join(strays)} but no {RECIPE} saying --all-folds made them; remove them yourself"
            )
        return
    for fold in range(TrainConfig.load(recorded).folds):
        if (out / f"fold-{fold}").is_dir():
            shutil.rmtree(out / f"fold-{fold}")
    for name in (OOF, CV_SUMMARY, RECIPE):
        (out / name).unlink(missing_ok=True)
