"""The evaluation report of one model on one labeled set: metrics.json, figures and report.html.

It answers, in order: how well does the model rank patches (ROC, precision-recall, with the AUC's confidence
interval), what happens at the decision threshold (confusion matrix, score distributions), can its
probabilities be taken at face value (calibration), and what do its worst mistakes look like (the most
confident false positives and false negatives, with the centre region the label is about outlined). The glue
that loads a run and predicts lives in ``histodetect.infer.evaluate``; this module only draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from histodetect.io import atomic_write_json
from histodetect.report.figures import (
    CLASS_COLORS,
    CLASS_NAMES,
    INK,
    class_hist,
    class_legend,
    patch_grid,
    styled,
)
from histodetect.report.html import Card, Page, Section

MISTAKES_SHOWN = 16  # per kind: two rows of eight
CALIBRATION_BINS = 10
CURVE_COLOR = INK
YOUDEN_COLOR = "#009E73"  # Okabe–Ito bluish green: not a class colour, so it cannot be read as one


def write_evaluation_report(
    out_dir: str | Path,
    y: np.ndarray,
    p: np.ndarray,
    metrics: dict[str, Any],
    *,
    patches: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Write ``metrics.json``, the figures and ``report.html`` into ``out_dir``; returns the page's path.

    ``metrics`` is what :func:`histodetect.report.metrics.binary_metrics` returned for ``(y, p)``. ``patches``
    (uint8 ``(n, 96, 96, 3)``, aligned with ``y``) and ``ids`` enable the grid of the most confident mistakes.
    """
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    _check_inputs(y, p, patches, ids)
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", json_safe(metrics))
    threshold = float(metrics.get("threshold", 0.5))
    youden = metrics.get("at_youden") or {}

    page = Page(
        out_dir,
        title or "Evaluation",
        f"{len(y):,} patches: {int(y.sum()):,} positive, "
        f"{int((y == 0).sum()):,} negative · decision threshold {threshold:.3g}",
    )
    page.cards(headline_cards(metrics))
    page.section("Metrics", _METRICS_INTRO).table(
        metrics_table(metrics), numeric=["at threshold", "at Youden threshold"]
    )
    _ranking_section(page.section("Ranking", _RANKING_INTRO), y, p, metrics)
    if metrics.get("stain_shifts"):
        page.section("Other labs' staining", _STAIN_INTRO).table(
            stain_shift_table(metrics), numeric=["H", "E", "yellow", "ROC AUC", "change"]
        )
    decisions = page.section("Decisions at the threshold", _DECISIONS_INTRO)
    decisions.figure(
        confusion_figure(metrics),
        "confusion",
        f"Counts and share of each true class at threshold {threshold:.3g}. Off-diagonal cells are the "
        "mistakes shown at the bottom.",
    )
    decisions.figure(
        score_histogram_figure(y, p, threshold, youden.get("threshold")),
        "scores",
        "Predicted probability by true class (log scale). Good separation: negatives piled at 0, "
        "positives at 1, little of either in between. The overlap is where the threshold has to choose.",
    )
    page.section("Calibration", _CALIBRATION_INTRO).figure(
        calibration_figure(y, p),
        "calibration",
        "Points on the diagonal: a predicted 0.8 comes true 80% of the time. Below it, the model is "
        "over-confident; above it, under-confident. The histogram shows how many predictions each bin holds.",
    )
    _mistakes_section(page.section("Most confident mistakes", _MISTAKES_INTRO), y, p, threshold, patches, ids)
    return page.write("report.html")


_METRICS_INTRO = (
    "Decision metrics at the chosen threshold and at the Youden threshold (the one maximising sensitivity + "
    "specificity). The gap between the two columns is what re-tuning the threshold on this set would buy; "
    "tuned here, it is optimistic for new data."
)
_RANKING_INTRO = (
    "How well the scores order tumour above normal tissue, whatever the threshold. ROC AUC is the "
    "competition's metric; its 95% interval (stratified bootstrap) says how much of a difference between "
    "two models this set can resolve."
)
_STAIN_INTRO = (
    "The same patches re-stained as other labs' slides might look (`evaluate --stain-shifts`: each stain's amount "
    "scaled in the Ruifrok-Johnston H&E basis, a yellow cast, a scanner's white balance), scored again. A large "
    "drop says the model needs stain normalisation (`--stain-norm`) or stain-robust training (`train --stain-aug`)."
)
_DECISIONS_INTRO = "What the model decides at the threshold and how its scores are spread per class."
_CALIBRATION_INTRO = (
    "Whether probabilities can be read as probabilities. AUC ignores calibration; decisions, thresholds "
    "carried to new data and averaging models in an ensemble do not."
)
_MISTAKES_INTRO = (
    "The patches the model was most sure about and got wrong. Look inside the box: label noise (tumour that "
    "is there, or is not), tumour only in the outer ring, blank or blurred patches, unusual staining."
)


