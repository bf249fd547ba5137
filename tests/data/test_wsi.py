"""Slide readers: OpenSlide for slide files, memory for plain images; one interface, white beyond the image."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histodetect.data.wsi import ArrayReader, OpenSlideReader, open_slide
from histodetect.errors import InferError

MakeSlide = Callable[..., Path]


def test_a_pyramidal_tiff_is_read_through_openslide_with_its_levels_and_mpp(
    mosaic, make_slide: MakeSlide, tmp_path: Path
) -> None:
    path = make_slide(tmp_path / "slide.tif", mosaic.image, 0.5, compression="zlib", levels=3)
    with open_slide(path) as reader:
        assert isinstance(reader, OpenSlideReader) and reader.kind == "openslide"
        height, width = mosaic.image.shape[:2]
        assert reader.dimensions == (width, height) and reader.level_downsamples[:2] == (1.0, 2.0)
        assert reader.mpp == pytest.approx(0.5)
        assert np.array_equal(reader.read_region((0, 0), 0, (width, height)), mosaic.image)
        beyond = reader.read_region((width - 10, -5), 0, (20, 10))  # partly outside: white there
        assert (beyond[:5] == 255).all() and (beyond[:, 10:] == 255).all()
        assert np.array_equal(beyond[5:, :10], mosaic.image[:5, width - 10 :])
        level1 = reader.read_region((64, 32), 1, (50, 40))  # location in level-0 pixels, size in the level's
        expected = np.asarray(Image.fromarray(mosaic.image).reduce(2))[16:56, 32:82]
        assert np.array_equal(level1, expected)
        assert reader.best_level(2.5) == 1 and reader.best_level(0.5) == 0
        with pytest.raises(InferError, match="level 5 does not exist"):
            reader.read_region((0, 0), 5, (10, 10))


def test_an_openslide_reader_pickles_as_its_path_and_reopens(mosaic, make_slide: MakeSlide, tmp_path: Path) -> None:
    path = make_slide(tmp_path / "slide.svs", mosaic.image, 0.972, aperio=True, levels=2)
    reader = open_slide(path)
    region = reader.read_region((100, 100), 0, (64, 64))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.mpp == pytest.approx(0.972) and clone.vendor == "aperio"
    assert np.array_equal(clone.read_region((100, 100), 0, (64, 64)), region)
    reader.close()


def test_read_scaled_returns_exact_pixels_on_the_grid_and_averages_otherwise(mosaic) -> None:
    reader = ArrayReader(mosaic.image)
    assert np.array_equal(reader.read_scaled((96, 64, 192, 160), (96, 96)), mosaic.patches[0])
    halved = reader.read_scaled((96, 64, 192, 160), (48, 48))
    assert halved.shape == (48, 48, 3)
    assert np.abs(halved.astype(int) - np.asarray(Image.fromarray(mosaic.patches[0]).reduce(2))).max() <= 1
    assert reader.thumbnail(100).shape[1] == 100


def test_plain_images_are_held_in_memory(mosaic, tmp_path: Path) -> None:
    Image.fromarray(mosaic.image).save(tmp_path / "region.png")
    strips = tmp_path / "region.tif"  # an untiled TIFF, resolution per cm: OpenSlide leaves it to us
    tifffile.imwrite(strips, mosaic.image, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit=3)
    png, tif = open_slide(tmp_path / "region.png"), open_slide(strips)
    assert png.kind == tif.kind == "memory" and png.mpp is None and tif.mpp == pytest.approx(0.25)
    assert np.array_equal(png.read_region((0, 0), 0, png.dimensions), tif.read_region((0, 0), 0, tif.dimensions))
    pixels = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent black: white, as a viewer shows it
    Image.fromarray(pixels, "RGBA").save(tmp_path / "clear.png")
    assert (open_slide(tmp_path / "clear.png").read_region((0, 0), 0, (40, 40)) == 255).all()


def test_what_is_not_a_slide_is_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.png")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    cases = {
        "notes.txt": "not a slide or image",
        "grey.png": "must be RGB",
        "broken.tif": "cannot read",
        "nowhere.svs": "no such",
    }
    for name, problem in cases.items():
        with pytest.raises(InferError, match=rf"{name}.*{problem}"):
            open_slide(tmp_path / name)
    with pytest.raises(InferError, match="a folder"):
        open_slide(tmp_path)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr("histodetect.data.wsi.MAX_PIXELS", 1000)
    with pytest.raises(InferError, match=r"big\.png.*tiled pyramidal TIFF"):
        open_slide(tmp_path / "big.png")


def test_a_thumbnail_of_a_slide_without_coarse_levels_is_read_in_bands(mosaic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, heatmap.png of a slide without a pyramid asked one read of its whole level 0: refused past
    MAX_READ_PIXELS, after the slide was scored."""
    from histodetect.data import wsi

    reader = ArrayReader(mosaic.image)
    whole = reader.thumbnail(200)
    monkeypatch.setattr(wsi, "MAX_READ_PIXELS", 20_000)  # a few rows of the mosaic a read
    banded = reader.thumbnail(200)
    assert banded.shape == whole.shape
    assert np.abs(banded.astype(int) - whole.astype(int)).mean() < 2  # seams between bands only
