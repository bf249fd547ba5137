"""Lesion-level evaluation of one slide, as Camelyon16 judged it: detections from the heatmap, lesions from the
annotations, and which detection found which lesion.

- **Evidence.** A model's false positives on normal tissue are mostly lone patches, and an over-confident model gives
  them a probability near 1, as it gives a metastasis; what tells them apart is extent. So detections and the slide
  score read the heatmap averaged over squares of about ``EVIDENCE_UM`` (7x7 cells of 32 px at 0.972 um/px; glass
  counts as 0). Chosen on a tuning cohort of slides built from real held-out patches and the CPU preset's model
  (``benchmarks/cohort_metrics.py``): the highest such average was 0.38 on its 12 normal slides (their raw cells
  reached 0.997, with up to 72 cells >= 0.5) and 0.58 or more on 11 of its 12 tumour slides (lesions of 2-12 patches;
  the twelfth, a lesion of two patches the model saw only part of, 0.32); 5x5 cells left 7 normal slides above one
  half, 9x9 let a tumour slide fall under it. A held-out cohort then gave 0.47 and 0.71.
- **Detections** are the local maxima of that map: cells are taken in order of evidence, from the highest down to
  ``DETECTION_FLOOR``, and one is kept when no kept detection lies within ``NMS_RADIUS_UM`` of it (non-maximum
  suppression on the cell grid). Each is reported at its cell's centre in level-0 pixels with its evidence as its
  probability, the ``x,y,probability`` Camelyon16 asked of participants. The radius is about two patches: one
  detection per blob of a few patches (a lesion found twice is still one lesion, but a false blob found twice is two
  false positives), while lesions further apart than that get one each.
- **Lesions** are the connected regions of the annotated tumour after a ``LESION_MARGIN_UM`` dilation (holes filled;
  Camelyon16's own evaluation mask), computed on the polygons with shapely rather than on a raster, so they do not
  depend on a mask's resolution. A lesion whose longest axis is under ``ITC_AXIS_UM`` is an isolated tumour cell
  cluster (ITC): neither a hit nor a miss, and a detection on it is not a false positive either. The longest axis
  is the major axis of the ellipse with the same second moments, what the challenge's script reads from
  scikit-image (``regionprops(...).major_axis_length``); here it comes exactly from the polygon's moments.
- A lesion is **found** when a detection falls inside it (its dilated region), counted once at the best probability
  of the detections inside; every detection outside all lesions is a **false positive**.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import shapely
from scipy.ndimage import uniform_filter
from shapely.geometry import Polygon

LESION_MARGIN_UM = 75.0  # the annotation is dilated by this before lesions are labelled (~5 tumour cells)
ITC_AXIS_UM = 275.0  # lesions whose longest axis is shorter are isolated tumour cells
EVIDENCE_UM = 220.0  # side of the squares the heatmap is averaged over for detections and the slide score
DETECTION_FLOOR = 0.2  # cells whose evidence is below this start no detection
NMS_RADIUS_UM = 190.0  # no two detections closer than this (about two 96 px patches at 0.972 um/px)
DETECTION_COLUMNS = ["x", "y", "probability"]
LESION_COLUMNS = ["lesion", "x", "y", "area_mm2", "longest_axis_um", "itc", "found", "best_probability"]
LESION_REGIONS = "lesions.geojson"  # the lesions' regions, so a cohort can match detections to them again


def evidence(heatmap: np.ndarray, cell_um: float) -> np.ndarray:
    """float32: the heatmap (NaN where not scored: glass, 0) averaged over squares of an odd number of cells closest
    to ``EVIDENCE_UM`` a side (``cell_um`` microns a cell; one cell, no averaging, when cells are that large)."""
    size = max(1, 2 * round((EVIDENCE_UM / cell_um - 1) / 2) + 1)
    values = np.nan_to_num(heatmap, nan=0.0).astype(np.float32)
    return uniform_filter(values, size=size, mode="constant") if size > 1 else values


def detections(
    heatmap: np.ndarray, cell: float, mpp: float, *, floor: float = DETECTION_FLOOR, radius_um: float = NMS_RADIUS_UM
) -> pd.DataFrame:
    """``x,y,probability`` of the local maxima of ``heatmap`` (an evidence map, or any grid of probabilities;
    level-0 pixels: ``cell`` level-0 pixels a cell, ``mpp`` microns a level-0 pixel), most probable first."""
    values = np.nan_to_num(heatmap, nan=0.0)
    rows, cols = np.nonzero(values >= floor)
    order = np.lexsort((cols, rows, -values[rows, cols]))  # highest first; ties in row-major order
    radius = radius_um / (cell * mpp)  # in cells
    reach = int(np.ceil(radius))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disk = dy**2 + dx**2 <= radius**2
    suppressed = np.zeros(values.shape, dtype=bool)
    kept: list[tuple[int, int]] = []
    height, width = values.shape
    for r, c in zip(rows[order], cols[order], strict=True):
        if suppressed[r, c]:
            continue
        kept.append((r, c))
        r0, r1, c0, c1 = max(0, r - reach), min(height, r + reach + 1), max(0, c - reach), min(width, c + reach + 1)
        suppressed[r0:r1, c0:c1] |= disk[r0 - r + reach : r1 - r + reach, c0 - c + reach : c1 - c + reach]
    at = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return pd.DataFrame(
        {
            "x": np.round((at[:, 1] + 0.5) * cell, 2),
            "y": np.round((at[:, 0] + 0.5) * cell, 2),
            "probability": values[at[:, 0], at[:, 1]].astype(np.float64),
        },
        columns=DETECTION_COLUMNS,
    )


@dataclass(frozen=True)
class Lesion:
    """One connected region of the dilated annotation (level-0 pixels)."""

    region: Polygon  # the dilated region, holes filled
    area_mm2: float  # annotated tumour inside it (before the dilation)
    longest_axis_um: float
    itc: bool


def lesions(tumour: shapely.Geometry, mpp: float, *, margin_um: float = LESION_MARGIN_UM) -> list[Lesion]:
    """The lesions of the annotated ``tumour`` area (level-0 pixels; ``mpp`` microns a pixel), largest first."""
    if tumour.is_empty:
        return []
    dilated = shapely.buffer(tumour, margin_um / mpp)
    filled = shapely.union_all([Polygon(part.exterior) for part in _parts(dilated)])  # a hole's island merges in
    found = []
    for region in _parts(filled):
        axis = major_axis_length(region) * mpp
        area = shapely.area(shapely.intersection(region, tumour)) * (mpp / 1000) ** 2
        found.append(Lesion(region, float(area), float(axis), axis < ITC_AXIS_UM))
    found.sort(key=lambda lesion: -lesion.region.area)
    return found


def _parts(geometry: shapely.Geometry) -> list[Polygon]:
    return [g for g in shapely.get_parts(geometry) if isinstance(g, Polygon) and not g.is_empty]


def major_axis_length(polygon: Polygon) -> float:
    """The major axis of the ellipse with the polygon's second moments (``4 sqrt(largest eigenvalue)`` of its
    covariance), exactly from its vertices; what ``regionprops`` gives for the same region as a raster."""
    moments = np.zeros(6)  # area, int x, int y, int xx, int yy, int xy
    for ring, sign in [(polygon.exterior, 1.0), *((r, -1.0) for r in polygon.interiors)]:
        xy = np.asarray(ring.coords, dtype=np.float64)
        moments += sign * _ring_moments(xy - polygon.exterior.coords[0])
    area, sx, sy, sxx, syy, sxy = moments * np.sign(moments[0])
    if area <= 0:
        return 0.0
    cx, cy = sx / area, sy / area
    cov = np.array([[sxx / area - cx * cx, sxy / area - cx * cy], [sxy / area - cx * cy, syy / area - cy * cy]])
    return float(4 * np.sqrt(max(np.linalg.eigvalsh(cov)[-1], 0.0)))


def _ring_moments(xy: np.ndarray) -> np.ndarray:
    """Signed area and first and second moments of a closed ring (Green's theorem)."""
    x0, y0, x1, y1 = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
    c = x0 * y1 - x1 * y0
    return np.array(
        [
            c.sum() / 2,
            ((x0 + x1) * c).sum() / 6,
            ((y0 + y1) * c).sum() / 6,
            ((x0 * x0 + x0 * x1 + x1 * x1) * c).sum() / 12,
            ((y0 * y0 + y0 * y1 + y1 * y1) * c).sum() / 12,
            ((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * c).sum() / 24,
        ]
    )


def match(found: pd.DataFrame, lesion_list: list[Lesion]) -> tuple[pd.DataFrame, np.ndarray]:
    """The lesion table (``LESION_COLUMNS``) and, for each detection, the number of the lesion it falls in (1-based,
    in ``lesion_list``'s order; 0 outside every lesion: a false positive unless that lesion is an ITC)."""
    hit = np.zeros(len(found), dtype=np.int64)
    x, y = found["x"].to_numpy(dtype=np.float64), found["y"].to_numpy(dtype=np.float64)
    for k, lesion in enumerate(lesion_list, start=1):
        shapely.prepare(lesion.region)
        hit[(hit == 0) & shapely.contains_xy(lesion.region, x, y)] = k
    probability = found["probability"].to_numpy(dtype=np.float64)
    rows = []
    for k, lesion in enumerate(lesion_list, start=1):
        inside = probability[hit == k]
        centre = lesion.region.centroid
        rows.append(
            {
                "lesion": k,
                "x": round(centre.x, 1),
                "y": round(centre.y, 1),
                "area_mm2": round(lesion.area_mm2, 6),
                "longest_axis_um": round(lesion.longest_axis_um, 2),
                "itc": int(lesion.itc),
                "found": int(len(inside) > 0 and not lesion.itc),
                "best_probability": float(inside.max()) if len(inside) else None,
            }
        )
    return pd.DataFrame(rows, columns=LESION_COLUMNS), hit


def regions_geojson(lesion_list: list[Lesion]) -> dict[str, Any]:
    """``lesions.geojson``: the lesions (dilated regions) as QuPath annotations, numbered as in ``lesions.csv``."""
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": shapely.geometry.mapping(lesion.region),
                "properties": {
                    "objectType": "annotation",
                    "name": f"lesion {k}{' (ITC)' if lesion.itc else ''}",
                    "lesion": k,
                    "area_mm2": lesion.area_mm2,
                    "longest_axis_um": lesion.longest_axis_um,
                    "itc": lesion.itc,
                },
            }
            for k, lesion in enumerate(lesion_list, start=1)
        ],
    }
