"""Tuning: Optuna trials are ordinary runs, the study resumes from its database, the best config is reusable."""

from pathlib import Path

import optuna
import pandas as pd

from histodetect.data.store import Store
from histodetect.train.config import TrainConfig
from histodetect.train.tune import tune

BASE = TrainConfig(model="baseline-cnn", epochs=2, limit_train=32, val_fraction=0.2, patience=0)


def test_study_runs_trials_resumes_and_writes_the_best_config(sample_store: Store, tmp_path: Path) -> None:
    study = tune(sample_store, tmp_path / "tune", BASE, trials=2)
    assert len(study.trials) == 2
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished and all(0.0 <= t.value <= 1.0 for t in finished)
    assert (tmp_path / "tune" / "trial-0000" / "summary.json").exists()
    best = TrainConfig.load(tmp_path / "tune" / "best.yaml")
    assert best.lr == study.best_params["lr"] and best.model == "baseline-cnn"

    again = tune(sample_store, tmp_path / "tune", BASE, trials=3)  # the same folder: continues the study
    assert len(again.trials) == 3
    assert len(pd.read_csv(tmp_path / "tune" / "trials.csv")) == 3
    assert tune(sample_store, tmp_path / "tune", BASE, trials=3).trials[-1].number == 2  # nothing left to run


def test_tuning_without_validation_is_refused_before_any_trial(tmp_path: Path) -> None:
    import pytest

    from histodetect.train.config import ConfigError

    with pytest.raises(ConfigError, match="val_fraction 0"):
        tune(None, tmp_path / "tune", BASE.replace(val_fraction=0.0), trials=1)  # type: ignore[arg-type]
    assert not (tmp_path / "tune").exists()
