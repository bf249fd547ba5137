"""binary_metrics against sklearn, and the vectorised bootstrap against a plain one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from histodetect.metrics import roc_auc
from histodetect.report.metrics import binary_metrics, bootstrap_auc_ci


def _scores(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels and overlapping scores rounded to 2 decimals, so ties are common."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    p = np.round(1 / (1 + np.exp(-(rng.normal(size=n) + 1.8 * y - 0.5))), 2)
    return y, p


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_matches_sklearn(threshold: float) -> None:
    y, p = _scores()
    m = binary_metrics(y, p, threshold=threshold, n_boot=50)
    pred = (p >= threshold).astype(int)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["log_loss"] == pytest.approx(log_loss(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert (m["n"], m["n_pos"], m["n_neg"]) == (len(y), y.sum(), len(y) - y.sum())
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == len(y)


def test_youden_threshold_maximises_j() -> None:
    y, p = _scores(seed=1)
    m = binary_metrics(y, p, n_boot=0)
    fpr, tpr, thresholds = roc_curve(y, p)
    best = thresholds[1:][np.argmax((tpr - fpr)[1:])]
    youden = m["at_youden"]
    assert youden["threshold"] == pytest.approx(best)
    j = youden["sensitivity"] + youden["specificity"] - 1
    assert j == pytest.approx(np.max(tpr - fpr))
    assert j >= m["sensitivity"] + m["specificity"] - 1


def test_bootstrap_ci_agrees_with_a_plain_bootstrap() -> None:
    y, p = _scores(n=1500, seed=2)
    low, high = bootstrap_auc_ci(y, p, n_boot=1000, seed=0)
    rng = np.random.default_rng(5)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    plain = []
    for _ in range(300):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        plain.append(roc_auc_score(y[idx], p[idx]))
    plain_low, plain_high = np.percentile(plain, [2.5, 97.5])
    assert low < roc_auc(y, p) < high
    assert low == pytest.approx(plain_low, abs=0.006)
    assert high == pytest.approx(plain_high, abs=0.006)
    assert bootstrap_auc_ci(y, p, n_boot=200, seed=3) == bootstrap_auc_ci(y, p, n_boot=200, seed=3)


def test_bootstrap_batches_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    y, p = _scores(n=400, seed=4)
    whole = bootstrap_auc_ci(y, p, n_boot=100, seed=0)
    monkeypatch.setattr("histodetect.report.metrics.BOOT_BATCH_ELEMENTS", 1000)  # two resamples per batch
    assert bootstrap_auc_ci(y, p, n_boot=100, seed=0) != whole  # different draws ...
    assert bootstrap_auc_ci(y, p, n_boot=100, seed=0)[0] == pytest.approx(whole[0], abs=0.03)  # ... same answer


def test_perfect_separation_and_single_class() -> None:
    perfect = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), n_boot=100)
    assert perfect["roc_auc"] == 1.0
    assert perfect["roc_auc_ci"] == [1.0, 1.0]
    assert perfect["accuracy"] == 1.0

    single = binary_metrics(np.zeros(5, dtype=int), np.linspace(0.1, 0.9, 5), n_boot=100)
    assert math.isnan(single["roc_auc"]) and all(math.isnan(v) for v in single["roc_auc_ci"])
    assert math.isnan(single["sensitivity"]) and math.isnan(single["average_precision"])
    assert single["at_youden"] == {}
    assert single["specificity"] == pytest.approx(0.4)  # 0.5, 0.7 and 0.9 are called positive


def test_nothing_called_positive_leaves_precision_undefined() -> None:
    m = binary_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), threshold=0.9, n_boot=0)
    assert math.isnan(m["precision"])
    assert m["f1"] == 0.0
    assert m["sensitivity"] == 0.0


def test_log_loss_is_clipped() -> None:
    m = binary_metrics(np.array([0, 1]), np.array([1.0, 0.0]), n_boot=0)
    assert math.isfinite(m["log_loss"]) and m["log_loss"] > 30


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [0.5], "2 labels but 1"),
        ([0, 2], [0.5, 0.5], "labels must be 0 or 1"),
        ([0, 1], [0.5, 1.5], "within"),
        ([0, 1], [0.5, float("nan")], "finite"),
        ([], [], "no predictions"),
    ],
)
def test_bad_input(y: list[int], p: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binary_metrics(np.array(y), np.array(p))
