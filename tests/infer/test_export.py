"""export: one ONNX file per run, uint8 patches in and probabilities out, checked against PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from histodetect.data.store import Store
from histodetect.infer import export as export_module
from histodetect.infer.engine import InferError, Predictor
from histodetect.infer.export import export_onnx
from histodetect.infer.sources import store_patches

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

Export = Callable[[str], dict[str, Any]]


@pytest.mark.parametrize("model", ["baseline-cnn", "resnet18", "tf_efficientnet_lite0", "convnext_atto"])
def test_every_family_exports_and_matches_pytorch(model: str, exported: Export, sample_store: Store) -> None:
    result = exported(model)
    assert result["max_abs_diff"] < 1e-4
    assert result["n_checked"] == 64
    assert isinstance(result["opset"], int) and result["opset"] >= 17
    graph = onnx.load(result["path"])
    onnx.checker.check_model(graph)
    batch_axis = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # dynamic batch
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    patches = store_patches(sample_store).patches[:3]  # a batch size the export never saw
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: patches})
    assert probabilities.shape == (3,) and probabilities.dtype == np.float32
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_check_store_supplies_the_check_patches(baseline_run: Path, sample_store: Store, tmp_path: Path) -> None:
    result = export_onnx(baseline_run, tmp_path / "m.onnx", check_store=sample_store.path)
    assert result["n_checked"] == 16  # the store's test split
    fp32 = Predictor([baseline_run], precision="fp32").predict(store_patches(sample_store).patches)
    from_onnx = Predictor([tmp_path / "m.onnx"]).predict(store_patches(sample_store).patches)
    assert np.abs(fp32 - from_onnx).max() < 1e-4


def test_a_failed_check_writes_nothing(baseline_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "MAX_ABS_DIFF", 0.0)
    out = tmp_path / "m.onnx"
    with pytest.raises(InferError, match="differs from PyTorch"):
        export_onnx(baseline_run, out)
    assert list(tmp_path.iterdir()) == []


def test_torchscript_fallback_when_the_dynamo_exporter_fails(
    baseline_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = torch.onnx.export

    def no_dynamo(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    result = export_onnx(baseline_run, tmp_path / "m.onnx")
    assert result["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"


def test_the_output_must_be_an_onnx_file(baseline_run: Path, tmp_path: Path) -> None:
    with pytest.raises(InferError, match=r"\.onnx"):
        export_onnx(baseline_run, tmp_path / "model.pt")
