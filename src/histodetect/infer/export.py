"""``histodetect export``: a run -> one self-contained ONNX file, uint8 RGB patches in, probabilities out.

The whole preprocessing (uint8 -> [0, 1], NHWC -> NCHW, resize, the backbone's normalisation) and the sigmoid
are inside the graph, so a consumer feeds raw decoded patches and cannot get the normalisation wrong. The
batch axis is dynamic. The export is checked on real patches against the PyTorch model in fp32 before this
returns: a file that disagrees is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histodetect import __version__
from histodetect.data.augment import to_float
from histodetect.data.store import PATCH_SHAPE, Store
from histodetect.infer.engine import ONNX_SUFFIX, InferError, OnnxMember
from histodetect.infer.sources import ImageFiles, store_patches
from histodetect.io import atomic_write_bytes
from histodetect.models import Classifier
from histodetect.runs import load_model
from histodetect.sample import sample_dir
from histodetect.train.embeddings import cache_root

MAX_ABS_DIFF = 1e-4  # fp32 probabilities; real exports agree to ~1e-6
CHECK_PATCHES = 64


class ProbabilityModel(nn.Module):
    """uint8 ``(B, H, W, 3)`` RGB -> probability of tumour ``(B,)``: the exported graph."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(to_float(pixels)))


def export_onnx(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    check_store: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Export ``run`` to ``out`` (written atomically) and check it with onnxruntime.

    The check compares probabilities on up to 64 real patches (``check_store``'s, default the embedded
    sample's training patches) with the PyTorch model in fp32 and raises :class:`InferError` if any differs by
    more than 1e-4. Returns ``{"max_abs_diff", "n_checked", "path", "opset"}``.
    """
    run, out = Path(run), Path(out)
    if out.suffix.lower() != ONNX_SUFFIX:
        raise InferError(f"{out}: the export file must end in {ONNX_SUFFIX}")
    model, config = load_model(run)
    if config.stain_norm != "none":
        raise InferError(
            f"{run}: trained with --stain-norm {config.stain_norm}, which the ONNX graph does not carry (a per-patch "
            "eigen-decomposition); score it with predict/serve on the run folder, or train with --stain-norm none"
        )
    onnx_bytes = to_onnx(model)
    patches = _check_patches(check_store)
    with torch.inference_mode():
        expected = ProbabilityModel(model).eval()(torch.from_numpy(patches)).numpy()
    actual = OnnxMember(onnx_bytes)(torch.from_numpy(patches), (0,)).numpy()
    diff = float(np.abs(actual - expected).max())
    if not diff < MAX_ABS_DIFF:
        raise InferError(
            f"{run}: the ONNX export differs from PyTorch by up to {diff:.2e} on {len(patches)} patches "
            f"(limit {MAX_ABS_DIFF:.0e}); nothing was written"
        )
    atomic_write_bytes(out, onnx_bytes)
    return {"max_abs_diff": diff, "n_checked": len(patches), "path": str(out), "opset": _opset(onnx_bytes)}


def cached_onnx(model: Classifier) -> bytes:
    """:func:`to_onnx` of ``model``, kept in ``cache_root(kind="onnx")`` under a hash of what the graph depends on
    (architecture, image size, every tensor, torch's version): the dynamo export takes 6-16 s on a 2-core CPU, which
    every ``slide``, ``predict`` and ``serve`` on an ONNX engine would pay at start; a cached one loads in well
    under a second. Written atomically, so a killed process leaves no partial file under the final name."""
    digest = hashlib.sha256(f"{model.name}|{model.image_size}|{torch.__version__}|{__version__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    path = cache_root(kind="onnx") / f"{model.name}-{digest.hexdigest()[:32]}{ONNX_SUFFIX}"
    if path.is_file():
        return path.read_bytes()
    graph = to_onnx(model)
    with contextlib.suppress(OSError):  # a read-only home is no reason to fail: the graph is in memory
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, graph)
    return graph


def to_onnx(model: Classifier) -> bytes:
    """``model`` as a serialised :class:`ProbabilityModel` graph with a dynamic batch axis: the dynamo
    exporter, or TorchScript tracing if it fails.

    The dynamo exporter handles every family the project trains (baseline-cnn, ResNet, EfficientNet,
    ConvNeXt); the fallback covers architectures ``torch.export`` cannot capture. Weights are embedded (no
    external data file), so the export is one file that can be written atomically.
    """
    wrapper = ProbabilityModel(model).eval()
    example = torch.zeros((2, *PATCH_SHAPE), dtype=torch.uint8)  # 2: a batch of 1 would be specialised away
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about decompositions and deprecated paths
        try:
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=["pixels"],
                output_names=["probability"],
                dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
            )
            return program.model_proto.SerializeToString()
        except Exception as dynamo_error:  # any capture/translation failure: try the TorchScript exporter
            buffer = io.BytesIO()
            try:
                torch.onnx.export(
                    wrapper,
                    (example,),
                    buffer,
                    dynamo=False,
                    input_names=["pixels"],
                    output_names=["probability"],
                    dynamic_axes={"pixels": {0: "batch"}, "probability": {0: "batch"}},
                )
            except Exception as script_error:
                raise InferError(
                    f"{model.name}: ONNX export failed (dynamo: {dynamo_error}; torchscript: {script_error})"
                ) from script_error
            return buffer.getvalue()


def _check_patches(check_store: str | os.PathLike[str] | None) -> np.ndarray:
    """Up to 64 real patches: the first rows of ``check_store``, or the embedded sample's training patches."""
    if check_store is not None:
        source = store_patches(Store(check_store)).patches
        if len(source) == 0:
            raise InferError(f"{check_store}: the store is empty; nothing to check the export on")
    else:
        source = ImageFiles(sorted((sample_dir() / "train").glob("*.tif")))
    return source[: min(len(source), CHECK_PATCHES)]


def _opset(onnx_bytes: bytes) -> int:
    """The ONNX operator set the graph uses (the default domain's), which decides the runtimes that can load
    it."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
