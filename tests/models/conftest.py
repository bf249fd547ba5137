"""Real patches from the embedded sample, as the float batches every model receives."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def load_patches(sample: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` labelled sample patches: float ``(n, 3, 96, 96)`` in ``[0, 1]`` and their labels."""
    with (sample / "train_labels.csv").open() as f:
        rows = list(csv.DictReader(f))[:n]
    images = [np.asarray(Image.open(sample / "train" / f"{row['id']}.tif").convert("RGB")) for row in rows]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor([float(row["label"]) for row in rows])


@pytest.fixture(scope="session")
def patches(sample_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_patches(sample_dir, 16)
