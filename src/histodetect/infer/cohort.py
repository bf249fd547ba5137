"""A cohort judged as Camelyon16 judged one: slide-level ROC AUC and lesion-level FROC, from the slide folders
``slide`` wrote (``OUT/<slide>/summary.json``, ``detections.csv``, ``lesions.geojson``).

- Truth per slide: the reference CSV (:mod:`histodetect.data.reference`) when given; otherwise a slide is tumour when
  its annotation file outlines tumour and normal when it outlines none or has no file.
- Slide level: ROC AUC of ``slide_score`` with a stratified bootstrap 95% CI, and sensitivity and specificity of the
  decision ``slide_score >= threshold``.
- Lesion level (Camelyon16's FROC, :mod:`histodetect.infer.lesions` for lesions and detections): over every slide
  that can be judged (normal slides, and tumour slides with outlines), the operating points of a threshold swept
  over the detections' probabilities: average false positives per slide against the share of lesions (ITCs aside)
  found at or above it. Sensitivity at 1/4, 1/2, 1, 2, 4 and 8 false positives per slide is interpolated between
  operating points as the challenge's script does (``np.interp``), and the FROC score is their mean.
- Problems that leave a metric incomplete (a reference naming a slide not scored, a tumour slide without outlines,
  a reference that disagrees with the outlines, a folder whose ``summary.json``, ``detections.csv`` or
  ``lesions.geojson`` is damaged or missing: left out, with the file and what is wrong) are listed by name in
  ``problems``.

``cohort.json`` is rewritten after every slide from every finished folder (as ``slides.csv`` is), atomically.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from shapely.errors import GEOSException
from shapely.geometry import shape

from histodetect.errors import InferError
from histodetect.infer.lesions import DETECTION_COLUMNS, LESION_REGIONS, Lesion, match
from histodetect.infer.slide_outputs import read_summaries
from histodetect.io import atomic_write_json, read_small_file
from histodetect.metrics import roc_auc
from histodetect.report.cohort_page import write_cohort_page
from histodetect.report.metrics import bootstrap_auc_ci, threshold_metrics

FROC_POINTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
COHORT = "cohort.json"
DETECTIONS = "detections.csv"
MAX_FOLDER_FILE_BYTES = 64 << 20  # detections.csv / lesions.geojson of one slide: slide writes kilobytes


@dataclass
class SlideResult:
    """One finished slide folder, with its truth and its lesion evaluation (when it can be judged)."""

    name: str
    summary: dict[str, Any]
    tumour: bool | None  # None: truth unknown
    detections: pd.DataFrame
    lesions: pd.DataFrame | None  # None: lesions cannot be judged (a tumour slide without outlines)
    hits: np.ndarray  # per detection: lesion number (1-based) or 0

    @property
    def false_positives(self) -> np.ndarray:
        return self.detections["probability"].to_numpy(dtype=np.float64)[self.hits == 0]

    @property
    def lesion_best(self) -> np.ndarray:
        """Best probability of each lesion that counts (ITCs aside); 0 for a missed one."""
        if self.lesions is None or self.lesions.empty:
            return np.zeros(0)
        counted = self.lesions[self.lesions["itc"] == 0]
        return counted["best_probability"].fillna(0.0).to_numpy(dtype=np.float64)


def load_slides(out: Path, reference: dict[str, bool] | None) -> tuple[list[SlideResult], list[str]]:
    """Every finished slide folder under ``out`` with its truth; and the problems found, by slide name. A folder
    whose files are damaged (by hand or by another tool) is one of the problems, named with what is wrong: never a
    crash of the whole cohort, never dropped without a word."""
    results: list[SlideResult] = []
    problems: list[str] = []
    finished = read_summaries(out)
    for name, summary in finished:
        try:
            result = _load_slide(out / name, summary, reference, problems)
        except InferError as exc:
            problems.append(f"{name}: left out of the cohort metrics ({exc})")
            continue
        results.append(result)
    if reference is not None:
        scored = {name for name, _ in finished}
        problems += [f"{name}: in the reference but not scored" for name in sorted(set(reference) - scored)]
    return results, problems


def _load_slide(
    folder: Path, summary: dict[str, Any], reference: dict[str, bool] | None, problems: list[str]
) -> SlideResult:
    """One finished folder with its truth (appending what leaves its metrics incomplete to ``problems``); an
    ``InferError`` naming the file when the folder cannot be judged as it stands."""
    name = folder.name
    if "error" in summary:
        raise InferError(str(summary["error"]))
    score = summary.get("slide_score")
    if score is not None and not (_is_number(score) and 0 <= score <= 1):
        raise InferError(f"{folder / 'summary.json'}: slide_score {str(score)[:40]!r} is not a probability")
    outlined = summary.get("annotations") is not None
    outlines_tumour = bool(summary.get("slide_tumour")) if outlined else False
    tumour: bool | None = outlines_tumour
    if reference is not None:
        tumour = reference.get(name)
        if tumour is None:
            problems.append(f"{name}: scored but not in the reference; left out of the cohort metrics")
        elif tumour and not outlined:
            problems.append(f"{name}: a tumour slide without outlines; left out of the lesion metrics")
        elif not tumour and outlines_tumour:
            problems.append(f"{name}: the reference says Normal but its annotations outline tumour")
    judged = tumour is not None and (outlined or not tumour)
    found = _read_detections(folder, required=judged)
    lesion_table = None
    hits = np.zeros(len(found), dtype=np.int64)
    if judged:
        regions = _read_regions(folder, required=outlined)
        lesion_table, hits = match(found, regions)
    return SlideResult(name, summary, tumour, found, lesion_table, hits)


def _folder_file(folder: Path, name: str, required: bool) -> bytes | None:
    """The bytes of ``folder/name``, a regular file within ``MAX_FOLDER_FILE_BYTES``; None when absent and not
    ``required``; otherwise an ``InferError`` saying what it is."""
    path = folder / name
    if not path.exists() and not path.is_symlink():
        if required:
            raise InferError(f"{path}: missing; score the slide again (delete its folder) to rebuild it")
        return None
    try:
        return read_small_file(path, MAX_FOLDER_FILE_BYTES)
    except OSError as exc:
        raise InferError(f"{path}: {exc.strerror or exc}") from None


def _read_detections(folder: Path, required: bool) -> pd.DataFrame:
    """``detections.csv``: finite level-0 ``x,y`` and a ``probability`` in [0, 1] per row, else an ``InferError``."""
    path, data = folder / DETECTIONS, _folder_file(folder, DETECTIONS, required)
    if data is None:
        return pd.DataFrame({column: np.zeros(0) for column in DETECTION_COLUMNS})
    try:
        table = pd.read_csv(io.BytesIO(data))
    except ValueError as exc:  # ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        raise InferError(f"{path}: not a readable CSV ({str(exc)[:120]})") from None
    missing = [c for c in DETECTION_COLUMNS if c not in table.columns]
    if missing:
        raise InferError(f"{path}: no column {', '.join(missing)}; expected {','.join(DETECTION_COLUMNS)}")
    values = table[DETECTION_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1) | (values[:, 2] < 0) | (values[:, 2] > 1)
    if bad.any():
        line = int(np.argmax(bad)) + 2  # the header is line 1
        raise InferError(f"{path}: line {line}: x and y must be finite numbers and probability within [0, 1]")
    return pd.DataFrame(values, columns=DETECTION_COLUMNS)


def _read_regions(folder: Path, required: bool) -> list[Lesion]:
    """The lesions a slide folder recorded (``lesions.geojson``), in their numbered order, else an ``InferError``."""
    path, data = folder / LESION_REGIONS, _folder_file(folder, LESION_REGIONS, required)
    if data is None:
        return []
    try:
        features = json.loads(data.decode("utf-8"))["features"]
        regions = [
            Lesion(shape(f["geometry"]), float(p["area_mm2"]), float(p["longest_axis_um"]), bool(p["itc"]))
            for f in features
            for p in [f["properties"]]
        ]
    except RecursionError:
        raise InferError(f"{path}: JSON nested too deeply to be lesions") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, GEOSException) as exc:
        raise InferError(f"{path}: not the lesions slide wrote ({type(exc).__name__}: {str(exc)[:80]})") from None
    for k, lesion in enumerate(regions, start=1):
        if (
            lesion.region.geom_type not in ("Polygon", "MultiPolygon")
            or not np.isfinite(shapely.get_coordinates(lesion.region)).all()
        ):
            raise InferError(f"{path}: lesion {k} is not a polygon with finite coordinates")
    return regions


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def froc(false_positives: np.ndarray, lesion_best: np.ndarray, n_slides: int) -> dict[str, Any]:
    """Camelyon16's FROC: operating points over every detection probability, sensitivity at ``FROC_POINTS``
    average false positives per slide (linear interpolation), and their mean."""
    n_lesions = len(lesion_best)
    thresholds = np.unique(np.concatenate([false_positives, lesion_best[lesion_best > 0]]))
    fp_sorted = np.sort(false_positives)
    hit_sorted = np.sort(lesion_best[lesion_best > 0])
    # counts at or above each threshold (ascending thresholds: falling counts), then the point with none called
    fps = np.append(len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left"), 0) / max(n_slides, 1)
    tps = np.append(len(hit_sorted) - np.searchsorted(hit_sorted, thresholds, side="left"), 0)
    sensitivity = tps / n_lesions if n_lesions else np.full(len(tps), np.nan)
    at = np.interp(FROC_POINTS, fps[::-1], sensitivity[::-1]) if n_lesions else np.full(len(FROC_POINTS), np.nan)
    return {
        "froc": _num(float(np.mean(at))) if n_lesions else None,
        "sensitivity_at": {f"{p:g}": _num(float(s)) for p, s in zip(FROC_POINTS, at, strict=True)},
        "curve": {"false_positives_per_slide": fps.round(6).tolist(), "sensitivity": _nums(sensitivity)},
    }


def cohort_metrics(
    results: list[SlideResult], problems: list[str], *, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """``cohort.json``'s content (see the module's docstring)."""
    known = [r for r in results if r.tumour is not None and r.summary.get("slide_score") is not None]
    y = np.array([int(bool(r.tumour)) for r in known], dtype=np.int64)
    p = np.array([float(r.summary["slide_score"]) for r in known], dtype=np.float64)
    slide: dict[str, Any] = {
        "slides": len(known),
        "tumour": int(y.sum()),
        "normal": int(len(y) - y.sum()),
        "score": "slide_score",
        "threshold": threshold,
        "roc_auc": None,
        "roc_auc_ci": None,
    }
    if 0 < y.sum() < len(y):
        low, high = bootstrap_auc_ci(y, p, seed=seed)
        slide["roc_auc"], slide["roc_auc_ci"] = roc_auc(y, p), [_num(low), _num(high)]
    if len(y):
        decided = threshold_metrics(y, p, threshold)
        slide.update(
            sensitivity=_num(decided["sensitivity"]),
            specificity=_num(decided["specificity"]),
            accuracy=decided["accuracy"],
            correct=decided["tp"] + decided["tn"],
        )
    judged = [r for r in known if r.lesions is not None]
    fps = np.concatenate([r.false_positives for r in judged]) if judged else np.zeros(0)
    best = np.concatenate([r.lesion_best for r in judged]) if judged else np.zeros(0)
    n_itc = sum(int(r.lesions["itc"].sum()) for r in judged if r.lesions is not None and not r.lesions.empty)
    lesion = {
        "slides": len(judged),
        "lesions": len(best),
        "found": int((best > 0).sum()),
        "itc": n_itc,
        "false_positives": len(fps),
        **froc(fps, best, len(judged)),
    }
    return {"slide": slide, "lesion": lesion, "problems": problems}


def write_cohort(
    out: Path, reference: dict[str, bool] | None, *, threshold: float
) -> tuple[dict[str, Any], list[SlideResult]]:
    """Rewrite ``out/cohort.json`` from every finished slide folder; returns it and the slides it read."""
    results, problems = load_slides(out, reference)
    metrics = cohort_metrics(results, problems, threshold=threshold)
    atomic_write_json(out / COHORT, metrics)
    return metrics, results


def write_report(out: Path, metrics: dict[str, Any], results: list[SlideResult]) -> Path:
    """``out/report.html`` (:mod:`histodetect.report.cohort_page`) for what :func:`write_cohort` read."""
    threshold = metrics["slide"]["threshold"]
    known = [r for r in results if r.tumour is not None and r.summary.get("slide_score") is not None]
    truth = np.array([int(bool(r.tumour)) for r in known], dtype=np.int64)
    scores = np.array([float(r.summary["slide_score"]) for r in known], dtype=np.float64)
    heatmaps = [(out / r.name / "heatmap.png", f"{r.name}: {_verdict(r, threshold)}") for r in results]
    return write_cohort_page(out, metrics, cohort_table(results, threshold), truth, scores, heatmaps)


def cohort_table(results: list[SlideResult], threshold: float) -> pd.DataFrame:
    """The cohort table the page shows (one row per slide)."""
    rows = []
    for r in results:
        s = r.summary
        score = s.get("slide_score")
        decision = None if score is None else bool(score >= threshold)
        lesions = r.lesions[r.lesions["itc"] == 0] if r.lesions is not None and not r.lesions.empty else None
        rows.append(
            {
                "slide": r.name,
                "reference": {True: "Tumor", False: "Normal", None: None}[r.tumour],
                "slide score": None if score is None else round(float(score), 4),
                "decision": {True: "Tumor", False: "Normal", None: None}[decision],
                "right": None if r.tumour is None or decision is None else ("yes" if decision == r.tumour else "no"),
                "tumour area mm2": s.get("area_above_threshold_mm2"),
                "lesions found": None if lesions is None else f"{int(lesions['found'].sum())}/{len(lesions)}",
                "false positives": int((r.hits == 0).sum()) if r.lesions is not None else None,
                "cells": s.get("cells_scored"),
                "seconds": s.get("seconds"),
            }
        )
    return pd.DataFrame(rows)


def _verdict(result: SlideResult, threshold: float) -> str:
    score = result.summary.get("slide_score")
    truth = {True: "tumour", False: "normal", None: "truth unknown"}[result.tumour]
    return f"{truth}, slide score {score:.3f} (threshold {threshold:g})" if score is not None else truth


def _num(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _nums(values: np.ndarray) -> list[float | None]:
    return [_num(float(v)) for v in values]