def _check_inputs(y: np.ndarray, p: np.ndarray, patches: np.ndarray | None, ids: Sequence[str] | None) -> None:
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (unlabeled patches cannot be evaluated)")
    if patches is not None and (len(patches) != len(y) or patches.ndim != 4 or patches.dtype != np.uint8):
        raise ValueError(
            f"patches must be uint8 (n, H, W, 3) aligned with the {len(y)} labels, got {patches.dtype} {patches.shape}"
        )
    if ids is not None and len(ids) != len(y):
        raise ValueError(f"{len(ids)} ids for {len(y)} labels")


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars made plain and nan/inf as None, so that metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt(value: Any, digits: int = 4) -> str:
    """A metric for display: fixed decimals for rates, thousands separators for counts, a dash if unknown."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def _ci(metrics: dict[str, Any]) -> str:
    """``95% CI low–high`` for the AUC, or "" when metrics hold no finite interval."""
    ci = metrics.get("roc_auc_ci")
    if not isinstance(ci, list | tuple) or len(ci) != 2 or "—" in (fmt(ci[0]), fmt(ci[1])):
        return ""
    return f"95% CI {fmt(ci[0])}–{fmt(ci[1])}"


def headline_cards(metrics: dict[str, Any]) -> list[Card]:
    t = metrics.get("threshold", 0.5)
    youden = metrics.get("at_youden") or {}
    return [
        Card("ROC AUC", fmt(metrics.get("roc_auc")), _ci(metrics), "good"),
        Card("Accuracy", fmt(metrics.get("accuracy")), f"at threshold {t:.3g}"),
        Card("Sensitivity", fmt(metrics.get("sensitivity")), "tumour found", "pos"),
        Card("Specificity", fmt(metrics.get("specificity")), "normal tissue cleared", "neg"),
        Card(
            "Youden threshold",
            fmt(youden.get("threshold"), 3),
            f"accuracy there {fmt(youden.get('accuracy'))}",
        ),
        Card("Log loss", fmt(metrics.get("log_loss")), f"Brier {fmt(metrics.get('brier'))}"),
    ]


_DECISION_ROWS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "tp", "fp", "tn", "fn")


def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Decision metrics side by side at the given threshold and at Youden's, plus the threshold-free ones."""
    youden = metrics.get("at_youden") or {}
    rows = [("threshold", fmt(metrics.get("threshold"), 3), fmt(youden.get("threshold"), 3))]
    rows += [(name, fmt(metrics.get(name)), fmt(youden.get(name))) for name in _DECISION_ROWS]
    for name in ("roc_auc", "average_precision", "log_loss", "brier"):
        rows.append((name, fmt(metrics.get(name)), ""))
    return pd.DataFrame(rows, columns=["metric", "at threshold", "at Youden threshold"])


