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
from histodetect.infer.evaluate import score_rows
from histodetect.runs.config import ConfigError, TrainConfig
from histodetect.train.crossval import cross_validate

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

QUICK = dict(model="baseline-cnn", epochs=1, batch_size=8, limit_train=24, patience=0, num_workers=0)


def test_every_fold_trains_and_each_patch_is_scored_once_out_of_fold(sample_store: Store, tmp_path: Path) -> None:
    result = cross_validate(sample_store, tmp_path / "cv", TrainConfig(folds=3, **QUICK), score=score_rows)
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
    cross_validate(sample_store, tmp_path / "cv", TrainConfig(folds=3, **QUICK), score=score_rows)
    assert (tmp_path / "cv" / "fold-0" / "model.safetensors").stat().st_mtime_ns == kept
    assert (tmp_path / "cv" / "fold-2" / "summary.json").exists()


def test_all_folds_needs_folds() -> None:
    with pytest.raises(ConfigError, match="--folds"):
        cross_validate(None, "unused", TrainConfig(**QUICK), score=score_rows)  # type: ignore[arg-type]


def test_the_command_line(sample_store: Store, tmp_path: Path) -> None:
    args = ["train", str(sample_store.path), "--out", str(tmp_path / "cv"), "--folds", "2", "--all-folds"]
    args += ["--model", "baseline-cnn", "--epochs", "1", "--limit-train", "16", "--patience", "0"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "out-of-fold ROC AUC" in done.stderr and (tmp_path / "cv" / "fold-1" / "model.safetensors").exists()


def test_a_test_split_is_held_out_of_every_fold_and_other_flags_are_refused(
    sample_store: Store, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    config = TrainConfig(folds=2, test_fraction=0.2, **QUICK)
    result = cross_validate(sample_store, out, config, score=score_rows)
    tests = [
        set(pd.read_csv(out / f"fold-{k}" / "split.csv", dtype={"id": str}).query("part == 'test'")["id"])
        for k in range(2)
    ]
    assert len(tests[0]) == 48 and tests[0] == tests[1] == set(tests[0])  # the same test patches in every fold
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    assert len(oof) == result["oof_patches"] == 192 and not set(oof["id"]) & tests[0]
    assert result["test_patches"] == 48 and 0 <= result["test_auc"] <= 1 and result["numeric_precision"] == "fp32"

    (out / "mine.txt").write_text("not the tool's")
    kept = (out / "fold-0" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"other settings: lr \(0\.001 -> 0\.01\), epochs \(1 -> 2\);.*--restart"):
        cross_validate(sample_store, out, config.replace(lr=0.01, epochs=2, num_workers=0), score=score_rows)
    args = ["train", str(sample_store.path), "--out", str(out), "--folds", "2", "--all-folds", "--test-fraction", "0.2"]
    args += ["--model", "baseline-cnn", "--epochs", "1", "--limit-train", "24", "--batch-size", "8", "--lr", "0.01"]
    refused = CliRunner().invoke(app, [*args, "--patience", "0", "--num-workers", "0"])
    assert refused.exit_code == 2 and "lr (0.001 -> 0.01)" in refused.output
    assert (out / "fold-0" / "model.safetensors").stat().st_mtime_ns == kept

    cross_validate(sample_store, out, config.replace(lr=0.01), score=score_rows, restart=True)
    assert (out / "mine.txt").read_text() == "not the tool's"  # only what --all-folds made is deleted
    assert TrainConfig.load(out / "fold-1" / "config.yaml").lr == 0.01
    assert TrainConfig.load(out / "cv-config.yaml").lr == 0.01


def test_restart_leaves_fold_folders_it_did_not_record_making(tmp_path: Path) -> None:
    (tmp_path / "cv" / "fold-0").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"fold-0 but no cv-config\.yaml"):
        cross_validate(None, tmp_path / "cv", TrainConfig(folds=2, **QUICK), score=score_rows, restart=True)  # type: ignore[arg-type]
    assert (tmp_path / "cv" / "fold-0").is_dir()
