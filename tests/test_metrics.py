"""The one ROC AUC (histodetect.metrics) against scikit-learn's, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from histodetect.metrics import roc_auc


@pytest.mark.parametrize("seed", range(20))
def test_roc_auc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)  # both classes
    p = rng.normal(size=n).round(int(rng.integers(0, 3)))  # rounding makes many ties, within and across classes
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_roc_auc_counts_a_tie_as_one_half_and_is_nan_for_one_class() -> None:
    assert roc_auc(np.array([0, 1]), np.array([0.3, 0.3])) == 0.5
    assert roc_auc(np.array([0, 0, 1]), np.array([0.1, 0.5, 0.5])) == 0.75
    assert math.isnan(roc_auc(np.ones(4), np.linspace(0, 1, 4)))
    assert math.isnan(roc_auc(np.zeros(4), np.linspace(0, 1, 4)))
