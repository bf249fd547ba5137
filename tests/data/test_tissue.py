"""The tissue mask and --mask regions, on real patches laid out on glass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodetect.data.annotations import inside, read_polygons
from histodetect.data.tissue import region_mask, tissue_fraction
from histodetect.data.wsi import ArrayReader
from histodetect.errors import InferError


def test_glass_is_not_tissue_and_stained_patches_are(mosaic) -> None:
    reader = ArrayReader(mosaic.image)
    height, width = mosaic.image.shape[:2]
    grid = (-(-height // 32), -(-width // 32))
    fraction, threshold = tissue_fraction(reader, 32, grid)
    assert fraction.shape == grid and 0.05 <= threshold <= 0.15
    glass = np.ones(grid, dtype=bool)
    glass[2:14, 3:21] = False
    assert (fraction[glass] == 0).all()
    assert (fraction[~glass] > 0.5).mean() > 0.7  # a few patches are mostly fat (white)


def test_an_all_glass_image_has_no_tissue() -> None:
    glass = np.full((256, 256, 3), 245, dtype=np.uint8)
    fraction, _ = tissue_fraction(ArrayReader(glass), 32, (8, 8))
    assert (fraction == 0).all()


def test_region_masks_from_png_and_polygons(mosaic, tmp_path: Path) -> None:
    reader = ArrayReader(mosaic.image)
    height, width = mosaic.image.shape[:2]
    grid = (-(-height // 32), -(-width // 32))
    left = np.zeros((height // 2, width // 2), dtype=np.uint8)
    left[:, : width // 4] = 1
    Image.fromarray(left).save(tmp_path / "left.png")
    cells = region_mask(tmp_path / "left.png", reader, 32, grid)
    centres = (np.arange(grid[1]) + 0.5) * 32
    assert (cells == (centres < width / 2)[None, :]).all()
    square = {"type": "Polygon", "coordinates": [[[0, 0], [64, 0], [64, 64], [0, 64], [0, 0]]]}
    (tmp_path / "square.geojson").write_text(json.dumps(square))
    assert np.argwhere(region_mask(tmp_path / "square.geojson", reader, 32, grid)).tolist() == [
        [0, 0],
        [0, 1],
        [1, 0],
        [1, 1],
    ]
    Image.fromarray(np.ones((10, 100), dtype=np.uint8)).save(tmp_path / "wrong.png")
    with pytest.raises(InferError, match=r"wrong\.png.*shape"):
        region_mask(tmp_path / "wrong.png", reader, 32, grid)


def test_polygons_from_qupath_geojson_and_camelyon_xml(tmp_path: Path) -> None:
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 0]]]}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},  # no area: ignored
    ]
    (tmp_path / "a.geojson").write_text(json.dumps(features))  # QuPath can export a bare list
    area = read_polygons(tmp_path / "a.geojson")
    assert inside(area, np.array([90.0, 10.0]), np.array([10.0, 90.0])).tolist() == [True, False]
    xml = (
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="1" X="100" Y="0"/><Coordinate Order="0" X="0" Y="0"/><Coordinate Order="2" X="100" '
        'Y="100"/><Coordinate Order="3" X="0" Y="100"/></Coordinates></Annotation>'  # a bow-tie: repaired
        "</Annotations></ASAP_Annotations>"
    )
    (tmp_path / "a.xml").write_text(xml)
    assert read_polygons(tmp_path / "a.xml").area > 0
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (tmp_path / "bad.xml").write_text("<ASAP")
    for name, problem in (("empty.geojson", "no polygon"), ("bad.xml", "not readable XML"), ("a.txt", "no such")):
        with pytest.raises(InferError, match=rf"{name}.*{problem}"):
            read_polygons(tmp_path / name)
