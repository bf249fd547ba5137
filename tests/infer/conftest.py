"""Tiny real runs for the inference tests, trained once per session on ``sample_store`` (the
embedded sample).

The runs see 16 patches for one epoch: their predictions are meaningless as medicine but real as computation
(trained BatchNorm statistics, a real pretrained backbone for tf_efficientnet_lite0), which is what predict,
evaluate, export and explain are tested on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.infer.export import export_onnx
from histodetect.runs.config import TrainConfig
from histodetect.train.run import train

QUICK = dict(epochs=1, batch_size=8, limit_train=16, val_fraction=0.2, patience=0, num_workers=0)
PRETRAINED = {"tf_efficientnet_lite0": "auto"}  # the one family with offline weights; the rest start random

MakeRun = Callable[[str], Path]
Export = Callable[[str], dict[str, Any]]


@pytest.fixture(scope="session")
def test_images(sample_dir: Path) -> Path:
    """The embedded sample's 16 competition test patches (TIFF files)."""
    return sample_dir / "test"


@pytest.fixture(scope="session")
def sample_submission(sample_dir: Path) -> Path:
    """The competition's sample submission for those 16 patches, in its own (unsorted) order."""
    return sample_dir / "sample_submission.csv"


@pytest.fixture(scope="session")
def make_run(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> MakeRun:
    """A run folder of ``model`` trained for one epoch on 16 patches, built on first use and then reused."""
    root = tmp_path_factory.mktemp("runs")
    runs: dict[str, Path] = {}

    def make(model: str) -> Path:
        if model not in runs:
            config = TrainConfig(model=model, pretrained=PRETRAINED.get(model, "none"), **QUICK)
            train(sample_store, root / model, config)
            runs[model] = root / model
        return runs[model]

    return make


@pytest.fixture(scope="session")
def baseline_run(make_run: MakeRun) -> Path:
    return make_run("baseline-cnn")


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, make_run: MakeRun) -> Export:
    """``export_onnx``'s result for the run of ``model`` (default check patches), built on first use."""
    root = tmp_path_factory.mktemp("onnx")
    results: dict[str, dict[str, Any]] = {}

    def export(model: str) -> dict[str, Any]:
        if model not in results:
            results[model] = export_onnx(make_run(model), root / f"{model}.onnx")
        return results[model]

    return export


@pytest.fixture(scope="session")
def ranker(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> Predictor:
    """A run that tells the mosaic's patches apart (ImageNet Lite0, head trained on the sample: ROC AUC ~0.9 on
    them), for comparing rankings: a near-random run would reorder its patches on any change of a pixel."""
    config = TrainConfig(
        model="tf_efficientnet_lite0", freeze="frozen", lr=3e-3, epochs=2, batch_size=32, val_fraction=0.1,
        patience=0, num_workers=0,
    )  # fmt: skip
    run = tmp_path_factory.mktemp("ranker") / "run"
    train(sample_store, run, config)
    return Predictor([run], precision="fp32", progress=False)
