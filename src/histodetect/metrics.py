"""The one ROC AUC every command reports: evaluation, the validation AUC training monitors, cross-validation's
out-of-fold and test AUC, a cohort's slide-level AUC.

Computed as the Mann-Whitney statistic (a positive scored above a negative counts 1, a tie 1/2), which equals the
area under the empirical ROC curve, scikit-learn's ``roc_auc_score`` (``tests/test_metrics.py`` checks it on data
with ties). One sort of the negatives and two binary searches: no curve is built.
"""

from __future__ import annotations

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of scores ``p`` for 0/1 labels ``y``; ``nan`` when either class is missing (it is undefined)."""
    y, p = np.asarray(y).ravel(), np.asarray(p, dtype=np.float64).ravel()
    lo, hi, neg_sorted = negative_positions(y, p)
    if len(lo) == 0 or len(neg_sorted) == 0:
        return float("nan")
    return float(np.mean(lo + hi) / 2 / len(neg_sorted))


def negative_positions(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every positive: how many negatives score strictly below it (lo) and at most equal to it (hi), and the
    negatives' scores sorted (what a bootstrap of the AUC reuses for every resample)."""
    neg_sorted = np.sort(p[y == 0])
    pos = p[y == 1]
    return np.searchsorted(neg_sorted, pos, "left"), np.searchsorted(neg_sorted, pos, "right"), neg_sorted
