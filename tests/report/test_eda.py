"""The EDA report on real patches, and on the awkward stores it must still describe."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from histodetect.data.store import Store
from histodetect.report import eda
from histodetect.report.eda import duplicate_groups, group_stats, problems_frame, write_eda

MakeStore = Callable[..., Store]  # the make_report_store fixture (tests/report/conftest.py)
FIGURES = ("splits", "examples", "colour_histograms", "mean_images", "brightness")


def _html(page: Path) -> str:
    return page.read_text(encoding="utf-8")


@pytest.mark.slow
def test_full_report_on_the_sample(report_store: Store, tmp_path: Path) -> None:
    page = write_eda(report_store, tmp_path / "eda", seed=0)
    assert page == tmp_path / "eda" / "index.html"
    html = _html(page)
    for name in FIGURES:
        png = (tmp_path / "eda" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in html  # embedded: the page survives being moved alone
    assert not re.search(r'src="(?!data:)', html)
    for title in ("Splits and label balance", "What the patches look like", "Colour by class", "Integrity"):
        assert title in html
    assert "256" in html and "40.0%" in html  # 240 train (96 positive) + 16 test patches
    assert "Ingest reported no problems." in html
    assert not list((tmp_path / "eda").glob("*.partial"))


def test_examples_are_seeded_and_class_pure(report_store: Store) -> None:
    def picks(seed: int) -> list[np.ndarray]:
        return eda.example_rows(report_store, [0, 1, -1], np.random.default_rng(seed))

    first = picks(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, picks(3), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, picks(4), strict=True))
    for label, rows in zip([0, 1, -1], first, strict=True):
        assert len(rows) == eda.GRID_PER_CLASS
        assert np.all(report_store.labels[rows] == label)


def test_pixels_are_read_in_sorted_chunks_of_a_bounded_sample(
    report_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eda, "SAMPLE_SIZE", 60)
    monkeypatch.setattr(eda, "CHUNK", 16)
    reads: list[np.ndarray] = []
    original = Store.read
    monkeypatch.setattr(Store, "read", lambda self, rows: reads.append(np.asarray(rows)) or original(self, rows))
    groups = [0, 1, -1]
    samples = eda.sample_rows(report_store, groups, np.random.default_rng(0))
    stats = [group_stats(report_store, g, rows) for g, rows in samples.items()]
    assert sum(s.n for s in stats) <= 60
    assert all(len(r) <= 16 and np.all(np.diff(r) > 0) for r in reads)
    for s, rows in zip(stats, samples.values(), strict=True):
        assert np.all(report_store.labels[rows] == s.label)
        pixels = report_store.read(rows)
        np.testing.assert_allclose(s.mean_image, pixels.mean(axis=0))
        assert s.channel_hist.sum() == pixels.size
        np.testing.assert_allclose(s.brightness, pixels.mean(axis=(1, 2, 3)), rtol=1e-6)


def test_only_unlabeled_patches(make_report_store: MakeStore, tmp_path: Path) -> None:
    store = make_report_store(keep=lambda item: item.label is None)
    html = _html(write_eda(store, tmp_path / "eda"))
    assert "unlabeled" in html and "—" in html  # no positive share without labels
    assert (tmp_path / "eda" / "mean_images.png").exists()


def test_one_class(make_report_store: MakeStore, tmp_path: Path) -> None:
    store = make_report_store(keep=lambda item: item.label == 1)
    html = _html(write_eda(store, tmp_path / "eda"))
    assert "100.0%" in html
    assert (tmp_path / "eda" / "examples.png").exists()


def test_empty_split_and_empty_store(make_report_store: MakeStore, tmp_path: Path) -> None:
    declared = {"train": {"count": 3}, "val": {"count": 0}}
    store = make_report_store("three", keep=lambda item: item.id[:2] in {"04", "08"}, extra={"splits": declared})
    split_rows = eda.split_table(store)
    assert split_rows.set_index("split").loc["val", "patches"] == 0
    write_eda(store, tmp_path / "small")

    empty = make_report_store("empty", keep=lambda item: False)
    html = _html(write_eda(empty, tmp_path / "empty"))
    assert "This store holds no patches." in html
    assert not (tmp_path / "empty" / "examples.png").exists()


def test_integrity_section_lists_problems_and_duplicates(make_report_store: MakeStore, tmp_path: Path) -> None:
    report = {
        "source": "somewhere",
        "problems": [
            {
                "kind": "unreadable",
                "severity": "error",
                "file": "train/x.tif",
                "detail": "<script>alert(1)</script>",
            },
            {"kind": "duplicate_pixels", "severity": "warning", "id": "abc", "detail": "same pixels as def"},
            {"kind": "unreadable"},  # keys missing: still a row
            "not a problem record",
        ],
    }

    def first_train(item: Any) -> bool:
        return item.split == "train" and item.id[0] in "04"

    store = make_report_store(keep=first_train, report=report, copies=2)
    html = _html(write_eda(store, tmp_path / "eda"))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "duplicate_pixels" in html and "somewhere" in html
    assert "groups of patches with identical pixels" in html


def test_problems_frame_tolerates_any_report() -> None:
    assert len(problems_frame({})) == 0
    assert len(problems_frame({"problems": "oops"})) == 0
    frame = problems_frame({"problems": [{"kind": "k", "extra": 1}]})
    assert frame.iloc[0].to_dict() == {
        "kind": "k",
        "severity": "",
        "split": "",
        "id": "",
        "file": "",
        "detail": "",
    }


def test_duplicate_groups_flag_disagreeing_labels(report_store: Store) -> None:
    index = report_store.index.head(4).copy()
    index["sha1"] = ["a", "a", "b", ""]
    index["label"] = [0, 1, 0, 0]
    groups = duplicate_groups(index)
    assert groups["copies"].tolist() == [2]
    assert groups["labels disagree"].tolist() == ["yes"]
