"""The evaluation report: files written, strict metrics.json, mistakes chosen and shown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histodetect.data.store import Store
from histodetect.report.evaluation import confident_mistakes, json_safe, write_evaluation_report
from histodetect.report.metrics import binary_metrics

FIGURES = (
    "roc",
    "precision_recall",
    "confusion",
    "scores",
    "calibration",
    "false_positives",
    "false_negatives",
)


def _predictions(store: Store, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labeled rows of the sample with noisy scores that make a few confident mistakes."""
    rows = store.rows(labeled=True)
    y = store.labels[rows].astype(int)
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + 1.5 * rng.normal(size=len(y)))))
    return rows, y, p


def test_report_on_real_patches(report_store: Store, tmp_path: Path) -> None:
    rows, y, p = _predictions(report_store)
    metrics = binary_metrics(y, p, n_boot=200)
    page = write_evaluation_report(
        tmp_path / "ev",
        y,
        p,
        metrics,
        patches=report_store.patches[rows],
        ids=report_store.ids[rows],
        title="T",
    )
    assert page == tmp_path / "ev" / "report.html"
    for name in FIGURES:
        assert (tmp_path / "ev" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert saved["at_youden"]["threshold"] == pytest.approx(metrics["at_youden"]["threshold"])
    html = page.read_text()
    assert f"{metrics['roc_auc']:.4f}" in html and "95% CI" in html
    assert str(report_store.ids[rows][confident_mistakes(y, p, 0.5)[0][0]])[:10] in html


def test_single_class_and_no_patches(tmp_path: Path) -> None:
    y = np.zeros(20, dtype=int)
    p = np.linspace(0.05, 0.95, 20)
    write_evaluation_report(tmp_path, y, p, binary_metrics(y, p))
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text)["roc_auc"] is None and "NaN" not in text  # strict JSON
    html = (tmp_path / "report.html").read_text()
    assert "ROC and precision-recall need both classes" in html
    assert "No patches were given" in html
    assert not (tmp_path / "roc.png").exists()
    assert (tmp_path / "confusion.png").exists() and (tmp_path / "calibration.png").exists()


def test_no_mistakes_is_said_not_drawn(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9])
    patches = np.zeros((4, 96, 96, 3), dtype=np.uint8)
    html = write_evaluation_report(tmp_path, y, p, binary_metrics(y, p, n_boot=20), patches=patches).read_text()
    assert "No false positives" in html and "No false negatives" in html


def test_confident_mistakes_order() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.7, 0.95, 0.2, 0.1, 0.45, 0.9, 0.5])
    fp, fn = confident_mistakes(y, p, threshold=0.5)
    assert fp.tolist() == [1, 0, 6]
    assert fn.tolist() == [3, 4]


def test_inputs_must_align(tmp_path: Path) -> None:
    y, p = np.array([0, 1]), np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="3 ids for 2 labels"):
        write_evaluation_report(tmp_path, y, p, {}, ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="patches must be uint8"):
        write_evaluation_report(tmp_path, y, p, {}, patches=np.zeros((2, 96, 96, 3)))


def test_json_safe() -> None:
    value = {"a": np.float32(0.5), "b": [float("nan"), np.int64(3)], "c": (float("inf"),)}
    assert json_safe(value) == {"a": 0.5, "b": [None, 3], "c": [None]}
