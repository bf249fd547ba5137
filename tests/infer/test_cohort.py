"""Cohort metrics on cohorts whose answer is known by construction, and against independent computations (the
Camelyon16 script's FROC loop, scikit-learn's ROC AUC)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from sklearn.metrics import roc_auc_score

from histodetect.data.reference import read_reference
from histodetect.infer.cohort import FROC_POINTS, froc, load_slides, write_cohort
from histodetect.infer.lesions import LESION_REGIONS, lesions, regions_geojson


def official_froc(false_positives: list[np.ndarray], lesion_best: list[np.ndarray]) -> float:
    """Camelyon16's ``computeFROC`` written again from its description: a threshold at every probability, counts
    at or above it, the point with nothing called, then ``np.interp`` at the six rates and their mean."""
    fps, tps = np.concatenate(false_positives), np.concatenate(lesion_best)
    thresholds = sorted(set(fps.tolist()) | set(tps[tps > 0].tolist()))
    total_fp = [(fps >= t).sum() for t in thresholds] + [0]
    total_tp = [(tps >= t).sum() for t in thresholds] + [0]
    fp_rate = np.asarray(total_fp) / len(false_positives)
    sensitivity = np.asarray(total_tp) / len(tps)
    return float(np.mean(np.interp(FROC_POINTS, fp_rate[::-1], sensitivity[::-1])))


def test_froc_of_a_hand_made_cohort() -> None:
    # slide 1: lesions found at 0.9 and 0.6, one false positive at 0.8; slide 2 (normal): false positives 0.7, 0.95
    result = froc(np.array([0.8, 0.7, 0.95]), np.array([0.9, 0.6]), n_slides=2)
    # operating points (FP/slide, sensitivity): (1.5, 1), (1.5, .5), (1, .5), (.5, .5), (.5, 0), (0, 0)
    assert result["sensitivity_at"] == {"0.25": 0.0, "0.5": 0.5, "1": 0.5, "2": 1.0, "4": 1.0, "8": 1.0}
    assert result["froc"] == pytest.approx(4 / 6)


def test_a_missed_lesion_lowers_every_sensitivity() -> None:
    result = froc(np.array([]), np.array([0.9, 0.0, 0.8, 0.0]), n_slides=3)  # two of four lesions found, no FP
    assert set(result["sensitivity_at"].values()) == {0.5} and result["froc"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_froc_equals_the_challenges_computation_on_random_cohorts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slides = int(rng.integers(3, 30))
    fps = [rng.uniform(0.5, 1, size=rng.integers(0, 12)).round(2) for _ in range(slides)]
    best = [np.where(rng.random(k) < 0.7, rng.uniform(0.5, 1, k).round(2), 0.0) for k in rng.integers(0, 4, slides)]
    if not np.concatenate(best).size:
        best[0] = np.array([0.75])
    ours = froc(np.concatenate(fps), np.concatenate(best), slides)["froc"]
    assert ours == pytest.approx(official_froc(fps, best), abs=1e-12)


def write_slide_folder(
    out: Path, name: str, score: float, found: list[tuple[float, float, float]], tumour: shapely.Geometry | None
) -> None:
    """A finished slide folder as ``slide`` writes one: summary.json, detections.csv, lesions.geojson."""
    folder = out / name
    folder.mkdir(parents=True)
    summary = {"slide_score": score, "annotations": None if tumour is None else f"{name}.xml"}
    if tumour is not None:
        summary["slide_tumour"] = not tumour.is_empty
        (folder / LESION_REGIONS).write_text(json.dumps(regions_geojson(lesions(tumour, 1.0))))
    pd.DataFrame(found, columns=["x", "y", "probability"]).to_csv(folder / "detections.csv", index=False)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_cohort_from_slide_folders_matches_its_construction(tmp_path: Path) -> None:
    square = shapely.box(0, 0, 500, 500)
    write_slide_folder(tmp_path, "tumor_1", 0.9, [(250, 250, 0.9), (3000, 3000, 0.6)], square)
    write_slide_folder(tmp_path, "tumor_2", 0.4, [], square)  # its lesion missed
    write_slide_folder(tmp_path, "normal_1", 0.7, [(10, 10, 0.7)], shapely.Polygon())
    write_slide_folder(tmp_path, "normal_2", 0.2, [], None)  # no outlines at all: normal by the reference
    reference = tmp_path / "reference.csv"
    reference.write_text("tumor_1.tif,Tumor\ntumor_2,Tumor\nnormal_1,Normal,extra\nnormal_2.tif,Normal\nlost,Tumor\n")
    metrics, _ = write_cohort(tmp_path, read_reference(reference), threshold=0.5)
    slide, lesion = metrics["slide"], metrics["lesion"]
    y, p = [1, 1, 0, 0], [0.9, 0.4, 0.7, 0.2]
    assert slide["roc_auc"] == pytest.approx(roc_auc_score(y, p)) == 0.75
    assert (slide["tumour"], slide["normal"], slide["sensitivity"], slide["specificity"]) == (2, 2, 0.5, 0.5)
    assert lesion["lesions"] == 2 and lesion["found"] == 1 and lesion["false_positives"] == 2
    by_slide_fps = [np.array([0.6]), np.array([0.7]), np.array([]), np.array([])]
    assert lesion["froc"] == pytest.approx(official_froc(by_slide_fps, [np.array([0.9]), np.array([0.0])]))
    assert metrics["problems"] == ["lost: in the reference but not scored"]
    assert json.loads((tmp_path / "cohort.json").read_text()) == json.loads(json.dumps(metrics))


def test_a_tumour_slide_without_outlines_is_named_and_left_out_of_the_lesion_metrics(tmp_path: Path) -> None:
    write_slide_folder(tmp_path, "tumor_1", 0.9, [(250, 250, 0.9)], None)
    write_slide_folder(tmp_path, "normal_1", 0.1, [(10, 10, 0.7)], None)
    results, problems = load_slides(tmp_path, {"tumor_1": True, "normal_1": False})
    assert problems == ["tumor_1: a tumour slide without outlines; left out of the lesion metrics"]
    assert [r.lesions is not None for r in results] == [True, False]  # normal_1 sorts first


def test_a_foreign_folder_with_a_broken_summary_is_named_not_fatal(tmp_path: Path) -> None:
    write_slide_folder(tmp_path, "tumor_1", 0.9, [(250, 250, 0.9)], shapely.box(0, 0, 500, 500))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "summary.json").write_text("{not json")
    metrics, results = write_cohort(tmp_path, None, threshold=0.5)
    assert [r.name for r in results] == ["tumor_1"] and metrics["lesion"]["found"] == 1
    assert len(metrics["problems"]) == 1 and metrics["problems"][0].startswith("notes: left out of the cohort metrics")
