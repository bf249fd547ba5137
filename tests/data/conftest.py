"""Shared by the data tests: PCam HDF5 files written from the sample's real patches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from histodetect.data.store import Store


def write_pcam(folder: Path, split: str, pixels: np.ndarray, labels: np.ndarray | None) -> Path:
    """Exactly the PCam layout: uint8 (N, 96, 96, 3) under 'x', uint8 (N, 1, 1, 1) under 'y'."""
    folder.mkdir(parents=True, exist_ok=True)
    x = folder / f"camelyonpatch_level_2_split_{split}_x.h5"
    with h5py.File(x, "w") as fh:
        fh.create_dataset("x", data=pixels.astype(np.uint8), chunks=(32, 96, 96, 3), compression="gzip")
    if labels is not None:
        with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as fh:
            fh.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1))
    return x


@pytest.fixture
def sample_arrays(sample_store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample's training patches (already checked to equal PIL's decode), their labels and ids."""
    rows = sample_store.rows("train")
    return sample_store.read(rows), sample_store.labels[rows], sample_store.ids[rows]
