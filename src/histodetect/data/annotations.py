"""Polygons drawn on a slide, in level-0 pixels: GeoJSON (QuPath's export) or the ASAP XML of Camelyon16.

They serve two purposes: ``--mask`` (score only inside them) and ``--annotations`` (the truth a slide's cells are
measured against). Camelyon16 marks tumour in the groups ``Tumor``, ``_0`` and ``_1`` and normal tissue inside a
tumour outline in ``_2`` ("Exclusion"); such exclusions are cut out of the area, as the challenge's own evaluation
does. Hand-drawn outlines often cross themselves, so every polygon is repaired with ``shapely.make_valid``, and
the repair is said (``read_area``'s notes; ``read_polygons`` logs them as a warning).

The files are untrusted: XML is parsed with defusedxml (no entities, no DTD: no bomb, nothing fetched), JSON nesting
and every field's type are checked, coordinates must be finite, and sizes are bounded before geometry is built
(``MAX_FILE_BYTES``, ``MAX_POLYGON_VERTICES`` per polygon, ``MAX_VERTICES`` in all): GEOS takes minutes to repair a
10^6-vertex zig-zag. Each refusal is one line naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import defusedxml
import defusedxml.ElementTree as ElementTree
import numpy as np
import shapely
from shapely.geometry import Polygon, shape

from histodetect.errors import InferError

log = logging.getLogger(__name__)

EXCLUDED_GROUPS = frozenset({"_2", "exclusion"})  # Camelyon16's normal islands inside tumour outlines
GEOJSON_SUFFIXES = frozenset({".geojson", ".json"})
MAX_FILE_BYTES = 256 << 20  # Camelyon16's largest XML is ~3 MB
MAX_POLYGON_VERTICES = 100_000  # a traced outline at 0.25 um/px rarely passes 20,000
MAX_VERTICES = 1_000_000  # in all the polygons of one file
FIT_TOLERANCE = 0.02  # polygons may overhang a slide's edge by this share of its side (drawn past the border)


def read_polygons(path: str | os.PathLike[str]) -> shapely.Geometry:
    """The area ``path`` outlines (GeoJSON or ASAP XML), exclusions removed, as one shapely geometry; repairs are
    logged as a warning."""
    area, notes = read_area(path)
    for note in notes:
        log.warning(note)
    return area


def read_area(path: str | os.PathLike[str]) -> tuple[shapely.Geometry, list[str]]:
    """The area ``path`` outlines and notes on what was repaired (self-crossing outlines), for the caller to show."""
    path = Path(path)
    if not path.is_file():
        raise InferError(f"{path}: no such annotation file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InferError(f"{path}: {path.stat().st_size:,} bytes; annotations are at most {MAX_FILE_BYTES:,}")
    if path.suffix.lower() == ".xml":
        included, excluded = _read_asap(path)
    elif path.suffix.lower() in GEOJSON_SUFFIXES:
        included, excluded = _read_geojson(path)
    else:
        raise InferError(f"{path}: polygons must come as GeoJSON (.geojson/.json) or ASAP XML (.xml)")
    if not included:
        raise InferError(f"{path}: no polygon in it")
    _check_vertices(path, included + excluded)
    invalid = int(np.count_nonzero(~shapely.is_valid(np.array(included + excluded, dtype=object))))
    notes = [f"{path}: repaired {invalid} polygon(s) that cross themselves (shapely.make_valid)"] if invalid else []
    # Each polygon of a MultiPolygon repaired alone: repairing the whole treats the parts' overlaps (or shared
    # edges, as a grid of squares has) by parity, as holes, and loses them.
    area = shapely.union_all([shapely.make_valid(p) for p in shapely.get_parts(included)])
    if excluded:
        area = area.difference(shapely.union_all([shapely.make_valid(p) for p in shapely.get_parts(excluded)]))
    return area, notes


def check_fits(area: shapely.Geometry, path: str | os.PathLike[str], name: str, width: int, height: int) -> None:
    """Refuse polygons that do not belong to a ``width`` x ``height`` slide: beyond its edges (more than
    ``FIT_TOLERANCE``), e.g. drawn on another slide or at another level."""
    x0, y0, x1, y1 = area.bounds
    dx, dy = FIT_TOLERANCE * width, FIT_TOLERANCE * height
    if x0 < -dx or y0 < -dy or x1 > width + dx or y1 > height + dy:
        raise InferError(
            f"{path}: polygons span x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, beyond {name} ({width}x{height} "
            "level-0 pixels); are they drawn on another slide, or at another level?"
        )


def _check_vertices(path: Path, polygons: list[Any]) -> None:
    """Bound the work before GEOS repairs anything; refuse NaN or infinite coordinates."""
    counts = shapely.get_num_coordinates(np.array(polygons, dtype=object))
    if counts.max(initial=0) > MAX_POLYGON_VERTICES:
        raise InferError(
            f"{path}: a polygon of {int(counts.max()):,} vertices; at most {MAX_POLYGON_VERTICES:,} (simplify it)"
        )
    if counts.sum() > MAX_VERTICES:
        raise InferError(f"{path}: {int(counts.sum()):,} vertices in all; at most {MAX_VERTICES:,} (simplify them)")
    for polygon in polygons:
        if not np.isfinite(shapely.get_coordinates(polygon)).all():
            raise InferError(f"{path}: a polygon with a coordinate that is not a finite number")


def inside(area: shapely.Geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """bool: whether each point (level-0 pixels) lies in ``area``."""
    shapely.prepare(area)
    return shapely.contains_xy(area, x, y)


def _read_asap(path: Path) -> tuple[list[Polygon], list[Polygon]]:
    try:
        root = ElementTree.parse(path, forbid_dtd=True).getroot()
    except defusedxml.DefusedXmlException as exc:
        raise InferError(f"{path}: XML with a DTD or entities is refused ({type(exc).__name__})") from None
    except (ElementTree.ParseError, RecursionError, ValueError) as exc:
        raise InferError(f"{path}: not readable XML ({str(exc)[:200]})") from None
    included: list[Polygon] = []
    excluded: list[Polygon] = []
    total = 0
    for annotation in root.iter("Annotation"):
        try:
            points = sorted(
                (int(c.get("Order", k)), float(c.get("X", "")), float(c.get("Y", "")))
                for k, c in enumerate(annotation.iter("Coordinate"))
            )
        except ValueError:
            raise InferError(
                f"{path}: annotation {str(annotation.get('Name'))[:80]!r} has a coordinate that is not a number"
            ) from None
        total += len(points)
        if total > MAX_VERTICES:
            raise InferError(f"{path}: more than {MAX_VERTICES:,} vertices in all; simplify the polygons")
        if len(points) < 3:
            continue  # a dot or a line outlines no area
        polygon = Polygon([(x, y) for _, x, y in points])
        group = (annotation.get("PartOfGroup") or "").strip().lower()
        (excluded if group in EXCLUDED_GROUPS else included).append(polygon)
    return included, excluded


def _read_geojson(path: Path) -> tuple[list[Any], list[Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise InferError(f"{path}: JSON nested too deeply to be GeoJSON") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferError(f"{path}: not readable JSON ({exc})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
        if not isinstance(features, list):
            raise InferError(f"{path}: 'features' must be a list, not {type(features).__name__}")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"geometry": data}]
    elif isinstance(data, list):  # QuPath can export a bare list of features
        features = data
    else:
        raise InferError(f"{path}: expected a GeoJSON FeatureCollection, Feature or geometry")
    included: list[Any] = []
    excluded: list[Any] = []
    for k, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise InferError(f"{path}: feature {k} is a {type(feature).__name__}, not a GeoJSON object")
        geometry = feature.get("geometry")
        if geometry is not None and not isinstance(geometry, dict):
            raise InferError(f"{path}: feature {k}'s geometry is a {type(geometry).__name__}, not a GeoJSON object")
        properties = feature.get("properties")
        if properties is not None and not isinstance(properties, dict):
            raise InferError(f"{path}: feature {k}'s properties are a {type(properties).__name__}, not an object")
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points and lines outline no area
        try:
            polygon = shape(geometry)
        except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.GEOSException) as exc:
            raise InferError(f"{path}: feature {k}: a polygon that cannot be read ({str(exc)[:200]})") from None
        (excluded if _group(feature) in EXCLUDED_GROUPS else included).append(polygon)
    return included, excluded


def _group(feature: dict[str, Any]) -> str:
    """The class of a feature: QuPath's ``classification.name``, else a plain ``name`` property."""
    properties = feature.get("properties") or {}
    classification = properties.get("classification") or {}
    name = classification.get("name") if isinstance(classification, dict) else None
    return str(name or properties.get("name") or "").strip().lower()
