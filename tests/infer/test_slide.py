"""slide: whole slides built from real patches at known places, read through OpenSlide at the model's scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.wsi import ArrayReader
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor
from histodetect.infer.lesions import evidence
from histodetect.infer.slide import score_slide
from histodetect.metrics import roc_auc

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

MakeSlide = Callable[..., Path]
MODEL_MPP = 0.972


@pytest.fixture(scope="module")
def fp32(baseline_run: Path) -> Predictor:
    return Predictor([baseline_run], precision="fp32", progress=False)


def centre_mask(path: Path, mosaic, cell: float = 32) -> Path:
    """GeoJSON squares around each patch's centre cell (``cell`` level-0 pixels a side): scoring only those keeps
    the agreement tests fast, while the windows are still read from the slide around them."""
    squares = []
    for r, c in mosaic.centres:
        x, y, h = (c + 0.5) * cell, (r + 0.5) * cell, cell / 4
        squares.append([[[x - h, y - h], [x + h, y - h], [x + h, y + h], [x - h, y + h], [x - h, y - h]]])
    path.write_text(json.dumps({"type": "MultiPolygon", "coordinates": squares}))
    return path


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory, mosaic, make_slide: MakeSlide) -> Path:
    """The mosaic as a deflate-compressed tiled pyramid at the model's scale, resolution in its tags."""
    return make_slide(tmp_path_factory.mktemp("slides") / "lossless.tif", mosaic.image, MODEL_MPP, compression="zlib")


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory, mosaic, make_slide: MakeSlide) -> Path:
    """The mosaic as a JPEG-compressed Aperio SVS at the model's scale."""
    return make_slide(tmp_path_factory.mktemp("slides") / "scan.svs", mosaic.image, MODEL_MPP, aperio=True)


def centre_values(heatmap: np.ndarray, mosaic) -> np.ndarray:
    return np.array([heatmap[r, c] for r, c in mosaic.centres])


def test_a_centre_cell_gets_the_probability_of_its_own_patch(fp32: Predictor, lossless: Path, mosaic, tmp_path: Path):
    summary = score_slide(fp32, lossless, tmp_path / "out", min_tissue=0.0, workers=1, progress=False)
    assert summary["reader"] == "openslide" and summary["mpp_source"] == "file"
    assert summary["mpp"] == pytest.approx(MODEL_MPP) and summary["level"] == 0 and summary["scale_factor"] == 1.0
    heatmap = np.load(tmp_path / "out" / "heatmap.npy")
    assert np.isfinite(heatmap).all()  # min_tissue 0 scores glass too
    np.testing.assert_allclose(centre_values(heatmap, mosaic), fp32.predict(mosaic.patches), atol=1e-4)


def test_an_aperio_svs_is_read_with_its_mpp_and_scored_on_its_own_pixels(
    fp32: Predictor, svs: Path, mosaic, tmp_path: Path
) -> None:
    mask = centre_mask(tmp_path / "centres.geojson", mosaic)
    summary = score_slide(fp32, svs, tmp_path / "out", min_tissue=0.0, mask=mask, workers=1, progress=False)
    assert (
        summary["cells_scored"] == len(mosaic.centres)
        and summary["vendor"] == "aperio"
        and summary["mpp"] == pytest.approx(MODEL_MPP)
    )
    with tifffile.TiffFile(svs) as tif:  # what the JPEG tiles decode to: the pixels the model must have seen
        decoded = tif.pages[0].asarray()
    patches = np.stack([decoded[32 * r - 32 : 32 * r + 64, 32 * c - 32 : 32 * c + 64] for r, c in mosaic.centres])
    heatmap = np.load(tmp_path / "out" / "heatmap.npy")
    np.testing.assert_allclose(centre_values(heatmap, mosaic), fp32.predict(patches), atol=1e-4)


