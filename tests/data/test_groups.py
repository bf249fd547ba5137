"""Slide groups from the data's own metadata: PCam's meta CSVs, ``--pcam-meta`` for the competition layout,
``--groups FILE``; never a label from any of them, and never a test patch's slide."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data import ingest as ingest_module
from histodetect.data.ingest import IngestResult, ingest
from histodetect.data.store import NO_COORD, Store

from .conftest import write_pcam

SLIDES = 3
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def slide_of(position: int) -> str:
    """Three fake slides, named as PCam names its whole-slide images, each with patches of both classes."""
    return f"camelyon16_train_slide_{position % SLIDES:03d}"


def write_meta(x: Path, labels: np.ndarray, rows: int | None = None) -> Path:
    """PCam's meta CSV for the HDF5 file ``x``, row for row (``rows`` to break that), pandas' unnamed index column
    first. ``tumor_patch`` says the opposite of each label, so a label taken from it would show."""
    path = x.with_name(x.name.replace("_x.h5", "_meta.csv"))
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
        for i in range(len(labels) if rows is None else rows):
            tumor = "False" if labels[i] else "True"
            out.writerow([i, 96 * (i // 10), 96 * (i % 10), tumor, tumor, slide_of(i)])
    return path


def run(source: Path, tmp_path: Path, **options: object) -> IngestResult:
    return ingest(source, tmp_path / "out" / "store", progress=False, **options)  # type: ignore[arg-type]


def kinds(result: IngestResult) -> list[str]:
    return [p["kind"] for p in result.report["problems"]]


def test_pcam_meta_csv_gives_each_patch_its_slide_and_position_and_never_its_label(
    sample_arrays: Arrays, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "H5_CHUNK", 50)
    pixels, labels, _ = sample_arrays
    write_meta(write_pcam(tmp_path / "pcam", "train", pixels[:200], labels[:200]), labels[:200])
    write_meta(write_pcam(tmp_path / "pcam", "valid", pixels[200:], labels[200:]), labels[200:])
    store = run(tmp_path / "pcam", tmp_path).store
    assert store is not None and store.manifest["version"] == 2
    np.testing.assert_array_equal(store.labels, labels)  # from the HDF5 y files, not tumor_patch
    positions = np.r_[np.arange(200), np.arange(40)]  # row of each patch in its own split's files
    assert store.groups.tolist() == [slide_of(i) for i in positions]
    assert store.index["coord_x"].tolist() == (96 * (positions % 10)).tolist()
    assert store.index["coord_y"].tolist() == (96 * (positions // 10)).tolist()
    info = CliRunner().invoke(app, ["info", str(store.path)])
    assert "3 over 240 patches" in info.output


def test_an_unlabeled_pcam_split_keeps_no_slide(sample_arrays: Arrays, tmp_path: Path) -> None:
    pixels, labels, _ = sample_arrays
    write_meta(write_pcam(tmp_path / "pcam", "train", pixels[:150], labels[:150]), labels[:150])
    write_pcam(tmp_path / "pcam", "valid", pixels[150:200], labels[150:200])  # labeled, but without its meta CSV
    write_meta(write_pcam(tmp_path / "pcam", "test", pixels[200:], None), labels[200:])
    result = run(tmp_path / "pcam", tmp_path)
    store = result.store
    assert store is not None and (store.groups[store.rows(["valid", "test"])] == "").all()
    assert (store.groups[store.rows("train")] != "").all()
    assert sorted(kinds(result)) == ["group_not_recorded", "missing_labels", "no_group"]


def test_pcam_meta_csv_out_of_step_with_its_hdf5_is_refused(sample_arrays: Arrays, tmp_path: Path) -> None:
    pixels, labels, _ = sample_arrays
    write_meta(write_pcam(tmp_path / "pcam", "train", pixels[:100], labels[:100]), labels, rows=99)
    result = run(tmp_path / "pcam", tmp_path)
    assert result.exit_code == 2 and "bad_meta" in kinds(result)
    assert "99 rows for 100 patches" in json.dumps(result.report)


def competition_with_pcam(sample_dir: Path, tmp_path: Path, sample_store: Store) -> tuple[Path, Path, np.ndarray]:
    """A competition folder, and PCam files holding its training patches in another order plus two of its test
    patches (as the real ones do): what ``--pcam-meta`` matches by the SHA-1 of the pixels."""
    source = shutil.copytree(sample_dir, tmp_path / "hcd")
    train, test = sample_store.rows("train"), sample_store.rows("test")[:2]
    order = np.random.default_rng(0).permutation(np.r_[train, test])
    pixels, labels = sample_store.read(order), sample_store.labels[order].clip(0)
    write_meta(write_pcam(tmp_path / "pcam", "train", pixels, labels), labels)
    return source, tmp_path / "pcam", sample_store.ids[order]


def test_pcam_meta_recovers_the_slides_of_the_competition_layout_by_sha1(
    sample_dir: Path, sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "H5_CHUNK", 7)  # chunk edges fall inside the file
    reads: list[int] = []
    getitem = h5py.Dataset.__getitem__

    def counting(self: h5py.Dataset, key: object) -> object:
        out = getitem(self, key)
        reads.append(len(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    source, pcam, order_ids = competition_with_pcam(sample_dir, tmp_path, sample_store)
    out = tmp_path / "out" / "store"
    result = CliRunner().invoke(app, ["ingest", str(source), "--out", str(out), "--pcam-meta", str(pcam)])
    assert result.exit_code == 0, result.output
    assert max(reads) <= 7  # streamed, never loaded whole
    store = Store(out)
    slide = {id_: slide_of(i) for i, id_ in enumerate(order_ids)}
    train = store.rows("train")
    assert [slide[id_] for id_ in store.ids[train]] == store.groups[train].tolist()
    assert (store.groups[store.rows("test")] == "").all()  # the test patches found in PCam: not used
    assert (store.index["coord_x"].to_numpy()[store.rows("test")] == NO_COORD).all()
    assert "mapping the competition's test set back to PCam would leak its labels" in result.stderr
    assert "2 unlabeled (test) patch(es)" in result.stderr
    assert [p["kind"] for p in store.report["problems"]] == ["pcam_test_leak"]


def test_pcam_meta_is_refused_for_a_pcam_source_and_with_groups(sample_arrays: Arrays, tmp_path: Path) -> None:
    pixels, labels, _ = sample_arrays
    write_meta(write_pcam(tmp_path / "pcam", "train", pixels[:64], labels[:64]), labels[:64])
    assert "beside its HDF5 files" in run(tmp_path / "pcam", tmp_path, pcam_meta=tmp_path / "pcam").report["error"]
    both = run(tmp_path / "pcam", tmp_path, pcam_meta=tmp_path / "pcam", groups=tmp_path / "g.csv")
    assert "give one of them" in both.report["error"]


def write_groups(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([("id", "group"), *rows])
    return path


def test_groups_file_records_any_grouping(sample_dir: Path, sample_store: Store, tmp_path: Path) -> None:
    train_ids = sample_store.ids[sample_store.rows("train")]
    test_id = sample_store.ids[sample_store.rows("test")[0]]
    rows = [(id_, f"patient {i % 4}") for i, id_ in enumerate(train_ids[1:])]
    groups = write_groups(tmp_path / "groups.csv", [*rows, ("not-a-patch", "patient 9"), (test_id, "patient 0")])
    result = run(sample_dir, tmp_path, groups=groups)
    store = result.store
    assert store is not None
    assert dict(zip(store.ids, store.groups, strict=True)) == {
        **{id_: "" for id_ in store.ids},
        **dict(rows),
    }
    assert sorted(kinds(result)) == ["group_not_recorded", "group_unknown_id", "no_group"]
    no_group = next(p for p in result.report["problems"] if p["kind"] == "no_group")
    assert f"1 labeled patch(es) have no group, e.g. {train_ids[0]!r}" in no_group["detail"]


def test_groups_file_problems_are_reported_as_for_the_labels(
    sample_dir: Path, sample_store: Store, tmp_path: Path
) -> None:
    ids = sample_store.ids[sample_store.rows("train")]
    rows = [(ids[0], "a"), (ids[0], "b"), (ids[1], "\x1b[31m"), (ids[2], " ")] + [(id_, "a") for id_ in ids[3:]]
    result = run(sample_dir, tmp_path, groups=write_groups(tmp_path / "groups.csv", rows))
    assert result.exit_code == 2
    bad = [(p["id"], p["split"], p["detail"]) for p in result.report["problems"] if p["kind"] == "bad_group"]
    assert [(id_, split) for id_, split, _ in bad] == [(ids[0], "train"), (ids[1], "train"), (ids[2], "train")]
    assert "several groups ('a', 'b')" in bad[0][2]
    assert "control character" in bad[1][2] and "empty group" in bad[2][2]
    skipped = run(sample_dir, tmp_path, groups=tmp_path / "groups.csv", skip_bad=True).store
    assert skipped is not None and not set(ids[:3]) & set(skipped.ids)
    (tmp_path / "wrong.csv").write_text("id,slide\nx,y\n")
    wrong = run(sample_dir, tmp_path, groups=tmp_path / "wrong.csv", skip_bad=True, overwrite=True)
    assert wrong.exit_code == 2 and kinds(wrong) == ["csv_missing_column"]
