"""slide --cell and --cascade: cells of 48 and 96 model pixels, and the coarse-to-fine pass, on a tiny slide of real
patches read as a plain image (at the model's scale, so every window is exact pixels of the mosaic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.tissue import window_share
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor
from histodetect.infer.slide import score_slide

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)


@pytest.fixture(scope="module")
def fp32(baseline_run: Path) -> Predictor:
    return Predictor([baseline_run], precision="fp32", progress=False)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, mosaic) -> Path:
    path = tmp_path_factory.mktemp("cascade") / "region.png"
    Image.fromarray(mosaic.image).save(path)
    return path


@pytest.fixture(scope="module")
def full(fp32: Predictor, region: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The full 32 px pass: every tissue cell by its own window."""
    out = tmp_path_factory.mktemp("full") / "out"
    score_slide(fp32, region, out, progress=False)
    return pd.read_csv(out / "cells.csv")


def window(image: np.ndarray, row: int, col: int, cell: int) -> np.ndarray:
    """The 96 px window centred on cell (row, col), white beyond the image."""
    margin = (96 - cell) // 2
    padded = np.pad(image, ((96, 96), (96, 96), (0, 0)), constant_values=255)
    y, x = row * cell - margin + 96, col * cell - margin + 96
    return padded[y : y + 96, x : x + 96]


@pytest.mark.parametrize("cell", [48, 96])
def test_a_cell_is_scored_by_the_window_centred_on_it_at_every_cell_size(
    fp32: Predictor, region: Path, mosaic, cell: int, tmp_path: Path
) -> None:
    summary = score_slide(fp32, region, tmp_path / "out", cell=cell, progress=False)
    height, width = mosaic.image.shape[:2]
    heatmap = np.load(tmp_path / "out" / "heatmap.npy")
    assert heatmap.shape == (-(-height // cell), -(-width // cell)) == tuple(summary["grid"])
    assert summary["cell_px"] == cell and summary["cell_size"] == cell and summary["cascade"] is None
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert (cells["size"] == cell).all() and (cells["x"] == cells["col"] * cell).all()
    assert summary["windows_scored"] == summary["cells_scored"] == len(cells)
    picked = cells.iloc[:: max(1, len(cells) // 12)]
    expected = fp32.predict(
        np.stack([window(mosaic.image, r, c, cell) for r, c in zip(picked["row"], picked["col"], strict=True)])
    )
    np.testing.assert_allclose(picked["probability"], expected, atol=1e-4)
    assert set(summary["seconds_split"]) == {"tissue_mask", "reading", "model"}


def test_the_tissue_share_is_the_windows_at_every_cell_size() -> None:
    fraction = np.zeros((5, 5), dtype=np.float32)
    fraction[2, 2] = 1.0
    assert window_share(fraction, 32)[1, 1] == pytest.approx(1 / 9)  # a neighbour's window holds all of it
    assert window_share(fraction, 48)[1, 1] == pytest.approx(1 / 16)  # half of it each way: a quarter of 48 x 48
    assert window_share(fraction, 96)[1, 1] == 0 and window_share(fraction, 96)[2, 2] == 1


def test_the_cascade_equals_the_full_pass_where_it_refines_and_copies_the_coarse_cell_elsewhere(
    fp32: Predictor, region: Path, full: pd.DataFrame, tmp_path: Path
) -> None:
    coarse = score_slide(fp32, region, tmp_path / "coarse", cell=96, min_tissue=0, progress=False)
    assert coarse["cells_scored"] > 0
    coarse_map = np.load(tmp_path / "coarse" / "heatmap.npy")
    above = float(np.nanmedian(coarse_map))  # refine around about half of the coarse windows
    summary = score_slide(fp32, region, tmp_path / "out", cascade=True, refine_above=above, progress=False)
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert list(cells["row"]) == list(full["row"]) and list(cells["col"]) == list(full["col"])
    refined = cells["refined"] == 1
    assert 0 < refined.sum() < len(cells) and summary["cascade"]["cells_refined"] == refined.sum()
    np.testing.assert_allclose(cells.loc[refined, "probability"], full.loc[refined, "probability"], atol=1e-5)
    kept = cells[~refined]
    np.testing.assert_allclose(kept["probability"], coarse_map[kept["row"] // 3, kept["col"] // 3], atol=1e-5)
    assert (coarse_map[kept["row"] // 3, kept["col"] // 3] < above).all()
    # Every cell whose window overlaps a coarse window at or above the threshold was refined.
    hot = np.argwhere(coarse_map >= above)
    near = {(3 * r + dr, 3 * c + dc) for r, c in hot for dr in range(-1, 4) for dc in range(-1, 4)}
    assert all((r, c) in near for r, c in zip(cells.loc[refined, "row"], cells.loc[refined, "col"], strict=True))
    assert not any((r, c) in near for r, c in zip(kept["row"], kept["col"], strict=True))
    # A coarse window is the window of the fine cell at its centre: scored once.
    centres = ((cells["row"] % 3 == 1) & (cells["col"] % 3 == 1) & refined).sum()
    assert summary["cascade"]["fine_windows"] == refined.sum() - centres
    assert summary["windows_scored"] == summary["cascade"]["coarse_windows"] + summary["cascade"]["fine_windows"]


def test_the_cascade_from_the_command_line_and_its_bad_settings(
    baseline_run: Path, region: Path, full: pd.DataFrame, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["slide", str(baseline_run), str(region), "--out", str(tmp_path / "out"), "--workers", "0"]
    result = runner.invoke(app, [*args, "--cascade", "--refine-above", "0", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    cells = pd.read_csv(tmp_path / "out" / "region" / "cells.csv")
    assert (cells["refined"] == 1).all()  # everything refined: the full pass
    np.testing.assert_allclose(cells["probability"], full["probability"], atol=1e-5)
    summary = json.loads((tmp_path / "out" / "region" / "summary.json").read_text())
    assert summary["cascade"]["refine_above"] == 0 and summary["cascade"]["coarse_cell_px"] == 96
    for extra, message in ((["--cell", "64"], "--cell 64"), (["--cascade", "--cell", "96"], "--cascade")):
        bad = runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "bad"), *extra])
        assert bad.exit_code == 2 and message in bad.output
    with pytest.raises(InferError, match="--refine-above"):
        score_slide(Predictor([baseline_run], progress=False), region, tmp_path / "o", cascade=True, refine_above=2)
