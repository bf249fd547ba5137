"""``histodetect ingest`` on real patches: every layout, every kind of bad input, the issue's done criterion.

Bad inputs are made by corrupting copies of the embedded sample's real files (never synthetic pixels), so the
checks see exactly what a damaged download or a careless rename would produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data import ingest as ingest_module
from histodetect.data.ingest import IngestResult, describe_store, ingest
from histodetect.data.store import Store

from .conftest import write_pcam

N_SAMPLE_TRAIN = 240
N_SAMPLE_TEST = 16


# ------------------------------------------------------------------------------------------------ helpers
def copy_source(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run(source: Path, tmp_path: Path, **options: object) -> IngestResult:
    return ingest(source, tmp_path / "out" / "store", progress=False, **options)  # type: ignore[arg-type]


def problems(result: IngestResult, kind: str | None = None) -> list[dict[str, str | None]]:
    return [p for p in result.report["problems"] if kind is None or p["kind"] == kind]


def labels_of(root: Path) -> dict[str, int]:
    table = pd.read_csv(root / "train_labels.csv", dtype={"id": str})
    return dict(zip(table["id"], table["label"].astype(int), strict=True))


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sha1(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def train_file(root: Path, id_: str) -> Path:
    return root / "train" / f"{id_}.tif"


def nth_id(root: Path, n: int) -> str:
    return sorted(labels_of(root))[n]


def append_csv(root: Path, line: str, name: str = "train_labels.csv") -> None:
    path = root / name
    path.write_text(path.read_text().rstrip("\n") + f"\n{line}\n")


def rewrite_csv(root: Path, edit: Callable[[list[str]], list[str]], name: str = "train_labels.csv") -> None:
    path = root / name
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def save_as(root: Path, id_: str, image: Image.Image, fmt: str = "TIFF") -> str:
    """Overwrite ``train/<id>.tif`` with ``image`` in ``fmt`` (PNG content under a .tif name stays a .tif)."""
    image.save(train_file(root, id_), format=fmt)
    return id_


def real_image(root: Path, id_: str) -> Image.Image:
    return Image.open(train_file(root, id_)).convert("RGB")


# ------------------------------------------------------------------------------------------------ corruptions
# Each takes a copy of the sample (competition layout) and returns the id it broke (None: a file-level one).
def truncated_tiff(root: Path) -> str:
    id_ = nth_id(root, 0)
    path = train_file(root, id_)
    path.write_bytes(path.read_bytes()[:1000])
    return id_


def grayscale_png_named_tif(root: Path) -> str:
    id_ = nth_id(root, 1)
    return save_as(root, id_, real_image(root, id_).convert("L"), "PNG")


def narrow_patch(root: Path) -> str:
    id_ = nth_id(root, 2)
    return save_as(root, id_, Image.fromarray(np.asarray(real_image(root, id_))[:, :95]))


def rgba_patch(root: Path) -> str:
    id_ = nth_id(root, 3)
    return save_as(root, id_, real_image(root, id_).convert("RGBA"))


def sixteen_bit_patch(root: Path) -> str:
    id_ = nth_id(root, 4)
    gray = np.asarray(real_image(root, id_).convert("L")).astype(np.uint16) * 257
    return save_as(root, id_, Image.fromarray(gray))


def palette_patch(root: Path) -> str:
    id_ = nth_id(root, 5)
    return save_as(root, id_, real_image(root, id_).convert("P"))


def cmyk_patch(root: Path) -> str:
    id_ = nth_id(root, 6)
    return save_as(root, id_, real_image(root, id_).convert("CMYK"))


def empty_file(root: Path) -> str:
    id_ = nth_id(root, 7)
    train_file(root, id_).write_bytes(b"")
    return id_


def conflicting_rows(root: Path) -> str:
    id_ = nth_id(root, 8)
    append_csv(root, f"{id_},{1 - labels_of(root)[id_]}")
    return id_


def identical_rows(root: Path) -> str:
    id_ = nth_id(root, 9)
    append_csv(root, f"{id_},{labels_of(root)[id_]}")
    return id_


def missing_file(root: Path) -> str:
    id_ = nth_id(root, 10)
    train_file(root, id_).unlink()
    return id_


def extra_unlabeled_image(root: Path) -> str:
    flipped = np.ascontiguousarray(np.asarray(real_image(root, nth_id(root, 11)))[::-1])
    id_ = sha1(flipped)
    return save_as(root, id_, Image.fromarray(flipped))


def label_of_two(root: Path) -> str:
    id_ = nth_id(root, 12)
    rewrite_csv(root, lambda lines: [f"{id_},2" if line.startswith(id_) else line for line in lines])
    return id_


def csv_with_bom(root: Path) -> None:
    path = root / "train_labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def csv_with_blank_lines(root: Path) -> None:
    rewrite_csv(root, lambda lines: [lines[0], "", *lines[1:5], "  ", *lines[5:], ""])


def csv_missing_column(root: Path) -> None:
    rewrite_csv(root, lambda lines: ["id,lbl", *lines[1:]])


def csv_missing_header(root: Path) -> None:
    rewrite_csv(root, lambda lines: lines[1:])


def renamed_file(root: Path) -> str:
    old = nth_id(root, 13)
    new = old[::-1]
    train_file(root, old).rename(train_file(root, new))
    rewrite_csv(root, lambda lines: [line.replace(old, new) for line in lines])
    return new


def duplicate_pixels(root: Path) -> str:
    """The copy sorts after the original ('f' * 40), so it is the one reported and dropped."""
    original = nth_id(root, 14)
    copy = "f" * 40
    shutil.copy(train_file(root, original), train_file(root, copy))
    append_csv(root, f"{copy},{labels_of(root)[original]}")
    return copy


def unsafe_csv_id(root: Path) -> str:
    shutil.copy(train_file(root, nth_id(root, 15)), root.parent / "evil.tif")  # what ../evil would point at
    append_csv(root, "../evil,1")
    return "../evil"


def unsafe_file_name(root: Path) -> str:
    shutil.copy(train_file(root, nth_id(root, 16)), root / "train" / "..evil.tif")
    return "..evil"


def stray_text_file(root: Path) -> None:
    (root / "train" / "notes.txt").write_text("not a patch\n")


def stray_root_image(root: Path) -> None:
    shutil.copy(train_file(root, nth_id(root, 17)), root / "lost.tif")


def image_not_in_submission(root: Path) -> str:
    id_ = sorted(p.stem for p in (root / "test").iterdir())[0]
    rewrite_csv(root, lambda lines: [line for line in lines if not line.startswith(id_)], "sample_submission.csv")
    return id_


def submission_id_without_image(root: Path) -> str:
    id_ = sorted(p.stem for p in (root / "test").iterdir())[1]
    (root / "test" / f"{id_}.tif").unlink()
    return id_


def id_in_two_splits(root: Path) -> str:
    id_ = sorted(p.stem for p in (root / "test").iterdir())[2]
    shutil.copy(root / "test" / f"{id_}.tif", train_file(root, id_))
    append_csv(root, f"{id_},0")
    return id_


CASES = [
    # corruption, kind, severity, text the detail must contain
    (truncated_tiff, "unreadable", "error", "truncated"),
    (grayscale_png_named_tif, "wrong_mode", "error", "'L' (grayscale) in a PNG"),
    (narrow_patch, "wrong_size", "error", "95x96"),
    (rgba_patch, "wrong_mode", "error", "'RGBA'"),
    (sixteen_bit_patch, "wrong_mode", "error", "'I;16'"),
    (palette_patch, "wrong_mode", "error", "'P' (palette)"),
    (cmyk_patch, "wrong_mode", "error", "'CMYK'"),
    (empty_file, "empty_file", "error", "0 bytes"),
    (conflicting_rows, "duplicate_id", "error", "conflicting labels"),
    (identical_rows, "duplicate_id", "warning", "kept once"),
    (missing_file, "missing_image", "error", "no image"),
    (extra_unlabeled_image, "unlabeled_image", "error", "no row"),
    (label_of_two, "bad_label", "error", "'2'"),
    (csv_with_bom, "csv_bom", "warning", "byte-order mark"),
    (csv_with_blank_lines, "csv_blank_line", "warning", "3 blank line(s)"),
    (csv_missing_column, "csv_missing_column", "error", "no ['label']"),
    (csv_missing_header, "csv_missing_header", "error", "looks like data"),
    (renamed_file, "id_not_sha1", "warning", "renamed"),
    (duplicate_pixels, "duplicate_pixels", "error", "same pixels as"),
    (unsafe_csv_id, "unsafe_id", "error", "path separator"),
    (unsafe_file_name, "unsafe_id", "error", "'..'"),
    (stray_text_file, "ignored_file", "warning", "not read"),
    (stray_root_image, "ignored_file", "warning", "outside the layout"),
    (image_not_in_submission, "unlisted_image", "warning", "ingested anyway"),
    (submission_id_without_image, "missing_image", "error", "no image in test"),
    (id_in_two_splits, "duplicate_id", "error", "splits test, train"),
]
FATAL = {"csv_missing_column", "csv_missing_header"}


@pytest.fixture
def sample_copy(sample_dir: Path, tmp_path: Path) -> Path:
    return copy_source(sample_dir, tmp_path / "source")


# -------------------------------------------------------------------------------------------- clean inputs
def test_sample_round_trips_ids_labels_and_pixels(sample_store: Store, sample_dir: Path) -> None:
    labels = labels_of(sample_dir)
    assert sample_store.manifest["splits"]["train"] == {
        "count": N_SAMPLE_TRAIN,
        "labeled": N_SAMPLE_TRAIN,
        "unlabeled": 0,
        "positive": sum(labels.values()),
        "negative": N_SAMPLE_TRAIN - sum(labels.values()),
    }
    assert sample_store.manifest["splits"]["test"]["unlabeled"] == N_SAMPLE_TEST
    assert sample_store.manifest["problems"]["errors"] == sample_store.manifest["problems"]["warnings"] == 0
    index = sample_store.index
    for row in index.itertuples():
        expected = labels.get(row.id, -1) if row.split == "train" else -1
        assert (row.label, row.source, row.sha1) == (expected, f"{row.split}/{row.id}.tif", row.id)
        np.testing.assert_array_equal(sample_store.patches[row.row], pixels_of(sample_dir / row.source))
    assert sorted(index["id"]) == sorted(p.stem for p in sample_dir.glob("*/*.tif"))


def test_pool_and_in_process_decoding_write_the_same_store(
    sample_dir: Path, sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Force the process pool on the small sample, with several scratch windows and partial chunks."""
    monkeypatch.setattr(ingest_module, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(ingest_module, "WINDOW", 100)
    monkeypatch.setattr(ingest_module, "CHUNK", 7)
    store = run(sample_dir, tmp_path, workers=2).store
    assert store is not None
    pd.testing.assert_frame_equal(store.index, sample_store.index)
    np.testing.assert_array_equal(store.patches, sample_store.patches)


def test_bare_folder_is_train_with_labels_and_test_without(sample_dir: Path, tmp_path: Path) -> None:
    folder = copy_source(sample_dir / "train", tmp_path / "images")
    labeled = run(folder, tmp_path / "a", labels=sample_dir / "train_labels.csv").store
    unlabeled = run(folder, tmp_path / "b").store
    assert labeled is not None and unlabeled is not None
    assert labeled.manifest["splits"]["train"]["labeled"] == N_SAMPLE_TRAIN
    assert dict(zip(labeled.ids, labeled.labels.tolist(), strict=True)) == labels_of(sample_dir)
    assert unlabeled.manifest["splits"] == {
        "test": {
            "count": N_SAMPLE_TRAIN,
            "labeled": 0,
            "unlabeled": N_SAMPLE_TRAIN,
            "positive": 0,
            "negative": 0,
        }
    }


@pytest.mark.parametrize("names", [None, "neg,pos"])
def test_folder_per_class(sample_dir: Path, tmp_path: Path, names: str | None) -> None:
    folders = (names or "0,1").split(",")
    for id_, label in labels_of(sample_dir).items():
        (tmp_path / "classes" / folders[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(train_file(sample_dir, id_), tmp_path / "classes" / folders[label])
    store = run(tmp_path / "classes", tmp_path, class_dirs=names).store
    assert store is not None and store.manifest["layout"] == "class-folders"
    assert dict(zip(store.ids, store.labels.tolist(), strict=True)) == labels_of(sample_dir)
    assert set(store.index["source"]) == {f"{folders[label]}/{id_}.tif" for id_, label in labels_of(sample_dir).items()}


def test_same_id_in_both_class_folders_is_a_conflict(sample_dir: Path, tmp_path: Path) -> None:
    for name in ("0", "1"):
        copy_source(sample_dir / "train", tmp_path / "classes" / name)
    result = run(tmp_path / "classes", tmp_path)
    assert result.exit_code == 2
    assert len(problems(result, "duplicate_id")) == N_SAMPLE_TRAIN


# ------------------------------------------------------------------------------------------------ PCam HDF5
def test_pcam_folder_streams_in_chunks_and_keeps_split_names(
    sample_arrays: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "H5_CHUNK", 64)
    pixels, labels, ids = sample_arrays
    write_pcam(tmp_path / "pcam", "train", pixels[:200], labels[:200])
    write_pcam(tmp_path / "pcam", "valid", pixels[200:], labels[200:])
    store = run(tmp_path / "pcam", tmp_path).store
    assert store is not None and store.splits == ["train", "valid"]
    assert store.ids.tolist() == ids.tolist()  # competition ids are the SHA-1 of the pixels, as PCam ids here
    np.testing.assert_array_equal(store.labels, labels)
    np.testing.assert_array_equal(store.patches, pixels)
    assert store.index["source"].iloc[201] == "camelyonpatch_level_2_split_valid_x.h5[1]"


def test_pcam_single_file_without_labels(
    sample_arrays: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x = write_pcam(tmp_path / "pcam", "test", sample_arrays[0][:50], None)
    write_pcam(tmp_path / "pcam", "train", sample_arrays[0][50:], sample_arrays[1][50:])
    result = run(x, tmp_path)
    assert result.store is not None and result.store.manifest["splits"]["test"]["unlabeled"] == 50
    assert result.store.splits == ["test"]
    assert [p["kind"] for p in problems(result)] == ["missing_labels"]


def test_pcam_bad_label_and_duplicate_patch(
    sample_arrays: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    pixels, labels, ids = sample_arrays
    pixels = np.concatenate([pixels, pixels[:1]])
    labels = np.concatenate([labels, labels[:1]])
    labels[5] = 2
    write_pcam(tmp_path / "pcam", "train", pixels, labels)
    refused = run(tmp_path / "pcam", tmp_path)
    assert refused.exit_code == 2 and not (tmp_path / "out" / "store").exists()
    assert [(p["kind"], p["id"]) for p in problems(refused)] == [
        ("bad_label", ids[5]),
        ("duplicate_pixels", ids[0]),
    ]
    assert problems(refused)[1]["file"] == f"camelyonpatch_level_2_split_train_x.h5[{len(ids)}]"
    store = run(tmp_path / "pcam", tmp_path, skip_bad=True).store
    assert store is not None and len(store) == N_SAMPLE_TRAIN - 1 and ids[5] not in set(store.ids)


@pytest.mark.parametrize(
    ("x", "y", "kind", "detail"),
    [
        (lambda p: p.astype(np.float32), lambda y: y, "wrong_mode", "float32, not uint8"),
        (lambda p: p[:, :, :95], lambda y: y, "wrong_size", "(8, 96, 95, 3)"),
        (lambda p: p, lambda y: y[:7], "bad_label", "7 labels for 8 patches"),
    ],
    ids=["float-pixels", "narrow-patches", "short-labels"],
)
def test_pcam_file_level_problems(
    sample_arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    tmp_path: Path,
    x: Callable[[np.ndarray], np.ndarray],
    y: Callable[[np.ndarray], np.ndarray],
    kind: str,
    detail: str,
) -> None:
    folder = tmp_path / "pcam"
    folder.mkdir()
    with h5py.File(folder / "camelyonpatch_level_2_split_valid_x.h5", "w") as fh:
        fh.create_dataset("x", data=x(sample_arrays[0][:8]))
    with h5py.File(folder / "camelyonpatch_level_2_split_valid_y.h5", "w") as fh:
        fh.create_dataset("y", data=y(sample_arrays[1][:8].astype(np.uint8).reshape(-1, 1, 1, 1)))
    result = run(folder, tmp_path)
    assert result.exit_code == 2
    assert [(p["kind"], p["id"]) for p in problems(result)] == [(kind, None)]
    assert detail in str(problems(result)[0]["detail"])


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(("corrupt", "kind", "severity", "detail"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_reported(
    corrupt: Callable[[Path], str | None],
    kind: str,
    severity: str,
    detail: str,
    sample_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offender = corrupt(sample_copy)
    if kind in FATAL:  # a CSV without its columns stops ingest before any image is read
        monkeypatch.setattr(ingest_module, "decode_patch", pytest.fail)
    result = run(sample_copy, tmp_path)
    found = [p for p in problems(result, kind) if offender is None or p["id"] == offender]
    assert found and all(p["severity"] == severity and detail in str(p["detail"]) for p in found), problems(result)
    out = tmp_path / "out" / "store"
    if severity == "warning":
        assert result.exit_code == 0 and result.store is not None
        assert result.store.manifest["problems"]["kinds"][kind] == {"warning": len(found)}
        return
    assert result.exit_code == 2 and result.store is None and not out.exists()
    assert json.loads((tmp_path / "out" / "store.report.json").read_text()) == result.report
    assert [p.name for p in out.parent.iterdir()] == ["store.report.json"]  # no partial store folder either

    skipped = run(sample_copy, tmp_path, skip_bad=True)
    if kind in FATAL:
        assert skipped.exit_code == 2 and not out.exists()
        return
    assert skipped.exit_code == 0 and skipped.store is not None
    assert offender not in set(skipped.store.ids)
    assert any(item["id"] == offender and kind in item["kinds"] for item in skipped.store.report["bad_items"])
    assert skipped.store.manifest["problems"]["skipped"] == len(skipped.store.report["bad_items"]) >= 1


def test_unsafe_id_never_reads_outside_source(sample_copy: Path, tmp_path: Path) -> None:
    unsafe_csv_id(sample_copy)
    store = run(sample_copy, tmp_path, skip_bad=True).store
    assert store is not None and len(store) == N_SAMPLE_TRAIN + N_SAMPLE_TEST
    assert not any("evil" in source for source in store.index["source"])
    assert [p["kind"] for p in store.report["problems"]] == ["unsafe_id"]  # and no missing_image for it


def test_duplicate_pixels_keep_the_one_named_by_its_sha1(sample_copy: Path, tmp_path: Path) -> None:
    """The altered copy sorts first ('000...'), yet the patch under its own SHA-1 is the one kept, and the
    report says which and why (the old code kept the first in sort order: the copy)."""
    original = nth_id(sample_copy, 0)
    copy = "0" * 40
    shutil.copy(train_file(sample_copy, original), train_file(sample_copy, copy))
    append_csv(sample_copy, f"{copy},{labels_of(sample_copy)[original]}")
    result = run(sample_copy, tmp_path, skip_bad=True)
    assert result.store is not None and original in set(result.store.ids) and copy not in set(result.store.ids)
    kept = result.store.index.set_index("id").loc[original]
    assert (kept["source"], kept["sha1"]) == (f"train/{original}.tif", original)
    np.testing.assert_array_equal(result.store.patches[kept["row"]], pixels_of(train_file(sample_copy, original)))
    dup = problems(result, "duplicate_pixels")
    assert [(p["id"], p["severity"]) for p in dup] == [(copy, "error")]
    assert f"same pixels as '{original}'" in str(dup[0]["detail"]) and "SHA-1 of the pixels" in str(dup[0]["detail"])


def test_duplicate_pixels_under_two_other_names_keep_the_first(sample_copy: Path, tmp_path: Path) -> None:
    original = nth_id(sample_copy, 0)
    label = labels_of(sample_copy)[original]
    train_file(sample_copy, original).rename(train_file(sample_copy, "b-copy"))
    shutil.copy(train_file(sample_copy, "b-copy"), train_file(sample_copy, "a-copy"))
    rewrite_csv(sample_copy, lambda lines: [line for line in lines if not line.startswith(original)])
    append_csv(sample_copy, f"a-copy,{label}\nb-copy,{label}")
    result = run(sample_copy, tmp_path, skip_bad=True)
    assert result.store is not None and "a-copy" in set(result.store.ids) and "b-copy" not in set(result.store.ids)
    (dup,) = problems(result, "duplicate_pixels")
    assert dup["id"] == "b-copy" and "'a-copy'" in str(dup["detail"]) and "first one read" in str(dup["detail"])


def test_interrupted_ingest_leaves_no_store(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = ingest_module.decode_patch

    def decode_then_interrupt(path: str) -> ingest_module.Decoded:
        calls["n"] += 1
        if calls["n"] > 100:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(ingest_module, "decode_patch", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(sample_dir, tmp_path)
    assert calls["n"] == 101
    assert list((tmp_path / "out").iterdir()) == []  # neither the store nor its hidden partial folder


def test_worker_failure_in_the_pool_leaves_no_store(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(path: str) -> ingest_module.Decoded:
        raise RuntimeError(f"disk gone while reading {path}")

    monkeypatch.setattr(ingest_module, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(ingest_module, "decode_patch", fail)  # inherited by the forked workers
    with pytest.raises(RuntimeError, match="disk gone"):
        run(sample_dir, tmp_path, workers=2)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_store_needs_overwrite(sample_dir: Path, tmp_path: Path) -> None:
    assert run(sample_dir, tmp_path).exit_code == 0
    again = run(sample_dir, tmp_path)
    assert again.exit_code == 2 and "already exists" in again.report["error"]
    assert run(sample_dir, tmp_path, overwrite=True).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["store"]


def test_nothing_to_ingest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run(tmp_path / "empty", tmp_path)
    assert result.exit_code == 2 and "no patches found" in result.report["error"]


# ------------------------------------------------------------------------------------------ done criterion
def break_five(root: Path) -> list[str]:
    """The issue's five faults: a truncated TIFF, a grayscale PNG renamed .tif, a 95x96 patch, an id listed
    twice with conflicting labels, and a missing file."""
    return [
        corrupt(root)
        for corrupt in (truncated_tiff, grayscale_png_named_tif, narrow_patch, conflicting_rows, missing_file)
    ]


@pytest.mark.parametrize(
    "source", ["sample_dir", pytest.param("shared_subset", marks=[pytest.mark.shared, pytest.mark.slow])]
)
def test_done_criterion(source: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    root = copy_source(request.getfixturevalue(source), tmp_path / "source")
    n_train = len(labels_of(root))
    bad = break_five(root)
    out, report = tmp_path / "store", tmp_path / "store.report.json"
    runner = CliRunner()

    refused = runner.invoke(app, ["ingest", str(root), "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["source", "store.report.json"]
    named = {p["id"] for p in json.loads(report.read_text())["problems"]}
    for id_ in bad:
        assert id_ in refused.stderr and id_ in named

    kept = runner.invoke(app, ["ingest", str(root), "--out", str(out), "--skip-bad"])
    assert kept.exit_code == 0, kept.output
    info = runner.invoke(app, ["info", str(out), "--json"])
    manifest = json.loads(info.stdout)
    assert manifest["splits"]["train"]["labeled"] == manifest["splits"]["train"]["count"] == n_train - 5
    assert manifest["problems"]["skipped"] == 5
    assert {item["id"] for item in Store(out).report["bad_items"]} == set(bad)


@pytest.mark.shared
@pytest.mark.slow
def test_shared_subset_ingests_cleanly(shared_subset: Path, tmp_path: Path) -> None:
    result = run(shared_subset, tmp_path)
    assert result.exit_code == 0 and result.store is not None
    splits = result.store.manifest["splits"]
    assert (splits["train"]["labeled"], splits["train"]["positive"], splits["test"]["unlabeled"]) == (
        5000,
        2000,
        43,
    )
    assert result.report["problems"] == [] and result.store.manifest["problems"]["kinds"] == {}
    index = result.store.index  # ids are the SHA-1 of PIL's decode, so this checks every decoded patch
    assert (index["sha1"] == index["id"]).all() and (
        index["source"] == index["split"] + "/" + index["id"] + ".tif"
    ).all()


# ------------------------------------------------------------------------------------------------ info
def test_describe_store_shows_counts_balance_and_problems(sample_copy: Path, tmp_path: Path) -> None:
    identical_rows(sample_copy)
    store = run(sample_copy, tmp_path).store
    assert store is not None
    console = Console(record=True, width=120)
    console.print(describe_store(store))
    text = console.export_text()
    positive = 100 * sum(labels_of(sample_copy).values()) / N_SAMPLE_TRAIN
    for expected in (
        "train",
        "test",
        f"{positive:.1f}%",
        "duplicate_id: 1 warning(s)",
        "96 x 96 x 3",
        "created",
    ):
        assert expected in text


def test_describe_store_fits_80_columns_whole(sample_store: Store, tmp_path: Path) -> None:
    deep = tmp_path / ("a-folder-with-a-long-name-" * 3) / "and-another-below-it"
    deep.mkdir(parents=True)
    (deep / "store").symlink_to(sample_store.path)
    console = Console(record=True, width=80)
    console.print(describe_store(Store(deep / "store")))
    text = console.export_text()
    assert "…" not in text and f"{len(sample_store):,} patches" in text
    assert str(deep / "store") in "".join(line.strip(" │") for line in text.splitlines())  # folded, whole


def test_info_command_prints_the_panel(sample_store: Store) -> None:
    result = CliRunner().invoke(app, ["info", str(sample_store.path)])
    assert result.exit_code == 0 and "240" in result.stderr and "problems" in result.stderr


def test_labels_flag_on_a_competition_folder_points_to_the_image_folder(sample_dir: Path, tmp_path: Path) -> None:
    refused = ingest(sample_dir, tmp_path / "s", labels=sample_dir / "train_labels.csv", progress=False)
    assert refused.exit_code == 2 and refused.store is None
    assert "train_labels.csv" in refused.report["error"] and not (tmp_path / "s").exists()
    stored = ingest(sample_dir / "train", tmp_path / "t", labels=sample_dir / "train_labels.csv", progress=False)
    assert stored.exit_code == 0 and len(stored.store) == 240


# ------------------------------------------------------------------------------------------ safe outputs
@pytest.mark.parametrize("what", ["unrelated-folder", "source-itself", "parent-of-source", "file", "store-plus-file"])
def test_overwrite_replaces_only_a_store(
    what: str, sample_dir: Path, sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = copy_source(sample_dir, tmp_path / "data" / "source")
    out = {
        "unrelated-folder": tmp_path / "thesis",
        "source-itself": source,
        "parent-of-source": tmp_path / "data",
        "file": tmp_path / "notes.txt",
        "store-plus-file": tmp_path / "store",
    }[what]
    if what == "unrelated-folder":
        out.mkdir()
        (out / "chapter1.tex").write_text("months of work\n")
    elif what == "file":
        out.write_text("keep me\n")
    elif what == "store-plus-file":
        shutil.copytree(sample_store.path, out)
        (out / "mine.txt").write_text("not ingest's\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(ingest_module, "decode_patch", pytest.fail)
    result = ingest(source, out, overwrite=True, progress=False)
    assert result.exit_code == 2 and result.store is None
    assert str(out) in result.report["error"] and "\n" not in result.report["error"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing deleted or added


@pytest.mark.parametrize("what", ["damaged-store", "empty-folder"])
def test_overwrite_still_replaces_a_store_or_an_empty_folder(
    what: str, sample_dir: Path, sample_store: Store, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    if what == "damaged-store":
        shutil.copytree(sample_store.path, out)
        (out / "patches.u8").write_bytes(b"")  # a damaged store of ours is still ours to replace
    else:
        out.mkdir()
    result = ingest(sample_dir, out, overwrite=True, progress=False)
    assert result.exit_code == 0 and result.store is not None and len(result.store) == len(sample_store)


@pytest.mark.parametrize("args", [["--out", "{file}", "--overwrite"], ["--out", "{out}", "--report", "{folder}"]])
def test_cli_refuses_an_output_path_in_one_line(
    args: list[str], sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "folder").mkdir()
    paths = {"file": tmp_path / "file", "folder": tmp_path / "folder", "out": tmp_path / "out"}
    monkeypatch.setattr(ingest_module, "decode_patch", pytest.fail)
    result = CliRunner().invoke(app, ["ingest", str(sample_dir), *[a.format(**paths) for a in args]])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), result.stderr
    assert (tmp_path / "file").read_text() == "x\n" and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ CSV
def test_quoted_field_holding_a_line_break_is_a_csv_problem_shown_alone(sample_copy: Path, tmp_path: Path) -> None:
    """An unclosed quote swallows the rows after it: one fatal problem, not 240 unlabeled_image lines."""
    rewrite_csv(sample_copy, lambda lines: [lines[0], '"' + lines[1], *lines[2:]])
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["ingest", str(sample_copy), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    report = json.loads((tmp_path / "store.report.json").read_text())
    assert [p["kind"] for p in report["problems"] if p["severity"] == "error"] == ["csv_multiline_field"]
    assert "unlabeled_image" not in result.stderr and "csv_multiline_field" in result.stderr
    assert "Traceback" not in result.output


def test_field_over_the_csv_limit_is_a_csv_problem(sample_copy: Path, tmp_path: Path) -> None:
    append_csv(sample_copy, "x" * 200_000 + ",1")
    result = run(sample_copy, tmp_path)
    assert result.exit_code == 2
    (fatal,) = [p for p in problems(result) if p["severity"] == "error"]
    assert fatal["kind"] == "csv_field_too_large" and f"line {N_SAMPLE_TRAIN + 2}" in str(fatal["detail"])


def test_ids_with_surrounding_spaces_are_read_without_them(sample_copy: Path, tmp_path: Path) -> None:
    id_ = nth_id(sample_copy, 0)
    rewrite_csv(
        sample_copy, lambda lines: [f" {line.replace(',', ' ,')}" if line.startswith(id_) else line for line in lines]
    )
    result = run(sample_copy, tmp_path)
    assert result.exit_code == 0 and result.store is not None and id_ in set(result.store.ids)
    assert [(p["kind"], p["id"]) for p in problems(result)] == [("csv_spaces", id_)]
    assert f"' {id_} '" in str(problems(result)[0]["detail"])


# ------------------------------------------------------------------------------------------ hostile images
def sixteen_bit_rgb(root: Path) -> str:
    """12-bit data in 16-bit RGB: PIL opens it as 'RGB' and keeps the top 8 bits (a nearly black patch)."""
    id_ = nth_id(root, 20)
    pixels = np.asarray(real_image(root, id_)).astype(np.uint16) * 16
    tifffile.imwrite(train_file(root, id_), pixels, photometric="rgb")
    return id_


def sixteen_bit_rgb_png(root: Path) -> str:
    id_ = nth_id(root, 21)
    pixels = np.asarray(real_image(root, id_)).astype(np.uint16) * 257
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", 96, 96, 16, 2, 0, 0, 0)
    chunks = b"".join(
        struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        for tag, data in ((b"IHDR", header), (b"IDAT", zlib.compress(raw)), (b"IEND", b""))
    )
    train_file(root, id_).write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return id_


def two_page_tiff(root: Path) -> str:
    """The first page is the real patch (what the raw fast path would read), the second another one."""
    id_ = nth_id(root, 22)
    pages = [np.asarray(real_image(root, id_)), np.asarray(real_image(root, nth_id(root, 23)))]
    with tifffile.TiffWriter(train_file(root, id_)) as tif:
        for page in pages:
            tif.write(page, photometric="rgb")
    return id_


def fifo_named_tif(root: Path) -> str:
    id_ = nth_id(root, 24)
    train_file(root, id_).unlink()
    os.mkfifo(train_file(root, id_))
    return id_


@pytest.mark.parametrize(
    ("corrupt", "kind", "detail"),
    [
        (sixteen_bit_rgb, "wrong_depth", "16 bits per channel in a TIFF"),
        (sixteen_bit_rgb_png, "wrong_depth", "16 bits per channel in a PNG"),
        (two_page_tiff, "multi_page", "2 pages"),
        pytest.param(
            fifo_named_tif,
            "not_a_file",
            "not a regular file",
            marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here"),
        ),
    ],
    ids=["16-bit-rgb-tiff", "16-bit-rgb-png", "two-page-tiff", "fifo"],
)
@pytest.mark.timeout(60)
def test_hostile_image_is_refused_with_its_own_kind(
    corrupt: Callable[[Path], str], kind: str, detail: str, sample_copy: Path, tmp_path: Path
) -> None:
    offender = corrupt(sample_copy)
    result = run(sample_copy, tmp_path, skip_bad=True)
    assert result.store is not None and offender not in set(result.store.ids)
    assert [(p["kind"], p["id"]) for p in problems(result)] == [(kind, offender)]
    assert detail in str(problems(result)[0]["detail"])


# ------------------------------------------------------------------------------------------ interruptions
HELD_INGEST = """
import signal, sys, threading
from histodetect.data import ingest as m
# a shell starts background jobs with SIGINT ignored, and Python keeps it so: restore Ctrl-C's KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
def held(path):  # the first patch: the ingest waits here, mid-way, for the test's signal
    threading.Event().wait()
m.decode_patch = held
m.POOL_MIN_FILES = 10**9
print("started", flush=True)
m.ingest(sys.argv[1], sys.argv[2], progress=False, workers=1)
"""


def start_held_ingest(source: Path, out: Path, scratch: Path) -> subprocess.Popen[str]:
    """An ingest in another process that stops at its first patch, returned once it has made its partial store and
    its window."""
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_INGEST, str(source), str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.glob(".*")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    assert list(scratch.iterdir())  # the window is there too
    return proc


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_ingest_removes_the_partial_store_and_the_window(
    sig: signal.Signals, sample_dir: Path, tmp_path: Path
) -> None:
    out, scratch = tmp_path / "out" / "store", tmp_path / "scratch"
    scratch.mkdir()
    proc = start_held_ingest(sample_dir, out, scratch)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) != 0
    assert list(out.parent.iterdir()) == [] and list(scratch.iterdir()) == []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_next_ingest_removes_what_a_killed_one_left_and_nothing_else(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL cannot be handled: the next ingest to the same --out removes the partial and the window of the
    dead process, but not a live process's partial (PID 1 is alive), nor another store's."""
    out, scratch = tmp_path / "store", tmp_path / "scratch"
    scratch.mkdir()
    proc = start_held_ingest(sample_dir, out, scratch)
    proc.kill()
    proc.wait(timeout=30)
    killed = [p.name for p in tmp_path.glob(".store.partial-*")]
    assert killed == [f".store.partial-{proc.pid}"] and len(list(scratch.iterdir())) == 1
    others = [".store.partial-1", f".other.partial-{proc.pid}"]
    for name in others:
        (tmp_path / name).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert ingest(sample_dir, out, progress=False).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["scratch", "store", *others])
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------------------------------ the terminal
def test_ids_are_shown_escaped_and_quoted(sample_copy: Path, tmp_path: Path) -> None:
    shutil.copy(train_file(sample_copy, nth_id(sample_copy, 0)), sample_copy / "train" / " padded .tif")
    append_csv(sample_copy, '"\x1b[2J\x1b[31mred",1')
    result = CliRunner().invoke(app, ["ingest", str(sample_copy), "--out", str(tmp_path / "store")])
    assert result.exit_code == 2
    assert "\x1b" not in result.stderr
    assert r"'\x1b[2J\x1b[31mred'" in result.stderr and "' padded '" in result.stderr