def stain_shift_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per re-staining: its parameters, its ROC AUC and the change from the untouched patches."""
    rows = [("untouched", "1", "1", "0", "1, 1, 1", fmt(metrics.get("roc_auc")), "")]
    for name, shift in metrics["stain_shifts"].items():
        white = ", ".join(f"{g:g}" for g in shift["white"])
        rows.append(
            (
                name,
                f"{shift['h']:g}",
                f"{shift['e']:g}",
                f"{shift['yellow']:g}",
                white,
                fmt(shift["roc_auc"]),
                f"{shift['delta']:+.4f}",
            )
        )
    return pd.DataFrame(rows, columns=["re-staining", "H", "E", "yellow", "white balance", "ROC AUC", "change"])


def _ranking_section(section: Section, y: np.ndarray, p: np.ndarray, metrics: dict[str, Any]) -> None:
    if y.min() == y.max():
        section.note(f"Only {CLASS_NAMES[int(y[0])]} patches: ROC and precision-recall need both classes.", "warn")
        return
    section.figure(
        roc_figure(y, p, metrics),
        "roc",
        "True positive rate against false positive rate as the threshold moves. The circle is the "
        "chosen threshold, the diamond Youden's; the dashed line is guessing.",
    )
    section.figure(
        pr_figure(y, p, metrics),
        "precision_recall",
        "Of the patches called tumour, how many are (precision), against how much tumour is found "
        "(recall). The dashed line is the share of positives: what guessing achieves.",
    )


def _mistakes_section(
    section: Section,
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    patches: np.ndarray | None,
    ids: Sequence[str] | None,
) -> None:
    fp, fn = confident_mistakes(y, p, threshold)
    if patches is None:
        section.note("No patches were given, so the mistakes cannot be shown.")
    for rows, kind, name, truth in (
        (fp, "false positives", "false_positives", 0),
        (fn, "false negatives", "false_negatives", 1),
    ):
        if len(rows) == 0:
            section.note(f"No {kind} at threshold {threshold:.3g}.", "good")
        elif patches is not None:
            captions = [f"p={p[i]:.3f}" + (f"\n{str(ids[i])[:10]}" if ids is not None else "") for i in rows]
            fig = patch_grid(
                np.asarray(patches[rows]), captions=captions, frame_colors=[CLASS_COLORS[truth]] * len(rows)
            )
            section.figure(
                fig,
                name,
                f"The {len(rows)} most confident {kind}: true label {CLASS_NAMES[truth]} "
                "(frame colour), predicted probability of tumour and id under each.",
                wide=True,
            )
    if ids is not None and len(fp) + len(fn):
        listed = [("false positive", i) for i in fp] + [("false negative", i) for i in fn]
        table = pd.DataFrame(
            [(kind, str(ids[i]), round(float(p[i]), 4)) for kind, i in listed],
            columns=["mistake", "id", "probability"],
        )
        section.table(table, "The same mistakes by id, e.g. to pass to `histodetect explain`.")


def confident_mistakes(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the most confident false positives (highest p first) and false negatives (lowest first)."""
    called = p >= threshold
    fp = np.flatnonzero((y == 0) & called)
    fn = np.flatnonzero((y == 1) & ~called)
    fp = fp[np.argsort(-p[fp], kind="stable")][:MISTAKES_SHOWN]
    fn = fn[np.argsort(p[fn], kind="stable")][:MISTAKES_SHOWN]
    return fp, fn


# ------------------------------------------------------------------------------------------------ figures
def _square_axes(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel=xlabel, ylabel=ylabel)
    ax.set_aspect("equal")


def _mark(ax: Axes, x: float | None, y: float | None, marker: str, color: str, label: str) -> None:
    """One operating point, skipped when undefined (e.g. no Youden threshold for a single class)."""
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return
    ax.plot(
        [x],
        [y],
        marker=marker,
        markersize=8,
        color=color,
        markeredgecolor="white",
        linestyle="none",
        label=label,
        zorder=5,
    )


