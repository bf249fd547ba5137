"""extract: real patches laid on lossless slides at known places come back as a store, byte for byte, labelled."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import histodetect.infer.extract as extract_module
from histodetect.cli import app
from histodetect.data.annotations import read_polygons
from histodetect.data.split import groups_of, split_rows
from histodetect.data.store import Store
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor
from histodetect.infer.extract import HARD_NEGATIVE, SAMPLED, Settings, extract
from histodetect.runs.config import TrainConfig
from histodetect.train.run import train

pytestmark = pytest.mark.slow  # most tests extract hard negatives with a trained run

MakeSlide = Callable[..., Path]
MODEL_MPP = 0.972
ALL = 10_000  # more windows than a test slide has: every candidate is taken


def square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


def top_left(centre: tuple[int, int]) -> tuple[int, int]:
    """Level-0 (x, y) of the patch whose centre cell is ``centre`` (row, col): its window starts a cell before."""
    r, c = centre
    return 32 * (c - 1), 32 * (r - 1)


def tumour_geojson(path: Path, mosaic) -> Path:
    """QuPath-style GeoJSON: each tumour patch's 96 px square, class Tumor."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square(*top_left(c), 96)]},
            "properties": {"classification": {"name": "Tumor"}},
        }
        for c, label in zip(mosaic.centres, mosaic.labels, strict=True)
        if label == 1
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def asap_xml(path: Path, tumour: list[list[list[float]]], excluded: list[list[list[float]]]) -> Path:
    """Camelyon16's ASAP XML: polygons in group Tumor, exclusions in group _2."""

    def annotation(k: int, ring: list[list[float]], group: str) -> str:
        points = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(ring[:-1]))
        head = f'<Annotation Name="A{k}" Type="Polygon" PartOfGroup="{group}">'
        return f"{head}<Coordinates>{points}</Coordinates></Annotation>"

    body = [annotation(k, r, "Tumor") for k, r in enumerate(tumour)]
    body += [annotation(len(tumour) + k, r, "_2") for k, r in enumerate(excluded)]
    path.write_text(
        f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{"".join(body)}</Annotations></ASAP_Annotations>'
    )
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, mosaic, make_slide: MakeSlide) -> dict[str, Path]:
    """``tumour.tif`` (the mosaic, lossless, at the model's scale) with ``annotations/tumour.geojson``, and
    ``normal.tif`` (the mosaic turned a quarter: other windows, tumour patches among them) without outlines."""
    root = tmp_path_factory.mktemp("cohort")
    slides, notes = root / "slides", root / "annotations"
    slides.mkdir()
    notes.mkdir()
    make_slide(slides / "tumour.tif", mosaic.image, MODEL_MPP, compression="zlib", levels=2)
    make_slide(slides / "normal.tif", np.ascontiguousarray(np.rot90(mosaic.image)), MODEL_MPP, compression="zlib")
    tumour_geojson(notes / "tumour.geojson", mosaic)
    return {"slides": slides, "annotations": notes, "root": root}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, cohort: dict[str, Path]) -> Store:
    """Every candidate window of both slides."""
    out = tmp_path_factory.mktemp("full") / "store"
    settings = Settings(per_slide=ALL, seed=0)
    return extract([cohort["slides"]], out, settings, annotations=cohort["annotations"], workers=0, progress=False)


