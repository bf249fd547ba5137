"""Camelyon16's lesion rules on slides whose answer is known by construction: hand-placed outlines and heatmaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from skimage.draw import polygon as raster_polygon
from skimage.measure import regionprops

from histodetect.infer.lesions import ITC_AXIS_UM, detections, evidence, lesions, major_axis_length, match

MPP = 1.0  # one micron a level-0 pixel keeps the arithmetic readable


def found_at(*points: tuple[float, float, float]) -> pd.DataFrame:
    return pd.DataFrame(points, columns=["x", "y", "probability"])


def test_detections_are_local_maxima_one_per_blob_at_cell_centres() -> None:
    heatmap = np.full((40, 40), np.nan, dtype=np.float32)
    heatmap[5:8, 5:8] = 0.7
    heatmap[6, 6] = 0.9  # the blob's peak
    heatmap[30, 30] = 0.8  # another blob, far away
    heatmap[20, 20] = 0.3  # under the floor: no detection
    found = detections(heatmap, cell=32, mpp=MPP, floor=0.5, radius_um=100)
    assert found.to_dict("list") == {"x": [208.0, 976.0], "y": [208.0, 976.0], "probability": pytest.approx([0.9, 0.8])}


def test_a_lone_confident_false_patch_averages_under_a_half_and_a_two_patch_lesion_over() -> None:
    heatmap = np.full((40, 40), 0.02, dtype=np.float32)
    heatmap[3:7, 3:7] = 0.99  # one patch the model is sure of, wrongly: a blob of 16 cells of 32 px, as measured
    heatmap[20:25, 10:18] = 0.99  # two patches of tumour side by side: the cells whose windows reach them
    heatmap[0, :] = np.nan  # glass counts as no tumour
    smoothed = evidence(heatmap, cell_um=32 * 0.972)  # 7x7 cells: 218 um
    assert smoothed[:12, :12].max() < 0.5 < smoothed[15:, :].max()
    assert smoothed[5, 5] == pytest.approx((16 * 0.99 + 33 * 0.02) / 49)
    assert np.array_equal(evidence(heatmap, cell_um=300), np.nan_to_num(heatmap))  # a cell that large: as it is


def test_two_peaks_within_the_radius_make_one_detection_and_further_apart_two() -> None:
    heatmap = np.zeros((10, 20), dtype=np.float32)
    heatmap[5, 2], heatmap[5, 4] = 0.9, 0.8  # 64 um apart
    heatmap[5, 15] = 0.85  # 416 um from the first
    found = detections(heatmap, cell=32, mpp=MPP, floor=0.5, radius_um=100)
    assert found["probability"].tolist() == pytest.approx([0.9, 0.85])


def test_a_small_lesion_is_an_itc_and_a_large_one_is_not() -> None:
    small = shapely.box(0, 0, 50, 50)  # 50 um: 200 um a side after the 75 um margin, axis 1.15 x 200 < 275
    large = shapely.box(1000, 1000, 1300, 1300)
    found = lesions(shapely.union_all([small, large]), MPP)
    assert [lesion.itc for lesion in found] == [False, True]  # largest first
    assert found[0].area_mm2 == pytest.approx(0.09) and found[1].area_mm2 == pytest.approx(0.0025)
    assert found[1].longest_axis_um < ITC_AXIS_UM < found[0].longest_axis_um


def test_outlines_closer_than_twice_the_margin_are_one_lesion() -> None:
    near = shapely.union_all([shapely.box(0, 0, 300, 300), shapely.box(400, 0, 700, 300)])  # 100 um apart
    far = shapely.union_all([shapely.box(0, 0, 300, 300), shapely.box(500, 0, 800, 300)])  # 200 um apart
    assert len(lesions(near, MPP)) == 1 and len(lesions(far, MPP)) == 2


def test_a_ring_of_tumour_is_one_lesion_with_its_hole_filled() -> None:
    ring = shapely.box(0, 0, 1000, 1000).difference(shapely.box(300, 300, 700, 700))
    (lesion,) = lesions(ring, MPP)
    assert lesion.region.contains(shapely.Point(500, 500))  # a detection in the hole hits the lesion


def test_the_major_axis_is_what_regionprops_reads_from_the_same_region_as_a_raster() -> None:
    shape = shapely.Polygon([(0, 0), (400, 0), (400, 100), (100, 300), (0, 300)])
    rows, cols = raster_polygon(np.array([0, 0, 100, 300, 300]), np.array([0, 400, 400, 100, 0]), (301, 401))
    raster = np.zeros((301, 401), dtype=np.uint8)
    raster[rows, cols] = 1
    assert major_axis_length(shape) == pytest.approx(regionprops(raster)[0].axis_major_length, rel=0.01)


def test_matching_counts_a_lesion_once_ignores_itcs_and_honours_the_margin() -> None:
    tumour = shapely.union_all([shapely.box(0, 0, 400, 400), shapely.box(2000, 2000, 2040, 2040)])
    found = lesions(tumour, MPP)  # lesion 1: the large square; lesion 2: an ITC
    hits = found_at(
        (200, 200, 0.7),  # inside lesion 1
        (100, 100, 0.9),  # inside lesion 1 again: counted once, at its best
        (450, 200, 0.6),  # 50 um outside the outline, inside the 75 um margin: a hit, not a false positive
        (2020, 2020, 0.99),  # on the ITC: neither hit nor false positive
        (1200, 1200, 0.8),  # nowhere: a false positive
    )
    table, lesion_of = match(hits, found)
    assert lesion_of.tolist() == [1, 1, 1, 2, 0]
    assert table[["lesion", "itc", "found"]].values.tolist() == [[1, 0, 1], [2, 1, 0]]
    assert table["best_probability"].tolist() == pytest.approx([0.9, 0.99])


def test_a_normal_slide_has_no_lesions_and_every_detection_is_a_false_positive() -> None:
    table, lesion_of = match(found_at((10, 10, 0.9), (500, 500, 0.6)), lesions(shapely.Polygon(), MPP))
    assert table.empty and lesion_of.tolist() == [0, 0]
