"""train --all-folds: every fold as a run folder, out-of-fold predictions over every labeled patch, and a re-run
that continues instead of starting over."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.store import Store
from histodetect.infer.crossval import cross_validate
from histodetect.train.config import ConfigError, TrainConfig

QUICK = dict(model="baseline-cnn", epochs=1, batch_size=8, limit_train=24, patience=0, num_workers=0)


def test_every_fold_trains_and_each_patch_is_scored_once_out_of_fold(sample_store: Store, tmp_path: Path) -> None:
    result = cross_validate(sample_store, tmp_path / "cv", TrainConfig(folds=3, **QUICK))
    oof = pd.read_csv(tmp_path / "cv" / "oof.csv", dtype={"id": str})
    assert len(oof) == oof["id"].nunique() == 240 and sorted(oof["fold"].unique()) == [0, 1, 2]
    for fold in range(3):
        split = pd.read_csv(tmp_path / "cv" / f"fold-{fold}" / "split.csv", dtype={"id": str})
        held_out = set(split.loc[split["part"] == "val", "id"])
        assert set(oof.loc[oof["fold"] == fold, "id"]) == held_out  # scored only by the model that never saw it
    assert 0 <= result["oof_auc"] <= 1 and result["oof_patches"] == 240 and len(result["folds"]) == 3
    assert json.loads((tmp_path / "cv" / "cv.json").read_text()) == result

    kept = (tmp_path / "cv" / "fold-0" / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "cv" / "fold-2" / "summary.json").unlink()  # as if fold 2 had been interrupted
    cross_validate(sample_store, tmp_path / "cv", TrainConfig(folds=3, **QUICK))
    assert (tmp_path / "cv" / "fold-0" / "model.safetensors").stat().st_mtime_ns == kept
    assert (tmp_path / "cv" / "fold-2" / "summary.json").exists()


def test_all_folds_needs_folds() -> None:
    with pytest.raises(ConfigError, match="--folds"):
        cross_validate(None, "unused", TrainConfig(**QUICK))  # type: ignore[arg-type]


def test_the_command_line(sample_store: Store, tmp_path: Path) -> None:
    args = ["train", str(sample_store.path), "--out", str(tmp_path / "cv"), "--folds", "2", "--all-folds"]
    args += ["--model", "baseline-cnn", "--epochs", "1", "--limit-train", "16", "--patience", "0"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "out-of-fold ROC AUC" in done.stderr and (tmp_path / "cv" / "fold-1" / "model.safetensors").exists()
