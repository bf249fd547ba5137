"""evaluate: a run scored on its own held-out patches, with a confidence interval, a report and a copy in the run
(one per split, so no evaluation replaces another)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.ingest import ingest
from histodetect.data.store import Store
from histodetect.errors import StoreError
from histodetect.infer.engine import InferError
from histodetect.infer.evaluate import evaluate
from histodetect.runs.config import TrainConfig
from histodetect.train.run import train

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)


def test_held_out_patches_give_metrics_with_a_ci_and_a_report(
    baseline_run: Path, sample_store: Store, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    metrics = evaluate(baseline_run, sample_store.path, out)
    split = pd.read_csv(baseline_run / "split.csv")
    assert metrics["n"] == (split["part"] == "val").sum() > 0
    written = json.loads((out / "metrics.json").read_text())
    assert 0 <= written["roc_auc"] <= 1
    low, high = written["roc_auc_ci"]
    assert low <= written["roc_auc"] <= high
    assert written["split"] == "val" and written["model"] == "baseline-cnn"
    assert written["numeric_precision"] == "fp32"  # the default: what the exported model computes
    assert (out / "report.html").is_file() and (out / "roc.png").is_file()
    assert json.loads((baseline_run / "evaluation" / "val" / "metrics.json").read_text()) == written  # for compare


def test_all_and_named_splits(baseline_run: Path, sample_store: Store, tmp_path: Path) -> None:
    every = evaluate(
        baseline_run, sample_store.path, tmp_path / "all", split="all", tta="flips", threshold=0.4, precision="fp32"
    )
    assert every["n"] == 240 and every["threshold"] == 0.4 and every["tta"] == "flips"
    assert every["numeric_precision"] == "fp32" and 0 <= every["precision"] <= 1  # arithmetic, and the PPV
    assert evaluate(baseline_run, sample_store.path, tmp_path / "train", split="train")["n"] == 240
    with pytest.raises(InferError, match="16 unlabeled"):
        evaluate(baseline_run, sample_store.path, tmp_path / "test", split="store:test")  # the store's own split
    with pytest.raises(InferError, match="held out no test patches"):
        evaluate(baseline_run, sample_store.path, tmp_path / "test", split="test")  # the run's: it has none
    assert (baseline_run / "evaluation" / "all" / "metrics.json").is_file()
    assert (baseline_run / "evaluation" / "train" / "metrics.json").is_file()


def test_a_store_the_run_was_not_trained_on_is_refused_naming_both(
    baseline_run: Path, test_images: Path, sample_store: Store, tmp_path: Path
) -> None:
    test_only = ingest(test_images, tmp_path / "s", progress=False)
    assert test_only.store is not None
    with pytest.raises(StoreError, match="is not the store") as caught:
        evaluate(baseline_run, test_only.store.path, tmp_path / "eval")
    assert str(test_only.store.path) in str(caught.value) and str(sample_store.path.resolve()) in str(caught.value)
    assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> Path:
    run = tmp_path_factory.mktemp("tested") / "run"
    config = TrainConfig(epochs=1, batch_size=8, limit_train=16, test_fraction=0.25, patience=0, num_workers=0)
    train(sample_store, run, config)
    return run


def test_test_split_is_scored_apart_and_all_never_replaces_val(
    tested_run: Path, sample_store: Store, tmp_path: Path
) -> None:
    split = pd.read_csv(tested_run / "split.csv", dtype={"id": str})
    test = evaluate(tested_run, sample_store.path, tmp_path / "test", split="test")
    assert test["split"] == "test" and test["n"] == (split["part"] == "test").sum() == 60
    val = evaluate(tested_run, sample_store.path, tmp_path / "val")
    assert val["n"] == (split["part"] == "val").sum()
    evaluate(tested_run, sample_store.path, tmp_path / "all", split="all")
    kept = {
        part: json.loads((tested_run / "evaluation" / part / "metrics.json").read_text()) for part in ("val", "test")
    }
    assert kept["val"]["roc_auc"] == val["roc_auc"] and kept["val"]["n"] == val["n"] and kept["val"]["split"] == "val"
    assert kept["test"]["n"] == 60 and kept["test"]["split"] == "test"
    assert json.loads((tested_run / "evaluation" / "all" / "metrics.json").read_text())["n"] == 240


def test_the_command_line_defaults_to_fp32_and_says_which_split(
    tested_run: Path, sample_store: Store, tmp_path: Path
) -> None:
    done = CliRunner().invoke(app, ["evaluate", str(tested_run), str(sample_store.path), "--out", str(tmp_path / "e"),
                                    "--split", "test"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "test: ROC AUC" in done.output and "fp32" in done.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["numeric_precision"] == "fp32"