def windows_by_cell(store: Store, group: str) -> dict[tuple[int, int], int]:
    """(row, col) of each window's centre cell -> its store row, for one slide at the model's scale."""
    index = store.index[store.groups == group]
    places = zip(index["row"], index["coord_x"], index["coord_y"], strict=True)
    return {(y // 32 + 1, x // 32 + 1): row for row, x, y in places}


def test_patches_laid_on_a_slide_come_back_byte_identical_with_their_labels(full: Store, mosaic) -> None:
    assert full.manifest["format"] == "histodetect-store" and full.manifest["version"] == 2
    assert set(full.splits) == {"train"} and set(full.index["source"]) == {SAMPLED}
    assert full.index["id"].is_unique and (full.index["id"] == full.index["sha1"]).all()
    cells = windows_by_cell(full, "tumour")
    for patch, label, centre in zip(mosaic.patches, mosaic.labels, mosaic.centres, strict=True):
        row = cells[centre]
        np.testing.assert_array_equal(full.read([row])[0], patch)
        entry = full.index.iloc[row]
        assert entry["id"] == hashlib.sha1(patch).hexdigest()
        assert entry["label"] == label and entry["group"] == "tumour"
        assert (entry["coord_x"], entry["coord_y"]) == top_left(centre)
    for row in full.rows():  # each window is exactly the slide's pixels at its coordinates
        x, y = full.index.iloc[row][["coord_x", "coord_y"]]
        if full.groups[row] == "tumour":
            np.testing.assert_array_equal(full.read([row])[0], mosaic.image[y : y + 96, x : x + 96])


def test_a_window_is_positive_only_when_its_centre_cell_holds_tumour(full: Store, mosaic) -> None:
    tumour_cells = {
        (r + dr, c + dc)
        for (r, c), label in zip(mosaic.centres, mosaic.labels, strict=True)
        if label == 1
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
    }
    cells = windows_by_cell(full, "tumour")
    labels = {cell: full.labels[row] for cell, row in cells.items()}
    assert {cell for cell, label in labels.items() if label == 1} == tumour_cells
    # A normal patch beside a tumour one (squares sharing only an edge): the cell on that edge has tumour in its
    # window's margin alone and is negative.
    normal = [c for c, label in zip(mosaic.centres, mosaic.labels, strict=True) if label == 0]
    edge = next((r, c + 1) for r, c in normal if (r, c + 3) in tumour_cells)
    assert labels[edge] == 0 and (edge[0], edge[1] + 1) in tumour_cells


def test_a_slide_without_outlines_gives_negatives_and_the_manifest_records_the_slides(full: Store) -> None:
    assert (full.labels[full.groups == "normal"] == 0).all() and (full.groups == "normal").sum() > 100
    record = full.manifest["extract"]
    assert record["settings"]["mpp"] == MODEL_MPP and record["settings"]["per_slide"] == ALL
    slides = {s["name"]: s for s in record["slides"]}
    assert set(slides) == {"normal", "tumour"} and not slides["normal"]["tumour"] and slides["tumour"]["tumour"]
    tumour = slides["tumour"]
    assert (tumour["level"], tumour["scale_factor"], tumour["mpp"]) == (0, 1.0, pytest.approx(MODEL_MPP))
    assert tumour["sampled"]["positive"] == tumour["candidates"]["positive"] == (full.labels == 1).sum()
    assert full.manifest["count"] == sum(s["sampled"]["positive"] + s["sampled"]["negative"] for s in slides.values())
    assert not list(full.path.parent.glob(".*"))  # neither the work folder nor a partial store is left


def test_asap_xml_exclusions_are_cut_out_of_the_tumour(
    tmp_path: Path, mosaic, make_slide: MakeSlide, full: Store
) -> None:
    slide = make_slide(tmp_path / "xml.tif", mosaic.image, MODEL_MPP, compression="zlib", levels=2)
    tumour = [square(*top_left(c), 96) for c, label in zip(mosaic.centres, mosaic.labels, strict=True) if label == 1]
    first = next(c for c, label in zip(mosaic.centres, mosaic.labels, strict=True) if label == 1)
    asap_xml(tmp_path / "xml.xml", tumour, [square(*top_left(first), 96)])  # the first tumour patch excluded whole
    store = extract([slide], tmp_path / "store", Settings(per_slide=ALL), annotations=tmp_path / "xml.xml",
                    workers=0, progress=False)  # fmt: skip
    cells, reference = windows_by_cell(store, "xml"), windows_by_cell(full, "tumour")
    assert set(cells) == set(reference)
    changed = {cell for cell in cells if store.labels[cells[cell]] != full.labels[reference[cell]]}
    assert changed == {(first[0] + dr, first[1] + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)}


def test_outlines_in_one_multipolygon_whose_squares_share_edges_all_count(
    tmp_path: Path, cohort: dict[str, Path], mosaic
) -> None:
    """Every patch of the mosaic outlined by its square, all in one MultiPolygon (invalid: its parts share edges).
    Repaired whole, shapely's make_valid took the squares enclosed by others for holes; each part is kept."""
    squares = [[square(*top_left(c), 96)] for c in mosaic.centres]
    outline = tmp_path / "tumour.geojson"
    outline.write_text(json.dumps({"type": "MultiPolygon", "coordinates": squares}))
    assert read_polygons(outline).area == 96 * 96 * len(squares)
    store = extract([cohort["slides"] / "tumour.tif"], tmp_path / "store", Settings(per_slide=ALL),
                    annotations=outline, workers=0, progress=False)  # fmt: skip
    cells = windows_by_cell(store, "tumour")
    assert all(store.labels[cells[c]] == 1 for c in mosaic.centres)


def test_the_same_seed_gives_the_same_bytes_and_the_draw_keeps_the_share(
    tmp_path: Path, cohort: dict[str, Path]
) -> None:
    def run(name: str, seed: int) -> Store:
        settings = Settings(per_slide=20, positive_share=0.25, seed=seed)
        return extract([cohort["slides"]], tmp_path / name, settings, annotations=cohort["annotations"], workers=0,
                       progress=False)  # fmt: skip

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    for name in ("patches.u8", "index.csv"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    assert (a.path / "index.csv").read_bytes() != (c.path / "index.csv").read_bytes()
    tumour = a.labels[a.groups == "tumour"]
    assert (tumour == 1).sum() == 5 and (tumour == 0).sum() == 15 and (a.labels[a.groups == "normal"] == 0).sum() == 20


def test_a_killed_extract_resumes_with_the_slides_it_finished(
    tmp_path: Path, cohort: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(per_slide=30, seed=1)
    original = extract_module.extract_slide
    calls: list[str] = []

    def killed_on_second(job: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(job.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while cutting the second slide
        return original(job, *args, **kwargs)

    options: dict[str, Any] = dict(annotations=cohort["annotations"], workers=0, progress=False)
    monkeypatch.setattr(extract_module, "extract_slide", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        extract([cohort["slides"]], tmp_path / "store", settings, **options)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in (tmp_path / ".store.extract-work").glob("*.npz")] == ["normal.npz"]
    with pytest.raises(InferError, match=r"seed 1 -> 2"):
        extract([cohort["slides"]], tmp_path / "store", Settings(per_slide=30, seed=2), **options)

    calls.clear()
    monkeypatch.setattr(
        extract_module, "extract_slide", lambda job, *a, **k: calls.append(job.name) or original(job, *a, **k)
    )
    resumed = extract([cohort["slides"]], tmp_path / "store", settings, **options)
    assert calls == ["tumour"] and not (tmp_path / ".store.extract-work").exists()
    fresh = extract([cohort["slides"]], tmp_path / "fresh", settings, **options)
    for name in ("patches.u8", "index.csv"):
        assert (resumed.path / name).read_bytes() == (fresh.path / name).read_bytes()


def test_the_same_pixels_twice_are_stored_once_and_counted(tmp_path: Path, mosaic, make_slide: MakeSlide) -> None:
    twins = np.full((96 * 3, 96 * 5, 3), 255, dtype=np.uint8)
    patch = mosaic.patches[int(np.flatnonzero(mosaic.labels == 0)[0])]
    twins[96:192, 96:192] = patch
    twins[96:192, 288:384] = patch
    slide = make_slide(tmp_path / "twins.tif", twins, MODEL_MPP, compression="zlib", levels=1)
    store = extract([slide], tmp_path / "store", Settings(per_slide=ALL), workers=0, progress=False)
    sha1 = hashlib.sha1(patch).hexdigest()
    assert (store.ids == sha1).sum() == 1 and store.index["id"].is_unique
    assert store.manifest["extract"]["duplicates"] >= 1
    dropped = store.report["duplicate_pixels"]
    assert any(d["id"] == sha1 and d["coord_x"] == 288 and d["kept"]["coord_x"] == 96 for d in dropped)
    assert store.manifest["problems"]["skipped"] == len(dropped) == store.manifest["extract"]["duplicates"]
    info = CliRunner().invoke(app, ["info", str(store.path)])
    assert info.exit_code == 0 and "duplicate_pixels" in info.output, info.output


def far_from(entry: pd.Series, corners: np.ndarray) -> bool:
    """Whether a window's centre lies more than 96 px beyond every 96 px tumour square (top-left ``corners``)."""
    cx, cy = entry["coord_x"] + 48, entry["coord_y"] + 48
    dx = np.maximum(np.maximum(corners[:, 0] - cx, cx - corners[:, 0] - 96), 0)
    dy = np.maximum(np.maximum(corners[:, 1] - cy, cy - corners[:, 1] - 96), 0)
    return bool(np.hypot(dx, dy).min() > 96)


def test_hard_negatives_are_the_run_s_top_windows_away_from_tumour(
    tmp_path: Path, baseline_run: Path, mosaic, make_slide: MakeSlide
) -> None:
    """Four tumour patches in a block on the left, outlined; twelve normal ones 288 px to their right."""
    image = np.full((96 * 5, 96 * 10, 3), 255, dtype=np.uint8)
    tumour, normal = mosaic.patches[mosaic.labels == 1], mosaic.patches[mosaic.labels == 0]
    for k in range(4):
        image[96 + 96 * (k // 2) : 192 + 96 * (k // 2), 96 + 96 * (k % 2) : 192 + 96 * (k % 2)] = tumour[k]
    for k in range(12):
        image[96 + 96 * (k // 4) : 192 + 96 * (k // 4), 480 + 96 * (k % 4) : 576 + 96 * (k % 4)] = normal[k]
    slide = make_slide(tmp_path / "apart.tif", image, MODEL_MPP, compression="zlib", levels=1)
    outline = tmp_path / "apart.geojson"
    outline.write_text(json.dumps({"type": "Polygon", "coordinates": [square(96, 96, 192)]}))
    options: dict[str, Any] = dict(annotations=outline, workers=0, progress=False)
    settings = Settings(per_slide=6, seed=0, hard_negatives=str(baseline_run), hard_count=4)
    store = extract([slide], tmp_path / "store", settings, **options)
    hard = np.flatnonzero(store.index["source"] == HARD_NEGATIVE)
    assert len(hard) == 4 and (store.labels[hard] == 0).all() and store.index["id"].is_unique
    assert (store.index["source"] == SAMPLED).sum() == 6
    corner = np.array([[96, 96], [192, 96], [96, 192], [192, 192]])
    assert all(far_from(store.index.iloc[row], corner) for row in hard)
    record = store.manifest["extract"]
    assert record["slides"][0]["hard_negatives"] == 4 and record["settings"]["hard_count"] == 4
    predictor = Predictor([baseline_run], progress=False)
    predicted = predictor.predict(store.read(hard))
    low, high = record["slides"][0]["hard_negative_probability"]
    assert low - 0.02 <= predicted.min() and predicted.max() <= high + 0.02  # what the slide path scored them
    # Every other window far from tumour scores no higher than the hard ones.
    every = extract([slide], tmp_path / "every", Settings(per_slide=ALL), **options)
    far = [
        row
        for row in range(len(every))
        if far_from(every.index.iloc[row], corner) and every.ids[row] not in set(store.ids)
    ]
    assert len(far) > 100 and predictor.predict(every.read(far)).max() <= predicted.min() + 0.02
    with pytest.raises(InferError, match=r"--mpp 0.5: the run .* was trained at 0.972"):
        extract([slide], tmp_path / "other", Settings(mpp=0.5, hard_negatives=str(baseline_run)), **options)


def test_a_reference_csv_decides_tumour_or_normal(tmp_path: Path, cohort: dict[str, Path]) -> None:
    (tmp_path / "reference.csv").write_text("tumour.tif,Normal,\nnormal,Normal\n")
    store = extract([cohort["slides"]], tmp_path / "store", Settings(per_slide=10), annotations=cohort["annotations"],
                    reference=tmp_path / "reference.csv", workers=0, progress=False)  # fmt: skip
    assert (store.labels == 0).all()
    slides = {s["name"]: s for s in store.manifest["extract"]["slides"]}
    assert slides["tumour"]["reference"] == "Normal" and not slides["tumour"]["tumour"]

    def refused(text: str) -> str:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(InferError) as caught:
            extract([cohort["slides"]], tmp_path / "bad", Settings(), annotations=cohort["annotations"],
                    reference=tmp_path / "bad.csv", workers=0, progress=False)  # fmt: skip
        return str(caught.value)

    assert "bad.csv, line 3" in refused("image,type\ntumour,Tumor\ntumour.tif,Normal\n")
    assert "line 2: type 'Macro'" in refused("tumour,Tumor\nnormal,Macro\n")
    assert "normal.tif: the reference calls it Tumor" in refused("tumour,Tumor\nnormal,Tumor\n")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_bad_input_is_refused_in_one_line_before_any_work(
    tmp_path: Path, cohort: dict[str, Path], mosaic, make_slide: MakeSlide
) -> None:
    bare = make_slide(tmp_path / "bare.tif", mosaic.image, None, compression="zlib", levels=1)
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(bare), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--slide-mpp" in result.output and "Traceback" not in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["extract", str(cohort["slides"]), "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "not a histodetect store" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for flag, value in (("--per-slide", "0"), ("--positive-share", "1.5"), ("--mpp", "-1"), ("--hard-count", "-2")):
        result = runner.invoke(app, ["extract", str(cohort["slides"]), "--out", str(tmp_path / "s"), flag, value])
        assert result.exit_code == 2 and flag in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_the_command_writes_a_store_that_train_splits_by_slide(
    tmp_path: Path, cohort: dict[str, Path], mosaic, make_slide: MakeSlide
) -> None:
    notes = tmp_path / "annotations"
    notes.mkdir()
    (notes / "tumour.geojson").write_bytes((cohort["annotations"] / "tumour.geojson").read_bytes())
    height, width = mosaic.image.shape[:2]
    for k in range(2):  # two more tumour slides: the mosaic mirrored (other windows), with its outlines mirrored
        image = mosaic.image[:, ::-1] if k == 0 else mosaic.image[::-1]
        make_slide(tmp_path / f"flip{k}.tif", np.ascontiguousarray(image), MODEL_MPP, compression="zlib", levels=1)
        squares = []
        for c, label in zip(mosaic.centres, mosaic.labels, strict=True):
            x, y = top_left(c)
            if label == 1:
                squares.append([square(width - x - 96, y, 96) if k == 0 else square(x, height - y - 96, 96)])
        (notes / f"flip{k}.geojson").write_text(json.dumps({"type": "MultiPolygon", "coordinates": squares}))
    result = CliRunner().invoke(
        app,
        ["extract", str(cohort["slides"]), str(tmp_path / "flip0.tif"), str(tmp_path / "flip1.tif"),
         "--annotations", str(notes), "--out", str(tmp_path / "store"), "--per-slide", "24", "--seed", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tumour (tumour): 12 positive + 12 negative" in result.output
    store = Store(tmp_path / "store")
    assert sorted(set(store.groups)) == ["flip0", "flip1", "normal", "tumour"]
    assert (store.labels == 1).sum() == 36 and len(store) == 96
    rows = store.rows(labeled=True)
    groups = groups_of("auto", store, rows)
    parts = split_rows(store.labels[rows], val_fraction=0.25, seed=0, groups=groups)
    assert not set(groups[parts.train]) & set(groups[parts.val])
    config = TrainConfig(model="baseline-cnn", epochs=1, batch_size=16, val_fraction=0.5, groups="auto",
                         patience=0, num_workers=0)  # fmt: skip
    summary = train(store, tmp_path / "run", config)
    assert summary["n_train"] + summary["n_val"] == len(rows)
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    side = dict(zip(store.ids, store.groups, strict=True))
    by_group = split.assign(group=split["id"].map(side)).groupby("group")["part"].nunique()
    assert (by_group == 1).all()


def test_a_slide_whose_outlines_changed_is_extracted_again_on_resume(
    tmp_path: Path, cohort: dict[str, Path], mosaic, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = tmp_path / "annotations"
    notes.mkdir()
    tumour_geojson(notes / "tumour.geojson", mosaic)
    options: dict[str, Any] = dict(annotations=notes, workers=0, progress=False)
    original_assemble, original_slide = extract_module._assemble, extract_module.extract_slide

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # both slides done, killed while writing the store

    monkeypatch.setattr(extract_module, "_assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        extract([cohort["slides"]], tmp_path / "store", Settings(per_slide=10), **options)
    one = json.loads((notes / "tumour.geojson").read_text())
    one["features"] = one["features"][:1]  # the outlines are corrected: one tumour patch only
    (notes / "tumour.geojson").write_text(json.dumps(one))
    calls: list[str] = []
    monkeypatch.setattr(extract_module, "_assemble", original_assemble)
    monkeypatch.setattr(
        extract_module, "extract_slide", lambda job, *a, **k: calls.append(job.name) or original_slide(job, *a, **k)
    )
    store = extract([cohort["slides"]], tmp_path / "store", Settings(per_slide=10), **options)
    assert calls == ["tumour"]
    slides = {s["name"]: s for s in store.manifest["extract"]["slides"]}
    assert slides["tumour"]["candidates"]["positive"] == 9  # the one patch's 3 x 3 cells
