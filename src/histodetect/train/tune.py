"""``tune``: store -> many runs, chosen by Optuna, and the best configuration.

Each trial is an ordinary run folder (``<out>/trial-0007``), trained by :func:`histodetect.train.run.train` from the
base configuration with the sampled values replaced. The study lives in a database (by default SQLite in
``<out>/study.db``), so running the same command again continues it, and several machines given the same
``--storage`` URL (PostgreSQL, MySQL) share the work: Optuna hands out the trials; nothing here coordinates them.
Unpromising trials are pruned on their per-epoch validation ROC AUC (median rule).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pandas as pd

from histodetect.data.store import Store
from histodetect.io import atomic_path
from histodetect.train.config import ConfigError, TrainConfig
from histodetect.train.run import train


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """What the search varies; everything else comes from the base configuration."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "optimizer": trial.suggest_categorical("optimizer", ["adam", "adamw", "rmsprop", "sgd"]),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
    }


class ReportAUC(L.Callback):
    """Reports each epoch's validation AUC to Optuna and stops a trial the pruner gives up on."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        auc = trainer.callback_metrics.get("val_auc")
        if auc is None or trainer.sanity_checking:
            return
        self.trial.report(float(auc), step=trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val AUC {float(auc):.4f} at epoch {trainer.current_epoch}")


def tune(
    store: Store,
    out: str | os.PathLike[str],
    base: TrainConfig,
    *,
    trials: int,
    storage: str | None = None,
    study_name: str = "histodetect",
    timeout_minutes: float | None = None,
) -> optuna.Study:
    """Run trials until the study holds ``trials`` finished ones (complete or pruned), or the time is up."""
    if base.val_fraction == 0 and base.folds <= 1:
        raise ConfigError("tune chooses by validation ROC AUC; val_fraction 0 leaves no validation patches")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage or f"sqlite:///{(out / 'study.db').resolve()}",
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial: optuna.Trial) -> float:
        config = base.replace(**suggest(trial), notes=f"tune trial {trial.number}")
        summary = train(store, out / f"trial-{trial.number:04d}", config, callbacks=[ReportAUC(trial)])
        return float(summary["best_val_auc"])

    remaining = trials - len(study.get_trials(deepcopy=False, states=done))
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout_minutes * 60 if timeout_minutes else None,
            catch=(),
        )
    _write_results(study, out)
    return study


def _write_results(study: optuna.Study, out: Path) -> None:
    """``trials.csv`` (every trial) and, once one has finished, ``best.yaml``: a config ``train --config`` takes."""
    with atomic_path(out / "trials.csv") as tmp:
        pd.DataFrame(study.trials_dataframe()).to_csv(tmp, index=False)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
        TrainConfig.load(out / f"trial-{best.number:04d}" / "config.yaml").replace(notes="").save(out / "best.yaml")
