"""What ``slide`` writes for one scored slide (DEVELOPERS.md, "Slide outputs"), all in level-0 pixels of the slide,
the coordinate system slide viewers use.

- ``cells.csv``: one row per scored cell: ``row,col`` in the cell grid, ``x,y,size`` (top-left corner and side in
  level-0 pixels), ``tissue`` (share of the cell's 96 px window that is tissue), ``probability``; ``tumour`` (0/1,
  the cell's centre inside an annotated tumour) when annotations were given.
- ``heatmap.npy``: float32, one value per cell of the grid, NaN where not scored.
- ``heatmap.png``: a thumbnail of the slide with each scored cell tinted by its probability, and a colour bar.
- ``tumour.geojson``: a FeatureCollection QuPath imports by drag-and-drop: each connected region of cells at or
  above the threshold as one polygon (the union of its cells, shapely), classified ``Tumor``, with its mean and max
  probability, cell count and area as measurements. ``cells.geojson`` (optional): every scored cell as a tile.
- ``detections.csv``: ``x,y,probability`` of the evidence map's local maxima (:mod:`histodetect.infer.lesions`), the
  columns Camelyon16 asked of participants, most probable first.
- ``lesions.csv`` and ``lesions.geojson`` (with annotations): the lesions of the outlines (Camelyon16's protocol),
  whether a detection found each and at what probability; the regions, for cohort metrics and QuPath.
- ``summary.json``: written last.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from skimage.measure import label, regionprops

from histodetect.data.wsi import SlideReader
from histodetect.infer import lesions
from histodetect.io import atomic_write_json, read_small_file
from histodetect.metrics import roc_auc

THUMBNAIL = 1600  # longest side of heatmap.png's slide image, in pixels
TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}  # QuPath's own class name for tumour
MAX_SUMMARY_BYTES = 1 << 20  # a slide's summary.json is a few kilobytes


@dataclass
class ScoredSlide:
    """One slide's cell grid and what was scored on it."""

    reader: SlideReader
    cell: float  # a cell's side in level-0 pixels
    cell_mm2: float  # a cell's area in square millimetres
    fraction: np.ndarray  # (rows, cols) tissue share of every cell of the grid
    window: np.ndarray  # (rows, cols) tissue share of every cell's 96 px window
    cells: np.ndarray  # (n, 2) row, col of the scored cells, row-major
    probabilities: np.ndarray  # (n,)
    truth: np.ndarray | None  # (n,) bool: centre inside an annotated tumour
    mpp: float  # microns per level-0 pixel
    tumour_area: shapely.Geometry | None = None  # the annotated tumour (level-0 pixels), when annotations were given
    refined: np.ndarray | None = None  # (n,) bool: scored by its own window in a cascade (else the coarse one's)

    @functools.cached_property
    def heatmap(self) -> np.ndarray:
        """float32 grid of the probabilities, NaN where not scored: built once (npy, GeoJSON and PNG all use it)."""
        heatmap = np.full(self.fraction.shape, np.nan, dtype=np.float32)
        heatmap[self.cells[:, 0], self.cells[:, 1]] = self.probabilities
        return heatmap

    @functools.cached_property
    def evidence(self) -> np.ndarray:
        """The heatmap averaged over squares of ``lesions.EVIDENCE_UM``: what detections and the slide score read."""
        return lesions.evidence(self.heatmap, self.cell * self.mpp)

    @functools.cached_property
    def detections(self) -> pd.DataFrame:
        """The evidence map's local maxima, ``x,y,probability`` in level-0 pixels."""
        return lesions.detections(self.evidence, self.cell, self.mpp)

    @functools.cached_property
    def lesion_match(self) -> tuple[list[lesions.Lesion], pd.DataFrame, np.ndarray] | None:
        """With annotations: the lesions, their table (found, best probability) and each detection's lesion number
        (0: none)."""
        if self.tumour_area is None:
            return None
        found = lesions.lesions(self.tumour_area, self.mpp)
        return (found, *lesions.match(self.detections, found))


def summarise(scored: ScoredSlide, *, threshold: float, top_k: int) -> dict[str, Any]:
    """Cell counts, areas and the slide score: the highest evidence (the heatmap averaged over squares of
    ``lesions.EVIDENCE_UM``), which is also the best detection's probability; and the mean of the ``top_k``
    highest cell probabilities (the score before: it ranks slides well, but a few false cells decide it)."""
    p = scored.probabilities
    top = np.sort(p)[::-1][:top_k]
    above = int((p >= threshold).sum())
    score = float(scored.evidence.max()) if len(p) else None
    return {
        "cells": int(scored.fraction.size),
        "cells_scored": len(p),
        "tissue_mm2": round(float(scored.fraction.sum()) * scored.cell_mm2, 4),
        "threshold": threshold,
        "cells_at_or_above_threshold": above,
        "area_above_threshold_mm2": round(above * scored.cell_mm2, 4),
        "top_k": top_k,
        "top_k_mean": float(top.mean()) if len(p) else None,
        "slide_score": score,
        "slide_positive": score is not None and score >= threshold,
        "max_probability": float(p.max()) if len(p) else None,
        "mean_probability": float(p.mean()) if len(p) else None,
        "detections": len(scored.detections),
    }


