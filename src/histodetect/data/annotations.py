"""Polygons drawn on a slide, in level-0 pixels: GeoJSON (QuPath's export) or the ASAP XML of Camelyon16.

They serve two purposes: ``--mask`` (score only inside them) and ``--annotations`` (the truth a slide's cells are
measured against). Camelyon16 marks tumour in the groups ``Tumor``, ``_0`` and ``_1`` and normal tissue inside a
tumour outline in ``_2`` ("Exclusion"); such exclusions are cut out of the area, as the challenge's own evaluation
does. Hand-drawn outlines often cross themselves, so every polygon is repaired with ``shapely.make_valid``.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, shape

from histodetect.errors import InferError

EXCLUDED_GROUPS = frozenset({"_2", "exclusion"})  # Camelyon16's normal islands inside tumour outlines
GEOJSON_SUFFIXES = frozenset({".geojson", ".json"})


def read_polygons(path: str | os.PathLike[str]) -> shapely.Geometry:
    """The area ``path`` outlines (GeoJSON or ASAP XML), exclusions removed, as one shapely geometry."""
    path = Path(path)
    if not path.is_file():
        raise InferError(f"{path}: no such annotation file")
    if path.suffix.lower() == ".xml":
        included, excluded = _read_asap(path)
    elif path.suffix.lower() in GEOJSON_SUFFIXES:
        included, excluded = _read_geojson(path)
    else:
        raise InferError(f"{path}: polygons must come as GeoJSON (.geojson/.json) or ASAP XML (.xml)")
    if not included:
        raise InferError(f"{path}: no polygon in it")
    # Each polygon of a MultiPolygon repaired alone: repairing the whole treats the parts' overlaps (or shared
    # edges, as a grid of squares has) by parity, as holes, and loses them.
    area = shapely.union_all([shapely.make_valid(p) for p in shapely.get_parts(included)])
    if excluded:
        area = area.difference(shapely.union_all([shapely.make_valid(p) for p in shapely.get_parts(excluded)]))
    return area


def inside(area: shapely.Geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """bool: whether each point (level-0 pixels) lies in ``area``."""
    shapely.prepare(area)
    return shapely.contains_xy(area, x, y)


def _read_asap(path: Path) -> tuple[list[Polygon], list[Polygon]]:
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise InferError(f"{path}: not readable XML ({exc})") from exc
    included: list[Polygon] = []
    excluded: list[Polygon] = []
    for annotation in root.iter("Annotation"):
        try:
            points = sorted(
                (int(c.get("Order", k)), float(c.get("X", "")), float(c.get("Y", "")))
                for k, c in enumerate(annotation.iter("Coordinate"))
            )
        except ValueError as exc:
            raise InferError(
                f"{path}: annotation {annotation.get('Name')!r} has a coordinate that is not a number"
            ) from exc
        if len(points) < 3:
            continue  # a dot or a line outlines no area
        polygon = Polygon([(x, y) for _, x, y in points])
        group = (annotation.get("PartOfGroup") or "").strip().lower()
        (excluded if group in EXCLUDED_GROUPS else included).append(polygon)
    return included, excluded


def _read_geojson(path: Path) -> tuple[list[Any], list[Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferError(f"{path}: not readable JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
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
    for feature in features:
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points and lines outline no area
        try:
            polygon = shape(geometry)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InferError(f"{path}: a polygon that cannot be read ({exc})") from exc
        (excluded if _group(feature) in EXCLUDED_GROUPS else included).append(polygon)
    return included, excluded


def _group(feature: dict[str, Any]) -> str:
    """The class of a feature: QuPath's ``classification.name``, else a plain ``name`` property."""
    properties = feature.get("properties") or {}
    classification = properties.get("classification") or {}
    name = classification.get("name") if isinstance(classification, dict) else None
    return str(name or properties.get("name") or "").strip().lower()
