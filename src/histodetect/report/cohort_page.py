"""``OUT/report.html``: the page a pathologist opens first after ``slide`` has judged a cohort.

Headline numbers (slide ROC AUC with its CI, decisions right, FROC, lesions found), the cohort table (sortable by
any column), the ROC and FROC curves with the operating points marked, and every slide's heatmap with the outlines
and the detections (circles: a lesion found; crosses: false positives). Self-contained: figures are embedded, the
only script is inline, nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histodetect.io import read_small_file
from histodetect.report.figures import styled
from histodetect.report.html import Card, Page

REPORT = "report.html"
MAX_HEATMAP_BYTES = 16 << 20  # a heatmap.png embedded in the page (slide's are ~100 KB)


def write_cohort_page(
    out: Path,
    metrics: dict[str, Any],
    table: pd.DataFrame,
    truth: np.ndarray,
    scores: np.ndarray,
    heatmaps: list[tuple[Path, str]],
) -> Path:
    """Write ``out/report.html`` (and its two curves as PNGs beside it): ``metrics`` is ``cohort.json``, ``table``
    a row per slide, ``truth`` and ``scores`` the slides with a known truth (ROC), ``heatmaps`` each slide's
    ``heatmap.png`` with its caption."""
    slide, lesion = metrics["slide"], metrics["lesion"]
    page = Page(out, "Cohort report", f"{len(table)} slides scored in {out}")
    page.cards(_cards(slide, lesion))
    if metrics["problems"]:
        section = page.section("Problems", "What leaves a metric incomplete, by slide.")
        for problem in metrics["problems"]:
            section.note(problem, "warn")
    page.section(
        "Slides",
        "One row per slide; click a column's header to sort by it. Decision: slide score >= "
        f"{slide['threshold']:g}. Tumour area: cells at or above the threshold.",
    ).table(table, sortable=True)
    curves = page.section("Curves", "Operating points at the slide threshold and at Camelyon16's FP rates.")
    if slide["roc_auc"] is not None:
        roc = _roc_figure(truth, scores, slide)
        curves.figure(roc, "cohort-roc", f"Slide-level ROC: AUC {slide['roc_auc']:.3f}")
    if lesion["froc"] is not None:
        curves.figure(_froc_figure(lesion), "cohort-froc", f"Lesion-level FROC: score {lesion['froc']:.3f}")
    gallery = page.section(
        "Heatmaps",
        "Each slide with its tumour probability, the annotated outlines (purple), and the detections: green circles "
        "found a lesion, blue crosses are false positives.",
    )
    for png, caption in heatmaps:
        if png.exists() or png.is_symlink():
            try:
                gallery.image(read_small_file(png, MAX_HEATMAP_BYTES), caption)
            except OSError as exc:  # a damaged or foreign folder: say so, keep the rest of the page
                gallery.note(f"{png}: not shown ({exc})", "warn")
    return page.write(REPORT)


def _cards(slide: dict[str, Any], lesion: dict[str, Any]) -> list[Card]:
    cards = []
    if slide["roc_auc"] is not None:
        low, high = slide["roc_auc_ci"]
        cards.append(Card("Slide ROC AUC", f"{slide['roc_auc']:.3f}", f"95% CI {low:.3f}-{high:.3f}", "good"))
    if slide["slides"]:
        tone = "good" if slide["correct"] == slide["slides"] else "warn"
        cards.append(
            Card("Decisions right", f"{slide['correct']}/{slide['slides']}", f"at {slide['threshold']:g}", tone)
        )
    if lesion["froc"] is not None:
        cards.append(Card("FROC score", f"{lesion['froc']:.3f}", "mean sensitivity at 1/4-8 FP per slide", "good"))
        cards.append(Card("Lesions found", f"{lesion['found']}/{lesion['lesions']}", f"{lesion['itc']} ITC aside"))
        per_slide = lesion["false_positives"] / max(lesion["slides"], 1)
        cards.append(Card("False positives", f"{per_slide:.1f}", "per slide, all detections"))
    return cards


@styled
def _roc_figure(truth: np.ndarray, scores: np.ndarray, slide: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(truth, scores)
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot(fpr, tpr, drawstyle="steps-post", color="#1F4E79", linewidth=2)
    ax.plot([0, 1], [0, 1], color="#BBBBBB", linestyle="--", linewidth=1)
    ax.scatter([1 - slide["specificity"]], [slide["sensitivity"]], color="#C2410C", zorder=3, s=45)
    ax.annotate(f"threshold {slide['threshold']:g}", (1 - slide["specificity"], slide["sensitivity"]),
                textcoords="offset points", xytext=(8, -14), fontsize=9)  # fmt: skip
    ax.set(xlabel="1 - specificity (normal slides called tumour)", ylabel="sensitivity", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title="Slides")  # fmt: skip
    return fig


@styled
def _froc_figure(lesion: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fps = np.array(lesion["curve"]["false_positives_per_slide"], dtype=float)
    sens = np.array([np.nan if v is None else v for v in lesion["curve"]["sensitivity"]], dtype=float)
    order = np.argsort(fps, kind="stable")
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot(np.maximum(fps[order], 1e-2), sens[order], color="#1F4E79", linewidth=2)
    rates = [float(rate) for rate in lesion["sensitivity_at"]]
    ax.scatter(rates, list(lesion["sensitivity_at"].values()), color="#C2410C", zorder=3, s=40)
    ax.set_xscale("log")
    ax.set(xlabel="average false positives per slide", ylabel="lesions found (sensitivity)", ylim=(-0.02, 1.02))
    ax.set(xlim=(0.1, max(10.0, float(fps.max(initial=0)) * 1.2)), title=f"Lesions: FROC {lesion['froc']:.3f}")
    return fig
