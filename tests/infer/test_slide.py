"""slide: a heatmap over a large image, one cell per labelled centre, from a mosaic of real patches on glass."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.store import Store
from histodetect.infer import slide as slide_module
from histodetect.infer.engine import InferError, Predictor
from histodetect.infer.slide import read_image, score_slide

MakeRun = Callable[[str], Path]
ROWS, COLS = 3, 4  # patches in the mosaic
TOP, LEFT = 96, 64  # where the mosaic sits on a white canvas (multiples of the 32 px cell)
HEIGHT, WIDTH = TOP + 96 * ROWS + 64, LEFT + 96 * COLS + 80  # white below and right too; 80 is not a multiple of 32


@pytest.fixture(scope="module")
def mosaic(sample_store: Store) -> tuple[np.ndarray, np.ndarray]:
    """A slide-like image: real patches side by side on white glass; and the patches themselves."""
    patches = sample_store.read(np.arange(ROWS * COLS))
    image = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    for k, patch in enumerate(patches):
        i, j = divmod(k, COLS)
        image[TOP + 96 * i : TOP + 96 * (i + 1), LEFT + 96 * j : LEFT + 96 * (j + 1)] = patch
    return image, patches


@pytest.fixture(scope="module")
def mosaic_png(tmp_path_factory: pytest.TempPathFactory, mosaic: tuple[np.ndarray, np.ndarray]) -> Path:
    path = tmp_path_factory.mktemp("slide") / "region.png"
    Image.fromarray(mosaic[0]).save(path)
    return path


def test_one_cell_per_32_px_and_glass_is_not_scored(baseline_run: Path, mosaic_png: Path, tmp_path: Path) -> None:
    summary = score_slide([baseline_run], mosaic_png, tmp_path / "out")
    heatmap = np.load(tmp_path / "out" / "heatmap.npy")
    assert heatmap.shape == (-(-HEIGHT // 32), -(-WIDTH // 32))
    inside = np.zeros(heatmap.shape, dtype=bool)
    inside[TOP // 32 : TOP // 32 + 3 * ROWS, LEFT // 32 : LEFT // 32 + 3 * COLS] = True
    assert np.isnan(heatmap[~inside]).all()  # white glass
    assert np.isfinite(heatmap[inside]).mean() > 0.8  # lymph node tissue (a few cells of fat may be white)
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert len(cells) == np.isfinite(heatmap).sum() == summary["cells_scored"]
    assert np.allclose(heatmap[cells["row"], cells["col"]], cells["probability"])
    assert (cells["x"] == cells["col"] * 32).all() and (cells["y"] == cells["row"] * 32).all()
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["cells"] == heatmap.size and saved["width"] == WIDTH and saved["height"] == HEIGHT


def test_a_centre_cell_gets_the_probability_of_its_own_patch(
    baseline_run: Path, mosaic_png: Path, mosaic: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    score_slide([baseline_run], mosaic_png, tmp_path / "out", min_tissue=0.0, precision="fp32")
    heatmap = np.load(tmp_path / "out" / "heatmap.npy")
    assert np.isfinite(heatmap).all()  # min_tissue 0 scores glass too
    expected = Predictor([baseline_run], precision="fp32", progress=False).predict(mosaic[1])
    centres = [heatmap[(TOP + 32) // 32 + 3 * i, (LEFT + 32) // 32 + 3 * j] for i in range(ROWS) for j in range(COLS)]
    np.testing.assert_allclose(centres, expected, atol=1e-5)


def test_tiff_and_png_read_alike_and_levels_are_checked(mosaic: tuple[np.ndarray, np.ndarray], mosaic_png: Path):
    tiff = mosaic_png.with_suffix(".tif")
    tifffile.imwrite(tiff, mosaic[0], photometric="rgb")
    assert np.array_equal(read_image(tiff), read_image(mosaic_png))
    with pytest.raises(InferError, match=r"--level 1 does not exist.*levels 0\.\.0"):
        read_image(tiff, level=1)
    with pytest.raises(InferError, match="pyramidal TIFF"):
        read_image(mosaic_png, level=1)
    pyramid = mosaic_png.with_name("pyramid.tif")
    with tifffile.TiffWriter(pyramid) as tif:  # the layout of a whole-slide TIFF: tiles, reduced levels as SubIFDs
        tif.write(mosaic[0], subifds=1, photometric="rgb", tile=(128, 128))
        tif.write(mosaic[0][::2, ::2], subfiletype=1, photometric="rgb", tile=(128, 128))
    assert np.array_equal(read_image(pyramid, level=1), mosaic[0][::2, ::2])


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    pixels = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent black: white, as a viewer shows it
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    assert (read_image(tmp_path / "a.png") == 255).all()


def test_bad_images_and_settings_are_refused_naming_the_problem(
    baseline_run: Path, mosaic_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("L", (200, 200), 128).save(tmp_path / "grey.png")
    with pytest.raises(InferError, match=r"grey\.png.*must be RGB"):
        read_image(tmp_path / "grey.png")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InferError, match=r"broken\.tif.*cannot read as TIFF"):
        read_image(tmp_path / "broken.tif")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_image(tmp_path / "nowhere.png")
    monkeypatch.setattr(slide_module, "MAX_PIXELS", 1000)
    with pytest.raises(InferError, match="--level"):
        read_image(mosaic_png)
    monkeypatch.undo()
    for setting in ({"stride": 31}, {"stride": 128}, {"min_tissue": 1.5}, {"threshold": -0.1}):
        with pytest.raises(InferError):
            score_slide([baseline_run], mosaic_png, tmp_path / "out", **setting)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_command_line(baseline_run: Path, mosaic_png: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["slide", str(baseline_run), str(mosaic_png), "--out", str(tmp_path / "o"), "--stride", "48"]
    )
    assert done.exit_code == 0, done.output
    assert np.load(tmp_path / "o" / "heatmap.npy").shape == (-(-HEIGHT // 48), -(-WIDTH // 48))
    missing = runner.invoke(app, ["slide", str(baseline_run), str(tmp_path / "none.png"), "--out", str(tmp_path / "p")])
    assert missing.exit_code == 2 and "none.png" in missing.output