@styled
def roc_figure(y: np.ndarray, p: np.ndarray, metrics: dict[str, Any]) -> Figure:
    """ROC curve with the AUC and its CI in the legend, and the threshold and Youden points marked."""
    fpr, tpr, _ = roc_curve(y, p)
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="#9AA5B1", linewidth=1)
    ci = _ci(metrics)
    ax.plot(
        fpr,
        tpr,
        color=CURVE_COLOR,
        linewidth=2,
        label=f"AUC {fmt(metrics.get('roc_auc'))}" + (f"\n({ci})" if ci else ""),
    )
    youden = metrics.get("at_youden") or {}
    _mark(
        ax,
        1 - metrics.get("specificity", math.nan),
        metrics.get("sensitivity"),
        "o",
        CURVE_COLOR,
        f"threshold {metrics.get('threshold', 0.5):.3g}",
    )
    _mark(
        ax,
        1 - youden.get("specificity", math.nan),
        youden.get("sensitivity"),
        "D",
        YOUDEN_COLOR,
        f"Youden {youden.get('threshold', math.nan):.3g}",
    )
    _square_axes(ax, "false positive rate (1 − specificity)", "true positive rate (sensitivity)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    return fig


@styled
def pr_figure(y: np.ndarray, p: np.ndarray, metrics: dict[str, Any]) -> Figure:
    """Precision-recall curve with the positive share as the chance line and the threshold point marked."""
    precision, recall, _ = precision_recall_curve(y, p)
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.axhline(y.mean(), linestyle="--", color="#9AA5B1", linewidth=1)
    ax.plot(
        recall,
        precision,
        color=CURVE_COLOR,
        linewidth=2,
        label=f"average precision {fmt(metrics.get('average_precision'))}",
    )
    _mark(
        ax,
        metrics.get("sensitivity"),
        metrics.get("precision"),
        "o",
        CURVE_COLOR,
        f"threshold {metrics.get('threshold', 0.5):.3g}",
    )
    _square_axes(ax, "recall (sensitivity)", "precision")
    ax.set_title("Precision–recall curve")
    ax.legend(loc="lower left")
    return fig


@styled
def confusion_figure(metrics: dict[str, Any]) -> Figure:
    """The 2x2 confusion matrix: counts, and each cell's share of its true class (which sets the shading)."""
    counts = np.array([[metrics.get("tn", 0), metrics.get("fp", 0)], [metrics.get("fn", 0), metrics.get("tp", 0)]])
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(4.4, 3.9), layout="constrained")
    ax = fig.subplots()
    ax.imshow(share, cmap="Greys", vmin=0, vmax=2.5)  # light shading: dark text stays readable in every cell
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{n:,}\n{share[i, j]:.1%}", ha="center", va="center", fontsize=11, color=INK)
    names = [CLASS_NAMES[0], CLASS_NAMES[1]]
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, c in zip(ticks, (0, 1), strict=True):
            label.set_color(CLASS_COLORS[c])
            label.set_fontweight("bold")
    ax.set(xlabel="predicted", ylabel="true")
    ax.grid(False)
    ax.set_title(f"Confusion at threshold {metrics.get('threshold', 0.5):.3g}")
    return fig


@styled
def score_histogram_figure(y: np.ndarray, p: np.ndarray, threshold: float, youden: float | None) -> Figure:
    """Predicted probability per true class on a log count axis, with the threshold(s) marked."""
    fig = Figure(figsize=(5.6, 3.9), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41)
    present = [c for c in (0, 1) if np.any(y == c)]
    for c in present:
        class_hist(ax, p[y == c], bins, CLASS_COLORS[c], density=False)
    lines = [
        ax.axvline(threshold, color=CURVE_COLOR, linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3g}")
    ]
    if youden is not None and math.isfinite(youden):
        lines.append(ax.axvline(youden, color=YOUDEN_COLOR, linestyle=":", linewidth=1.5, label=f"Youden {youden:.3g}"))
    ax.set_yscale("log")
    ax.set(xlim=(0, 1), xlabel="predicted probability of tumour", ylabel="patches")
    class_legend(fig, present, extra=lines)
    ax.set_title("Scores by true class")
    return fig


@styled
def calibration_figure(y: np.ndarray, p: np.ndarray) -> Figure:
    """Reliability curve over equal-width bins, above a histogram of the predictions it is based on."""
    fig = Figure(figsize=(4.8, 5.2), layout="constrained")
    ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    observed, predicted = calibration_curve(y, p, n_bins=CALIBRATION_BINS, strategy="uniform")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#9AA5B1", linewidth=1, label="perfectly calibrated")
    ax.plot(predicted, observed, marker="o", color=CURVE_COLOR, linewidth=1.8, label="this model")
    ax.set(xlim=(0, 1), ylim=(-0.01, 1.01), ylabel="observed share of tumour")
    ax.set_title("Calibration")
    ax.legend(loc="upper left")
    hist_ax.hist(p, bins=np.linspace(0, 1, CALIBRATION_BINS + 1), color="#9AA5B1", edgecolor="white")
    hist_ax.set_yscale("log")  # the extremes hold most predictions; the middle bins must stay visible
    hist_ax.yaxis.set_minor_formatter(NullFormatter())
    hist_ax.set(xlabel="predicted probability of tumour", ylabel="patches")
    return fig