def agreement(scored: ScoredSlide, slide_tumour: bool, slide_positive: bool) -> dict[str, Any]:
    """How the cells and the slide's decision agree with the annotations: cell-level ROC AUC (None when the scored
    cells are all of one class) and whether the decision is right."""
    assert scored.truth is not None
    y = scored.truth.astype(np.int64)
    return {
        "cells_annotated_tumour": int(y.sum()),
        "cell_roc_auc": roc_auc(y, scored.probabilities) if 0 < y.sum() < len(y) else None,
        "slide_tumour": bool(slide_tumour),
        "slide_decision_correct": bool(slide_tumour) == slide_positive,
        **lesion_counts(scored),
    }


def lesion_counts(scored: ScoredSlide) -> dict[str, Any]:
    """How the detections met the outlined lesions (Camelyon16's rules, :mod:`histodetect.infer.lesions`)."""
    assert scored.lesion_match is not None
    _, table, hits = scored.lesion_match
    itc = table["itc"] == 1
    itc_numbers = set(table.loc[itc, "lesion"])
    return {
        "lesions": int((~itc).sum()),
        "lesions_found": int(table["found"].sum()),
        "itc_lesions": int(itc.sum()),
        "false_positives": int((hits == 0).sum()),
        "detections_on_itc": int(sum(h in itc_numbers for h in hits)),
    }


def write_all(
    folder: Path, scored: ScoredSlide, summary: dict[str, Any], *, threshold: float, cell_features: bool
) -> None:
    """Every output into ``folder`` (a hidden folder the caller renames when all are written)."""
    np.save(folder / "heatmap.npy", scored.heatmap)
    rows, cols = scored.cells[:, 0], scored.cells[:, 1]
    frame = pd.DataFrame(
        {
            "row": rows,
            "col": cols,
            "x": np.round(cols * scored.cell, 2),
            "y": np.round(rows * scored.cell, 2),
            "size": round(scored.cell, 4),
            "tissue": scored.window[rows, cols].round(3),
            "probability": scored.probabilities,
        }
    )
    if scored.truth is not None:
        frame["tumour"] = scored.truth.astype(np.int64)
    if scored.refined is not None:
        frame["refined"] = scored.refined.astype(np.int64)
    frame.to_csv(folder / "cells.csv", index=False)
    scored.detections.to_csv(folder / "detections.csv", index=False)
    if scored.lesion_match is not None:
        found, table, _ = scored.lesion_match
        table.to_csv(folder / "lesions.csv", index=False)
        _write_json(folder / lesions.LESION_REGIONS, lesions.regions_geojson(found))
    _write_json(folder / "tumour.geojson", tumour_regions(scored, threshold))
    if cell_features:
        _write_json(folder / "cells.geojson", cell_tiles(scored))
    plot_heatmap(scored, summary, folder / "heatmap.png")
    atomic_write_json(folder / "summary.json", summary)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def _boxes(rows: np.ndarray, cols: np.ndarray, cell: float) -> np.ndarray:
    """The cells' squares in level-0 pixels (an array of shapely polygons)."""
    return shapely.box(cols * cell, rows * cell, (cols + 1) * cell, (rows + 1) * cell)


def tumour_regions(scored: ScoredSlide, threshold: float) -> dict[str, Any]:
    """The connected regions (4-neighbours) of cells at or above ``threshold`` as QuPath annotations."""
    heatmap = scored.heatmap
    components = label(heatmap >= threshold, connectivity=1)  # NaN (not scored) compares False
    features = []
    for k, component in enumerate(regionprops(components), start=1):
        rows, cols = component.coords[:, 0], component.coords[:, 1]
        p = heatmap[rows, cols]
        region = shapely.union_all(_boxes(rows, cols, scored.cell))
        features.append(
            {
                "type": "Feature",
                "geometry": shapely.geometry.mapping(region),
                "properties": {
                    "objectType": "annotation",
                    "name": f"tumour region {k}",
                    "classification": TUMOUR_CLASS,
                    "measurements": {
                        "mean probability": round(float(p.mean()), 6),
                        "max probability": round(float(p.max()), 6),
                        "cells": len(p),
                        "area mm2": round(len(p) * scored.cell_mm2, 6),
                    },
                },
            }
        )
    features.sort(key=lambda f: -f["properties"]["measurements"]["max probability"])
    return {"type": "FeatureCollection", "features": features}


