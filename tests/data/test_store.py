"""The store format: what StoreWriter commits is what Store reads back; nothing half-written is ever seen."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.store import (
    INDEX,
    INDEX_COLUMNS_V1,
    MANIFEST,
    NO_COORD,
    PATCHES,
    UNLABELED,
    Place,
    Store,
    StoreError,
    StoreWriter,
)


def copy_rows(store: Store, rows: np.ndarray, path: Path, **commit: object) -> Store:
    """A new store holding ``rows`` of ``store`` (real patches), written patch by patch."""
    with StoreWriter(path, capacity=len(rows) + 3) as writer:  # spare capacity must be truncated away
        for row in rows:
            entry = store.index.iloc[row]
            label = None if entry["label"] == UNLABELED else int(entry["label"])
            writer.add(store.patches[row], entry["id"], label, entry["split"], entry["source"], entry["sha1"])
        return writer.commit(source="test", **commit)  # type: ignore[arg-type]


def test_commit_round_trips_pixels_index_and_counts(sample_store: Store, tmp_path: Path) -> None:
    rows = np.concatenate([sample_store.rows("train")[:10], sample_store.rows("test")[:3]])
    store = copy_rows(sample_store, rows, tmp_path / "s", extra={"note": 1}, report={"problems": []})
    assert len(store) == 13 and (tmp_path / "s" / PATCHES).stat().st_size == 13 * 96 * 96 * 3
    np.testing.assert_array_equal(store.patches, sample_store.read(rows))
    assert store.ids.tolist() == sample_store.ids[rows].tolist()
    assert store.labels.tolist() == sample_store.labels[rows].tolist()
    assert store.manifest["splits"]["test"] == {
        "count": 3,
        "labeled": 0,
        "unlabeled": 3,
        "positive": 0,
        "negative": 0,
    }
    assert store.manifest["note"] == 1 and store.report == {"problems": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the hidden build folder is gone


def test_places_round_trip_and_unknown_ones_are_empty(sample_store: Store, tmp_path: Path) -> None:
    places = [Place("slide a", 0, 960), None, Place("slide b")]
    with StoreWriter(tmp_path / "s", capacity=3) as writer:
        for row, place in enumerate(places):
            writer.add(sample_store.patches[row], f"p{row}", 1, "train", "x", "", place)
        store = writer.commit(source="test")
    assert store.manifest["version"] == 2
    assert store.groups.tolist() == ["slide a", "", "slide b"]
    assert store.index["coord_x"].tolist() == [0, NO_COORD, NO_COORD]
    assert store.index["coord_y"].tolist() == [960, NO_COORD, NO_COORD]
    assert _index(store.path)[["group", "coord_x", "coord_y"]].values.tolist() == [
        ["slide a", "0", "960"],
        ["", "", ""],
        ["slide b", "", ""],
    ]


def test_a_version_1_store_still_opens_without_groups(sample_store: Store, tmp_path: Path) -> None:
    """A store as histodetect wrote it before slide groups: version 1, six index columns."""
    path = copy_rows(sample_store, np.arange(5), tmp_path / "s").path
    _index(path)[INDEX_COLUMNS_V1].to_csv(path / INDEX, index=False)
    _edit_manifest(path, version=1)
    store = Store(path)
    assert store.ids.tolist() == sample_store.ids[:5].tolist()
    assert store.groups.tolist() == [""] * 5 and (store.index["coord_x"] == NO_COORD).all()
    (path / INDEX).write_text((path / INDEX).read_text().replace("sha1\n", "sha1,group,coord_x,coord_y\n", 1))
    with pytest.raises(StoreError, match=r"columns .* expected \['row', 'id', 'label', 'split', 'source', 'sha1'\]"):
        Store(path)


def test_rows_and_read_select_by_split_and_label(sample_store: Store) -> None:
    assert len(sample_store.rows("train", labeled=True)) == 240
    assert len(sample_store.rows(labeled=False)) == len(sample_store.rows("test")) == 16
    assert len(sample_store.rows(["train", "test"])) == len(sample_store)
    rows = np.array([200, 3, 17, 3])
    np.testing.assert_array_equal(sample_store.read(rows), np.asarray(sample_store.patches)[rows])
    with pytest.raises(StoreError, match="no split named"):
        sample_store.rows("valid")


def test_store_pickles_as_its_path(sample_store: Store) -> None:
    assert len(pickle.dumps(sample_store)) < 1000
    clone = pickle.loads(pickle.dumps(sample_store))
    assert clone.path == sample_store.path
    np.testing.assert_array_equal(clone.read([0, 5]), sample_store.read([0, 5]))


def test_fingerprint_hashes_manifest_and_index_once(sample_store: Store, tmp_path: Path) -> None:
    expected = hashlib.sha256()
    for name in (MANIFEST, INDEX):
        expected.update((sample_store.path / name).read_bytes() + b"\0")
    store = Store(sample_store.path)
    assert store.fingerprint == "sha256:" + expected.hexdigest()
    assert "fingerprint" in vars(store)  # cached: training and evaluation ask for it several times
    other = copy_rows(sample_store, np.arange(4), tmp_path / "other")
    assert other.fingerprint != store.fingerprint


def test_exception_inside_the_writer_leaves_nothing(sample_store: Store, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", capacity=4) as writer:
        writer.add(sample_store.patches[0], "a", 0, "train", "x", "y")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_bad_patches_overflow_and_existing_stores(sample_store: Store, tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", capacity=1) as writer:
        with pytest.raises(StoreError, match="expected"):
            writer.add(sample_store.patches[0][:95], "a", 0, "train", "x", "y")
        writer.add(sample_store.patches[0], "a", 0, "train", "x", "y")
        with pytest.raises(StoreError, match="sized for"):
            writer.add(sample_store.patches[1], "b", 0, "train", "x", "y")
        writer.commit(source="test")
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(tmp_path / "s", capacity=1)


def test_overwrite_replaces_the_old_store_atomically(sample_store: Store, tmp_path: Path) -> None:
    copy_rows(sample_store, np.arange(5), tmp_path / "s")
    with StoreWriter(tmp_path / "s", capacity=2, overwrite=True) as writer:
        assert len(Store(tmp_path / "s")) == 5  # the old store stays readable until commit
        writer.add(sample_store.patches[7], "z", 1, "train", "x", "y")
        store = writer.commit(source="test")
    assert store.ids.tolist() == ["z"] and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_empty_store_commits_and_opens(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", capacity=0) as writer:
        store = writer.commit(source="test")
    assert len(store) == 0 and store.patches.shape == (0, 96, 96, 3) and store.manifest["splits"] == {}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / MANIFEST).unlink(), "not a histodetect store"),
        (lambda p: (p / MANIFEST).write_text("{"), "unreadable manifest"),
        (lambda p: _edit_manifest(p, format="other"), "not a histodetect store manifest"),
        (lambda p: _edit_manifest(p, version=99), "version 99 is not supported"),
        (lambda p: _truncate(p / PATCHES), "holds"),
        (lambda p: _truncate(p / INDEX), "holds"),
        (lambda p: _edit_index(p, 1, "label", "2"), r"index.csv: line 3: label '2' is not 0, 1 or empty"),
        (lambda p: _edit_index(p, 0, "id", "../../evil"), r"index.csv: line 2: id '../../evil': path separator"),
        (lambda p: _edit_index(p, 2, "id", "..x"), r"index.csv: line 4: id '..x': '..' in id"),
        (lambda p: _edit_index(p, 3, "id", "\x1b[31m"), r"index.csv: line 5: id '\\x1b\[31m': control character"),
        (lambda p: _edit_index(p, 1, "id", _index(p)["id"][0]), r"index.csv: line 3: id .* is listed twice"),
        (lambda p: _edit_index(p, 1, "row", "7"), r"index.csv: line 3: row '7', expected 1"),
        (lambda p: _edit_index(p, 1, "split", ""), r"index.csv: line 3: split '' is not a valid split name"),
        (lambda p: _edit_index(p, 2, "group", "a\x1b"), r"index.csv: line 4: group 'a\\x1b': control character"),
        (lambda p: _edit_index(p, 0, "coord_x", "-3"), r"index.csv: line 2: coord_x, coord_y '-3', '' are not both"),
        (lambda p: _edit_index(p, 1, "coord_y", "7"), r"index.csv: line 3: coord_x, coord_y '', '7' are not both"),
        (lambda p: (p / INDEX).write_text("row,id\n0,a\n"), r"index.csv: columns \['row', 'id'\]"),
        (lambda p: (p / INDEX).unlink(), r"index.csv: missing"),
        (lambda p: _edit_manifest(p, patch_shape=None), r"manifest.json: damaged manifest"),
    ],
    ids=[
        "no-manifest",
        "bad-json",
        "wrong-format",
        "future-version",
        "short-patches",
        "short-index",
        "bad-label",
        "id-with-separator",
        "id-with-dots",
        "id-with-escape",
        "repeated-id",
        "wrong-row",
        "empty-split",
        "group-with-escape",
        "negative-coord",
        "half-a-position",
        "wrong-columns",
        "no-index",
        "no-patch-shape",
    ],
)
def test_damaged_stores_are_refused_with_a_reason(
    sample_store: Store, tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    path = copy_rows(sample_store, np.arange(4), tmp_path / "s").path
    damage(path)
    with pytest.raises(StoreError, match=message):
        Store(path)


def _edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, **changes}))


def _index(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / INDEX, dtype=str, keep_default_na=False)


def _edit_index(path: Path, row: int, column: str, value: str) -> None:
    index = _index(path)
    index.loc[row, column] = value
    index.to_csv(path / INDEX, index=False)


def test_info_on_a_damaged_store_is_one_line(sample_store: Store, tmp_path: Path) -> None:
    path = copy_rows(sample_store, np.arange(4), tmp_path / "s").path
    _edit_index(path, 2, "label", "maybe")
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"{path / INDEX}: line 4: label 'maybe'" in result.stderr


def test_commit_syncs_the_files_before_the_rename_and_the_folder_after(
    sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    copy_rows(sample_store, np.arange(3), tmp_path / "s")
    rename = events.index(f"replace .s.partial-{os.getpid()} -> s")
    before, after = events[:rename], events[rename + 1 :]
    for name in (PATCHES, INDEX):
        assert f"fsync {name}" in before
    assert [e for e in before if e.startswith("replace")][-1].endswith(f"-> {MANIFEST}")  # written last
    assert before[-1] == f"fsync .s.partial-{os.getpid()}"
    assert after == [f"fsync {tmp_path.name}"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(
        data[: len(data) - len(data) // 4] if path.suffix == ".u8" else b"".join(data.splitlines(True)[:-1])
    )
