"""A cohort of slides built from real patches, judged end to end: ``cohort.json`` against an independent
computation from ``detections.csv`` and the ASAP outlines (a raster evaluation mask, as Camelyon16's script builds
one), and ``report.html`` in a real browser."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.draw import polygon as raster_polygon
from skimage.measure import label, regionprops
from sklearn.metrics import roc_auc_score

from histodetect.data.mosaic import CohortSlide, build_cohort
from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.infer.lesions import ITC_AXIS_UM, LESION_MARGIN_UM
from histodetect.infer.slide_batch import score_slides

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

MPP = 0.972
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> tuple[Path, list[CohortSlide]]:
    root = tmp_path_factory.mktemp("cohort")
    rows = sample_store.rows(labeled=True)
    slides = build_cohort(
        root / "data", sample_store.read(rows), sample_store.labels[rows], tumour_slides=3, normal_slides=2,
        grid=(7, 9), lesion_patches=(1, 6), seed=3, compression="zlib",
    )  # fmt: skip
    return root, slides


@pytest.fixture(scope="module")
def judged(cohort: tuple[Path, list[CohortSlide]], ranker: Predictor) -> Path:
    root, _ = cohort
    out = root / "scored"
    rows = score_slides(
        ranker, [root / "data" / "slides"], out, annotations=root / "data" / "annotations",
        reference=root / "data" / "reference.csv", workers=0, progress=False, threshold=0.5,
    )  # fmt: skip
    assert not [r for r in rows if "error" in r]
    return out


def evaluation_mask(xml: Path | None, shape: tuple[int, int]) -> tuple[np.ndarray, set[int]]:
    """Camelyon16's evaluation mask at level 0: outlines filled, dilated by the margin, holes filled, labelled (8
    neighbours); and the labels whose major axis is under the ITC size."""
    mask = np.zeros(shape, dtype=bool)
    if xml is not None:
        for annotation in ElementTree.parse(xml).getroot().iter("Annotation"):
            xy = np.array([(float(c.get("X")), float(c.get("Y"))) for c in annotation.iter("Coordinate")])
            rr, cc = raster_polygon(xy[:, 1], xy[:, 0], shape)
            mask[rr, cc] = True
    dilated = ndimage.distance_transform_edt(~mask) * MPP <= LESION_MARGIN_UM if mask.any() else mask
    labels = label(ndimage.binary_fill_holes(dilated), connectivity=2)
    itc = {r.label for r in regionprops(labels) if r.axis_major_length * MPP < ITC_AXIS_UM}
    return labels, itc


def independent_froc(out: Path, slides: list[CohortSlide]) -> tuple[float, int, int]:
    """The FROC score, the lesions that count and the ITCs."""
    fps, best, itcs = [], [], 0
    for slide in slides:
        found = pd.read_csv(out / slide.name / "detections.csv")
        summary = json.loads((out / slide.name / "summary.json").read_text())
        labels, itc = evaluation_mask(slide.annotations, (summary["height"], summary["width"]))
        x = np.clip(found["x"].to_numpy().astype(int), 0, summary["width"] - 1)
        y = np.clip(found["y"].to_numpy().astype(int), 0, summary["height"] - 1)
        hit = labels[y, x]
        itcs += len(itc)
        fps.append(found["probability"].to_numpy()[hit == 0])
        for lesion in set(range(1, labels.max() + 1)) - itc:
            inside = found["probability"].to_numpy()[hit == lesion]
            best.append(inside.max() if len(inside) else 0.0)
    fp, tp = np.concatenate(fps), np.array(best)
    thresholds = np.unique(np.concatenate([fp, tp[tp > 0]]))
    rate = np.array([(fp >= t).sum() for t in thresholds] + [0]) / len(slides)
    sensitivity = np.array([(tp >= t).sum() for t in thresholds] + [0]) / len(tp)
    score = float(np.mean(np.interp([0.25, 0.5, 1, 2, 4, 8], rate[::-1], sensitivity[::-1])))
    return score, len(tp), itcs


def test_cohort_metrics_agree_with_an_independent_computation(judged: Path, cohort) -> None:
    _, slides = cohort
    metrics = json.loads((judged / "cohort.json").read_text())
    table = pd.read_csv(judged / "slides.csv")
    truth = [int(name.startswith("tumor")) for name in table["name"]]
    assert metrics["slide"]["roc_auc"] == pytest.approx(roc_auc_score(truth, table["slide_score"]))
    assert (metrics["slide"]["tumour"], metrics["slide"]["normal"]) == (3, 2)
    low, high = metrics["slide"]["roc_auc_ci"]
    assert low <= metrics["slide"]["roc_auc"] <= high
    score, lesions, itcs = independent_froc(judged, slides)
    assert metrics["lesion"]["froc"] == pytest.approx(score, abs=0.01)
    assert (metrics["lesion"]["lesions"], metrics["lesion"]["itc"]) == (lesions, itcs)
    assert lesions + itcs == sum(len(s.lesions) for s in slides)  # the builder keeps lesions apart
    assert set(metrics["lesion"]["sensitivity_at"]) == {"0.25", "0.5", "1", "2", "4", "8"}
    assert metrics["problems"] == []
    lesions = pd.read_csv(judged / "tumor_001" / "lesions.csv")
    assert list(lesions.columns) == [
        "lesion", "x", "y", "area_mm2", "longest_axis_um", "itc", "found", "best_probability",
    ]  # fmt: skip
    assert list(pd.read_csv(judged / "normal_001" / "detections.csv").columns) == ["x", "y", "probability"]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium)")
def test_the_report_opens_sorts_and_fetches_nothing(judged: Path) -> None:
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto((judged / "report.html").as_uri())
            assert page.locator("table.sortable tbody tr").count() == 5
            assert page.locator("figure img").count() == 5 + 2  # every slide's heatmap, the ROC and FROC curves
            score = page.locator("table.sortable th", has_text="slide score")
            column = [h.inner_text() for h in page.locator("table.sortable th").all()].index("slide score")

            def scores() -> list[float]:
                cells = page.locator(f"table.sortable tbody tr td:nth-child({column + 1})").all()
                return [float(c.inner_text()) for c in cells]

            score.click()
            assert scores() == sorted(scores())
            score.click()
            assert scores() == sorted(scores(), reverse=True)
        finally:
            browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