def cell_tiles(scored: ScoredSlide) -> dict[str, Any]:
    """Every scored cell as a QuPath tile with its probability."""
    boxes = _boxes(scored.cells[:, 0], scored.cells[:, 1], scored.cell)
    features = [
        {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(box),
            "properties": {"objectType": "tile", "measurements": {"probability": round(float(p), 6)}},
        }
        for box, p in zip(boxes, scored.probabilities, strict=True)
    ]
    return {"type": "FeatureCollection", "features": features}


def plot_heatmap(scored: ScoredSlide, summary: dict[str, Any], target: Path) -> None:
    """The slide's thumbnail with each scored cell tinted by its probability; the tint's opacity grows with it, so
    tissue the model finds benign stays readable and glass is left as it is."""
    # The object API, not pyplot: no backend machinery to import or global figure state (~1 s of CPU a slide).
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    heatmap = scored.heatmap
    cmap = colormaps["YlOrRd"]
    p = np.nan_to_num(heatmap, nan=0.0)
    overlay = cmap(p, bytes=True)  # uint8: a whole slide's grid has millions of cells
    overlay[..., 3] = np.where(np.isfinite(heatmap), (0.1 + 0.65 * p) * 255, 0).astype(np.uint8)
    width, height = scored.reader.dimensions
    side = 9 / max(width, height)  # inches per level-0 pixel: the longer side gets 9 inches
    fig = Figure(figsize=(max(2.0, width * side), max(2.0, height * side)), dpi=120)
    ax = fig.subplots()
    ax.imshow(scored.reader.thumbnail(THUMBNAIL), extent=(0, width, height, 0))
    rows, cols = heatmap.shape
    ax.imshow(overlay, extent=(0, cols * scored.cell, rows * scored.cell, 0), interpolation="nearest")
    _draw_outlines_and_detections(ax, scored)
    ax.set(xlim=(0, width), ylim=(height, 0), xticks=[], yticks=[])
    score = summary["slide_score"]
    ax.set_title(
        f"{scored.reader.name}: {summary['cells_at_or_above_threshold']} of {summary['cells_scored']} tissue cells at "
        f"P >= {summary['threshold']:g}; slide score {score if score is None else round(score, 3)}",
        fontsize=10,
    )
    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
    fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02, label="P(tumour in the cell)")
    fig.savefig(target, format="png", bbox_inches="tight")


HIT_COLOUR, FALSE_COLOUR, UNJUDGED_COLOUR, OUTLINE_COLOUR = "#16A34A", "#2563EB", "#111827", "#7C3AED"


def _draw_outlines_and_detections(ax: Any, scored: ScoredSlide) -> None:
    """The annotated tumour's outline, and each detection: a circle where it found a lesion, a cross for a false
    positive (a dot where there is no truth to judge it by)."""
    if scored.tumour_area is not None:
        for polygon in shapely.get_parts(scored.tumour_area):
            for ring in [polygon.exterior, *polygon.interiors] if hasattr(polygon, "exterior") else []:
                x, y = ring.xy
                ax.plot(x, y, color=OUTLINE_COLOUR, linewidth=1.2)
    found = scored.detections
    if found.empty:
        return
    x, y = found["x"].to_numpy(), found["y"].to_numpy()
    if scored.lesion_match is None:
        ax.scatter(x, y, s=14, marker="o", facecolors="none", edgecolors=UNJUDGED_COLOUR, linewidths=0.8)
        return
    _, _, hits = scored.lesion_match
    ax.scatter(x[hits > 0], y[hits > 0], s=40, marker="o", facecolors="none", edgecolors=HIT_COLOUR, linewidths=1.4)
    ax.scatter(x[hits == 0], y[hits == 0], s=30, marker="x", color=FALSE_COLOUR, linewidths=1.2)


def read_summaries(out: Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, summary) of every finished slide folder under ``out``, sorted; one whose ``summary.json`` cannot
    be read (another tool's folder, or a damaged one) comes back as ``{"error": ...}``: listed, never fatal."""
    found = []
    for summary_file in sorted(out.glob("*/summary.json")):
        try:
            summary = json.loads(read_small_file(summary_file, MAX_SUMMARY_BYTES).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            summary = {"error": f"{summary_file}: not a slide's summary ({type(exc).__name__}: {str(exc)[:80]})"}
        if not isinstance(summary, dict):
            summary = {"error": f"{summary_file}: not a slide's summary (a JSON {type(summary).__name__})"}
        found.append((summary_file.parent.name, summary))
    return found