def test_glass_is_not_scored_and_the_outputs_are_in_level_0_pixels(
    fp32: Predictor, svs: Path, mosaic, tmp_path: Path
) -> None:
    summary = score_slide(fp32, svs, tmp_path / "out", threshold=0.0, cell_features=True, progress=False)
    heatmap = np.load(tmp_path / "out" / "heatmap.npy")
    width, height = summary["width"], summary["height"]
    assert heatmap.shape == (-(-height // 32), -(-width // 32)) == tuple(summary["grid"])
    inside = np.zeros(heatmap.shape, dtype=bool)
    inside[2:14, 3:21] = True  # the mosaic: 64 px down, 96 px right, 4 x 6 patches of 3 cells
    near = np.zeros(heatmap.shape, dtype=bool)
    near[1:15, 2:22] = True  # cells whose window reaches the mosaic
    assert np.isnan(heatmap[~near]).all()  # white glass
    assert np.isfinite(heatmap[inside]).mean() > 0.95  # tissue, and fat among it (windows with tissue)
    assert np.isfinite(centre_values(heatmap, mosaic)).all()  # every patch is scored by default
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert list(cells.columns) == ["row", "col", "x", "y", "size", "tissue", "probability"]
    assert len(cells) == np.isfinite(heatmap).sum() == summary["cells_scored"]
    assert (cells["x"] == cells["col"] * 32).all() and (cells["size"] == 32).all()
    assert np.allclose(heatmap[cells["row"], cells["col"]], cells["probability"])
    regions = json.loads((tmp_path / "out" / "tumour.geojson").read_text())
    assert regions["type"] == "FeatureCollection" and regions["features"]  # threshold 0: all tissue is one region
    area = sum(f["properties"]["measurements"]["cells"] for f in regions["features"])
    assert area == len(cells)
    first = regions["features"][0]["properties"]
    assert first["classification"]["name"] == "Tumor" and {"mean probability", "max probability"} <= set(
        first["measurements"]
    )
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["cells_scored"] == len(cells) and saved["tissue_mm2"] > 0
    assert saved["top_k_mean"] == pytest.approx(np.sort(cells["probability"])[-10:].mean(), abs=1e-6)
    assert saved["slide_score"] == pytest.approx(evidence(heatmap, 32 * MODEL_MPP).max(), abs=1e-6)
    assert not list(tmp_path.glob(".*"))  # no hidden partial folder left
    tiles = json.loads((tmp_path / "out" / "cells.geojson").read_text())["features"]
    assert len(tiles) == len(cells) and tiles[0]["properties"]["objectType"] == "tile"


@pytest.mark.parametrize("levels", [3, 1], ids=["pyramid", "level-0-only"])
def test_a_half_micron_slide_ranks_the_patches_alike(
    ranker: Predictor, wide_mosaic, make_slide: MakeSlide, tmp_path: Path, levels: int
) -> None:
    """The mosaic at 0.5 um/px (each pixel made 2x2, so the slide holds the patches' information and nothing else):
    with a pyramid its level 1 is read as it is (within 8% of the model's scale); with level 0 alone, windows are
    averaged down 2x. Either way the patches are seen as they are."""
    mosaic = wide_mosaic
    height, width = mosaic.image.shape[:2]
    big = Image.fromarray(mosaic.image).resize((width * 2, height * 2), Image.Resampling.NEAREST)
    fine = make_slide(tmp_path / "fine.tif", np.asarray(big), 0.5, compression="zlib", levels=levels)
    mask = centre_mask(tmp_path / "fine.geojson", mosaic, cell=64)
    summary = score_slide(ranker, fine, tmp_path / "fine", min_tissue=0.0, mask=mask, progress=False)
    assert (summary["level"], summary["scale_factor"]) == ((1, 1.0) if levels > 1 else (0, 2.0))
    assert summary["cell_size"] == 64 and summary["cells_scored"] == len(mosaic.centres)
    resampled = centre_values(np.load(tmp_path / "fine" / "heatmap.npy"), mosaic)
    native = ranker.predict(mosaic.patches)
    assert roc_auc(mosaic.labels, native) > 0.8  # a ranking worth keeping
    assert abs(roc_auc(mosaic.labels, resampled) - roc_auc(mosaic.labels, native)) <= 0.01
    np.testing.assert_allclose(resampled, native, atol=1e-4)


def test_windows_are_resampled_to_the_model_scale(fp32: Predictor, mosaic, make_slide: MakeSlide, tmp_path: Path):
    """At 0.6 um/px (no whole-number factor) each cell is 32 x 0.972 / 0.6 level-0 pixels and its window is the
    patch averaged down from the slide: close to the patch's own probability."""
    scale = MODEL_MPP / 0.6
    height, width = mosaic.image.shape[:2]
    big = Image.fromarray(mosaic.image).resize((round(width * scale), round(height * scale)), Image.Resampling.BOX)
    slide = make_slide(tmp_path / "fine.tif", np.asarray(big), 0.6, compression="zlib", levels=1)
    mask = centre_mask(tmp_path / "fine.geojson", mosaic, cell=32 * scale)
    summary = score_slide(fp32, slide, tmp_path / "out", min_tissue=0.0, mask=mask, progress=False)
    assert summary["scale_factor"] == pytest.approx(scale) and summary["cell_size"] == pytest.approx(32 * scale)
    centres = centre_values(np.load(tmp_path / "out" / "heatmap.npy"), mosaic)
    np.testing.assert_allclose(centres, fp32.predict(mosaic.patches), atol=0.05)


def test_a_40x_scan_is_read_from_the_level_at_the_model_scale(
    fp32: Predictor, mosaic, make_slide: MakeSlide, tmp_path: Path
) -> None:
    big = np.asarray(Image.fromarray(mosaic.image).resize((mosaic.image.shape[1] * 4, mosaic.image.shape[0] * 4), 0))
    scan = make_slide(tmp_path / "x40.tif", big, MODEL_MPP / 4, compression="zlib", levels=3, tile=256)
    mask = centre_mask(tmp_path / "centres.geojson", mosaic, cell=128)
    summary = score_slide(fp32, scan, tmp_path / "out", min_tissue=0.0, mask=mask, progress=False)
    assert summary["level"] == 2 and summary["level_downsample"] == 4.0 and summary["scale_factor"] == 1.0
    assert summary["cell_size"] == 128  # cells.csv speaks level-0 pixels
    centres = centre_values(np.load(tmp_path / "out" / "heatmap.npy"), mosaic)
    np.testing.assert_allclose(centres, fp32.predict(mosaic.patches), atol=1e-4)  # level 2 holds the mosaic exactly


def test_a_plain_image_is_taken_at_the_model_scale_and_a_reader_is_accepted(
    fp32: Predictor, mosaic, tmp_path: Path
) -> None:
    Image.fromarray(mosaic.image).save(tmp_path / "region.png")
    mask = centre_mask(tmp_path / "centres.geojson", mosaic)
    summary = score_slide(fp32, tmp_path / "region.png", tmp_path / "png", min_tissue=0.0, mask=mask, progress=False)
    assert summary["reader"] == "memory" and summary["mpp_source"].startswith("assumed")
    expected = fp32.predict(mosaic.patches)
    np.testing.assert_allclose(centre_values(np.load(tmp_path / "png" / "heatmap.npy"), mosaic), expected, atol=1e-4)
    reader = ArrayReader(mosaic.image)
    summary = score_slide(
        fp32, reader, tmp_path / "array", min_tissue=0, mask=mask, slide_mpp=MODEL_MPP, progress=False
    )
    assert summary["mpp_source"] == "--slide-mpp"
    np.testing.assert_allclose(centre_values(np.load(tmp_path / "array" / "heatmap.npy"), mosaic), expected, atol=1e-4)


def test_a_slide_without_mpp_needs_the_flag(fp32: Predictor, mosaic, make_slide: MakeSlide, tmp_path: Path) -> None:
    bare = make_slide(tmp_path / "bare.tif", mosaic.image, None, compression="zlib")
    with pytest.raises(InferError, match=r"bare\.tif.*--slide-mpp"):
        score_slide(fp32, bare, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    mask = centre_mask(tmp_path / "centres.geojson", mosaic)
    summary = score_slide(fp32, bare, tmp_path / "out", slide_mpp=MODEL_MPP, mask=mask, progress=False)
    assert summary["mpp_source"] == "--slide-mpp" and summary["cells_scored"] > 0


def test_a_mask_restricts_the_scored_cells(fp32: Predictor, svs: Path, mosaic, tmp_path: Path) -> None:
    height, width = mosaic.image.shape[:2]
    column = np.zeros((height // 4, width // 4), dtype=np.uint8)  # a quarter-scale PNG: the first column of patches
    column[:, 96 // 4 : 192 // 4] = 255
    Image.fromarray(column).save(tmp_path / "column.png")
    score_slide(fp32, svs, tmp_path / "png", mask=tmp_path / "column.png", progress=False)
    cells = pd.read_csv(tmp_path / "png" / "cells.csv")
    assert len(cells) and cells["col"].isin([3, 4, 5]).all()
    polygon = {"type": "Polygon", "coordinates": [[[96, 64], [192, 64], [192, 160], [96, 160], [96, 64]]]}
    (tmp_path / "first.geojson").write_text(json.dumps({"type": "Feature", "geometry": polygon}))
    score_slide(fp32, svs, tmp_path / "poly", mask=tmp_path / "first.geojson", min_tissue=0.0, progress=False)
    cells = pd.read_csv(tmp_path / "poly" / "cells.csv")
    assert sorted(zip(cells["row"], cells["col"], strict=True)) == [(r, c) for r in (2, 3, 4) for c in (3, 4, 5)]
    Image.fromarray(np.zeros((10, 50), dtype=np.uint8)).save(tmp_path / "wrong.png")
    with pytest.raises(InferError, match=r"wrong\.png.*shape"):
        score_slide(fp32, svs, tmp_path / "wrong", mask=tmp_path / "wrong.png", progress=False)
    assert not (tmp_path / "wrong").exists()


def _outline(k: int) -> list[tuple[int, int]]:
    """The square of patch ``k`` of the mosaic, in level-0 pixels."""
    y, x = 64 + 96 * (k // 6), 96 + 96 * (k % 6)
    return [(x, y), (x + 96, y), (x + 96, y + 96), (x, y + 96)]


def test_annotations_give_a_cell_roc_auc_from_geojson_or_camelyon_xml(fp32: Predictor, svs: Path, mosaic, tmp_path):
    tumour = [k for k in range(len(mosaic.labels)) if mosaic.labels[k] == 1]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[*_outline(k), _outline(k)[0]]]}}
        for k in tumour
    ]
    (tmp_path / "truth.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    xml = ["<ASAP_Annotations><Annotations>"]
    for n, k in enumerate(tumour):
        points = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(_outline(k)))
        xml.append(f'<Annotation Name="_{n}" Type="Polygon" PartOfGroup="Tumor"><Coordinates>{points}</Coordinates>')
        xml.append("</Annotation>")
    excluded = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(_outline(tumour[0])))
    xml.append(f'<Annotation Name="ex" Type="Polygon" PartOfGroup="_2"><Coordinates>{excluded}</Coordinates>')
    xml.append("</Annotation></Annotations></ASAP_Annotations>")
    (tmp_path / "truth.xml").write_text("".join(xml))
    row = {"type": "Polygon", "coordinates": [[[96, 64], [672, 64], [672, 160], [96, 160], [96, 64]]]}
    (tmp_path / "row.geojson").write_text(json.dumps(row))  # score the first row of patches only
    options = {"mask": tmp_path / "row.geojson", "min_tissue": 0.0, "progress": False}
    by_json = score_slide(fp32, svs, tmp_path / "json", annotations=tmp_path / "truth.geojson", **options)
    by_xml = score_slide(fp32, svs, tmp_path / "xml", annotations=tmp_path / "truth.xml", **options)
    cells = pd.read_csv(tmp_path / "json" / "cells.csv")
    assert len(cells) == 3 * 18 and cells["tumour"].sum() == by_json["cells_annotated_tumour"] == 9 * 3
    assert by_json["cell_roc_auc"] == pytest.approx(
        roc_auc(cells["tumour"].to_numpy(), cells["probability"].to_numpy())
    )
    assert by_json["slide_tumour"] is True and isinstance(by_json["slide_decision_correct"], bool)
    # The XML's exclusion ("_2") cuts the first tumour patch out: its 9 cells are no longer tumour.
    assert by_xml["cells_annotated_tumour"] == by_json["cells_annotated_tumour"] - 9


def test_bad_slides_are_refused_naming_the_file_and_leave_no_folder(fp32: Predictor, svs: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.svs").write_text("not a slide")
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(svs.read_bytes()[: svs.stat().st_size // 3])
    Image.new("L", (200, 200), 128).save(tmp_path / "grey.png")
    for bad, problem in (("notes.svs", "not a slide"), ("cut.svs", "cut"), ("grey.png", "must be RGB")):
        with pytest.raises(InferError, match=rf"{bad.split('.')[0]}.*") as caught:
            score_slide(fp32, tmp_path / bad, tmp_path / "out", progress=False)
        assert bad in str(caught.value), (problem, caught.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(InferError, match="--level 7 does not exist"):
        score_slide(fp32, svs, tmp_path / "out", level=7, progress=False)
    with pytest.raises(InferError, match="coarser"):
        score_slide(fp32, svs, tmp_path / "out", level=2, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(InferError, match="not empty"):
        score_slide(fp32, svs, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    for setting in ({"min_tissue": 1.5}, {"threshold": -0.1}, {"top_k": 0}):
        with pytest.raises(InferError):
            score_slide(fp32, svs, tmp_path / "out", **setting)


def test_a_killed_runs_partial_folder_is_removed_but_a_running_ones_is_not(
    fp32: Predictor, svs: Path, tmp_path: Path
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its number now names no process: what a killed run leaves
    dead = tmp_path / f".out.partial-{child.pid}"
    running = tmp_path / f".out.partial-{os.getppid()}"  # a process that is alive: another run of this slide
    for folder in (dead, running):
        folder.mkdir()
        (folder / "cells.csv").write_text("row,col\n")
    score_slide(fp32, svs, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "summary.json").is_file()
    assert not dead.exists() and (running / "cells.csv").is_file()


def test_many_slides_shard_resume_and_a_bad_one_is_listed(
    baseline_run: Path, svs: Path, mosaic, make_slide: MakeSlide, tmp_path: Path
) -> None:
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    strip = mosaic.image[64:160, 96:288]  # two patches
    make_slide(cohort / "scan.svs", strip, MODEL_MPP, aperio=True, levels=1)
    make_slide(cohort / "lossless.tif", strip, MODEL_MPP, compression="zlib", levels=1)
    (cohort / "broken.svs").write_text("garbage")
    runner = CliRunner()

    def run(*extra: str) -> object:
        args = ["slide", str(baseline_run), str(cohort), "--out", str(tmp_path / "out"), "--workers", "1", *extra]
        return runner.invoke(app, args)

    first = run("--shard", "0/2")  # broken, scan (sorted names: broken, lossless, scan)
    assert first.exit_code == 2 and "broken.svs" in first.output
    assert (tmp_path / "out" / "scan" / "summary.json").is_file() and not (tmp_path / "out" / "lossless").exists()
    second = run("--shard", "1/2")
    assert second.exit_code == 0, second.output
    table = pd.read_csv(tmp_path / "out" / "slides.csv")
    assert table["name"].tolist() == ["lossless", "scan"] and table["slide_score"].notna().all()
    stamp = (tmp_path / "out" / "scan" / "summary.json").stat().st_mtime_ns
    again = run("--shard", "0/2")
    assert "skipped" in again.output and (tmp_path / "out" / "scan" / "summary.json").stat().st_mtime_ns == stamp
    table = pd.read_csv(tmp_path / "out" / "slides.csv")
    assert table.set_index("name").loc["broken", "error"].startswith(str(cohort / "broken.svs"))
    bad = runner.invoke(app, ["slide", str(baseline_run), str(svs), "--out", str(tmp_path / "o"), "--shard", "2/2"])
    assert bad.exit_code == 2 and "--shard" in bad.output
    not_a_run = runner.invoke(app, ["slide", str(svs), "--out", str(tmp_path / "o")])
    assert not_a_run.exit_code == 2 and "not a run folder" in not_a_run.output


def test_the_model_scale_comes_from_the_run(baseline_run: Path, svs: Path, tmp_path: Path) -> None:
    """A run records its mpp; one written before the field existed reads as PCam's; runs that disagree are refused;
    a slide coarser than the run's scale is refused."""
    old, fine = tmp_path / "old", tmp_path / "fine"
    for copy, edit in ((old, lambda text: "\n".join(x for x in text.splitlines() if not x.startswith("mpp:"))),
                       (fine, lambda text: text.replace("mpp: 0.972", "mpp: 0.486"))):  # fmt: skip
        copy.mkdir()
        for name in ("config.yaml", "model.safetensors"):
            (copy / name).write_bytes((baseline_run / name).read_bytes())
        (copy / "config.yaml").write_text(edit((baseline_run / "config.yaml").read_text()))
    assert "mpp: 0.972" in (baseline_run / "config.yaml").read_text()
    assert Predictor([old], progress=False).mpp == MODEL_MPP
    with pytest.raises(InferError, match="different scales"):
        Predictor([baseline_run, fine], progress=False)
    with pytest.raises(InferError, match=r"scan\.svs.*coarser than the model's 0\.486"):
        score_slide(Predictor([fine], progress=False), svs, tmp_path / "out", progress=False)
