"""Stores built from the real patches embedded in the package, for the report tests.

Named ``report_store``/``make_report_store`` so they do not clash with the project-wide ``sample_store``
fixture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histodetect.data.store import Store, StoreWriter
from histodetect.sample import sample_dir

SAMPLE = sample_dir()


@dataclass(frozen=True)
class Item:
    id: str
    pixels: np.ndarray
    label: int | None
    split: str
    source: str
    sha1: str


def _read(path: Path, label: int | None, split: str) -> Item:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return Item(path.stem, pixels, label, split, str(path), hashlib.sha1(pixels.tobytes()).hexdigest())


@pytest.fixture(scope="session")
def sample_items() -> list[Item]:
    """Every embedded patch: train/ with its labels, test/ unlabeled."""
    labels = pd.read_csv(SAMPLE / "train_labels.csv", dtype={"id": str}).set_index("id")["label"]
    train = [_read(f, int(labels[f.stem]), "train") for f in sorted((SAMPLE / "train").glob("*.tif"))]
    test = [_read(f, None, "test") for f in sorted((SAMPLE / "test").glob("*.tif"))]
    return train + test


@pytest.fixture
def make_report_store(tmp_path: Path, sample_items: list[Item]) -> Callable[..., Store]:
    """Build a store from the sample items that ``keep`` accepts (all by default) with an optional report."""

    def make(
        name: str = "store",
        keep: Callable[[Item], bool] = lambda item: True,
        report: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        copies: int = 1,
    ) -> Store:
        kept = [item for item in sample_items if keep(item)]
        # Copies hold the same pixels under their own ids: a store never repeats an id (it refuses to open).
        items = [replace(item, id=f"{item.id}-copy{n}" if n else item.id) for n in range(copies) for item in kept]
        return _write(tmp_path / name, items, report=report, extra=extra)

    return make


@pytest.fixture(scope="session")
def report_store(tmp_path_factory: pytest.TempPathFactory, sample_items: list[Item]) -> Store:
    """The whole embedded sample as one store, built once per session."""
    return _write(tmp_path_factory.mktemp("report") / "sample", sample_items)


def _write(path: Path, items: list[Item], **commit: Any) -> Store:
    with StoreWriter(path, capacity=len(items)) as writer:
        for item in items:
            writer.add(item.pixels, item.id, item.label, item.split, item.source, item.sha1)
        return writer.commit(source=str(SAMPLE), **commit)
