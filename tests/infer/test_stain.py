"""Stain normalisation through the one scorer: a run trained with --stain-norm records its reference, and the
Predictor (predict, evaluate, slide, serve, explain), evaluate --stain-shifts and export all honour it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.augment import STAIN_SHIFTS
from histodetect.data.stain import STAIN_FILE, StainFit, StainNormalizer
from histodetect.data.store import Store
from histodetect.data.wsi import ArrayReader
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor
from histodetect.infer.export import export_onnx
from histodetect.infer.slide import score_slide
from histodetect.runs.config import TrainConfig
from histodetect.runs.layout import run_stain
from histodetect.train.run import train

from .conftest import QUICK, Export

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)


@pytest.fixture(scope="module")
def stain_run(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> Path:
    """baseline-cnn trained for one epoch on 16 patches, Macenko-normalised, with the stronger stain augmentation."""
    run = tmp_path_factory.mktemp("stain") / "run"
    train(sample_store, run, TrainConfig(model="baseline-cnn", stain_norm="macenko", stain_aug=0.5, **QUICK))
    return run


def patches(store: Store, n: int = 24) -> np.ndarray:
    return store.read(store.rows(labeled=True)[:n])


def test_the_run_records_its_normaliser_and_reference(stain_run: Path) -> None:
    config = TrainConfig.load(stain_run / "config.yaml")
    assert (config.stain_norm, config.stain_aug, config.stain_reference) == ("macenko", 0.5, None)
    assert TrainConfig.from_dict(config.to_dict()) == config
    summary = json.loads((stain_run / "summary.json").read_text())
    assert (summary["stain_norm"], summary["stain_reference"]) == ("macenko", STAIN_FILE)
    recorded = json.loads((stain_run / STAIN_FILE).read_text())
    assert "training patches" in recorded["source"] and run_stain(stain_run) is not None


def test_the_predictor_normalises_every_batch_as_training_did(stain_run: Path, sample_store: Store) -> None:
    pixels = patches(sample_store)
    glass = np.full((1, 96, 96, 3), 245, dtype=np.uint8)
    batch = np.concatenate([pixels, glass])
    predictor = Predictor([stain_run], precision="fp32", progress=False)
    assert predictor.stain is not None and predictor.stain.method == "macenko"
    normalised = StainNormalizer("macenko", run_stain(stain_run))(torch.from_numpy(batch)).numpy()
    assert np.array_equal(predictor.normalise(batch), normalised)
    plain = Predictor([stain_run], precision="fp32", progress=False, stain_norm="none")
    assert plain.stain is None
    np.testing.assert_allclose(predictor.predict_batch(batch), plain.predict_batch(normalised), atol=1e-6)
    assert predictor.stain.fallbacks >= 1  # the glass patch went through as it was


def test_a_run_without_a_reference_needs_one(baseline_run: Path, sample_store: Store, tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(baseline_run, old)
    (old / STAIN_FILE).unlink()  # as runs trained before references were recorded
    assert Predictor([old], progress=False).stain is None  # trained without: nothing to do
    with pytest.raises(InferError, match="--stain-reference"):
        Predictor([old], progress=False, stain_norm="macenko")
    region = np.concatenate(list(patches(sample_store, 4)), axis=1)
    Image.fromarray(region).save(tmp_path / "lab.png")
    predictor = Predictor([old], progress=False, stain_norm="reinhard", stain_reference=tmp_path / "lab.png")
    assert predictor.stain is not None and predictor.stain.reference_source == str(tmp_path / "lab.png")


def test_evaluate_stain_shifts_scores_each_restaining(stain_run: Path, sample_store: Store, tmp_path: Path) -> None:
    command = ["evaluate", str(stain_run), str(sample_store.path), "--out", str(tmp_path / "ev"), "--stain-shifts"]
    result = CliRunner().invoke(app, [*command, "--stain-fit", "set"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(metrics["stain_shifts"]) == list(STAIN_SHIFTS)
    for shift in metrics["stain_shifts"].values():
        assert shift["delta"] == pytest.approx(shift["roc_auc"] - metrics["roc_auc"])
    assert metrics["stain_norm"]["method"] == "macenko" and metrics["stain_norm"]["patches"] == metrics["n"]
    assert metrics["stain_norm"]["fit"] == "set" and metrics["stain_norm"]["fallbacks"] == 0  # one fit for all
    other = ["evaluate", str(stain_run), str(sample_store.path), "--out", str(tmp_path / "ev2"), "--stain-fit", "lab"]
    refused = CliRunner().invoke(app, other)
    assert refused.exit_code == 2 and "--stain-fit 'lab'" in refused.output
    assert "Other labs" in (tmp_path / "ev" / "report.html").read_text()
    assert "pale: ROC AUC" in result.output


def test_export_refuses_a_normalised_run_and_onnx_is_normalised_by_the_predictor(
    stain_run: Path, exported: Export, sample_store: Store, tmp_path: Path
) -> None:
    with pytest.raises(InferError, match=r"stain-norm macenko.*ONNX"):
        export_onnx(stain_run, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    onnx = Path(exported("baseline-cnn")["path"])
    reference = stain_run / STAIN_FILE
    normalising = Predictor([onnx], progress=False, stain_norm="macenko", stain_reference=reference)
    pixels = patches(sample_store)
    expected = Predictor([onnx], progress=False).predict_batch(normalising.normalise(pixels))
    np.testing.assert_allclose(normalising.predict_batch(pixels), expected, atol=1e-6)


def test_a_slide_is_normalised_with_one_fit_recorded_in_its_summary(stain_run: Path, mosaic, tmp_path: Path) -> None:
    predictor = Predictor([stain_run], precision="fp32", progress=False)
    summary = score_slide(predictor, ArrayReader(mosaic.image), tmp_path / "slide", workers=0)
    record = summary["stain_norm"]
    assert record["method"] == "macenko" and record["fitted_on_windows"] > 0
    assert json.loads((tmp_path / "slide" / "summary.json").read_text())["stain_norm"] == record
    # every window is mapped with the slide's one fit: a cell's probability is its window's, normalised that way
    source = StainFit.from_dict(record["slide_stains"], source="summary.json")
    heat = np.load(tmp_path / "slide" / "heatmap.npy")
    r, c = mosaic.centres[0]
    window = mosaic.image[r * 32 - 32 : r * 32 + 64, c * 32 - 32 : c * 32 + 64][None]
    assert heat[r, c] == pytest.approx(predictor.predict_batch(window, source)[0], abs=1e-5)
