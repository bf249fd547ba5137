"""evaluate: a run scored on its own held-out patches, with a confidence interval, a report and a copy in the run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from histodetect.data.ingest import ingest
from histodetect.data.store import Store
from histodetect.infer.engine import InferError
from histodetect.infer.evaluate import evaluate


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
    assert (out / "report.html").is_file() and (out / "roc.png").is_file()
    assert json.loads((baseline_run / "evaluation" / "metrics.json").read_text()) == written  # for compare


def test_all_and_named_splits(baseline_run: Path, sample_store: Store, tmp_path: Path) -> None:
    every = evaluate(
        baseline_run, sample_store.path, tmp_path / "all", split="all", tta="flips", threshold=0.4, precision="fp32"
    )
    assert every["n"] == 240 and every["threshold"] == 0.4 and every["tta"] == "flips"
    assert every["numeric_precision"] == "fp32" and 0 <= every["precision"] <= 1  # arithmetic, and the PPV
    assert evaluate(baseline_run, sample_store.path, tmp_path / "train", split="train")["n"] == 240
    with pytest.raises(InferError, match="16 unlabeled"):
        evaluate(baseline_run, sample_store.path, tmp_path / "test", split="test")


def test_a_store_without_the_held_out_ids_is_refused(baseline_run: Path, test_images: Path, tmp_path: Path) -> None:
    test_only = ingest(test_images, tmp_path / "s", progress=False)
    assert test_only.store is not None
    with pytest.raises(InferError, match=r"lacks (\d+) of the \1 held-out ids"):
        evaluate(baseline_run, test_only.store.path, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
