"""A network as an ONNX graph (uint8 RGB patches in, probabilities out), made in memory and cached by what it holds.

``export`` writes one to a file and checks it; the :class:`~histodetect.infer.engine.Predictor` runs one on
onnxruntime or OpenVINO. Both build on this module, which builds on neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histodetect import __version__
from histodetect.data.augment import to_float
from histodetect.data.store import PATCH_SHAPE
from histodetect.errors import InferError
from histodetect.io import atomic_write_bytes
from histodetect.models import Classifier
from histodetect.runs import TrainConfig, load_config, load_model
from histodetect.runs.names import WEIGHTS
from histodetect.train.embeddings import cache_root

ONNX_SUFFIX = ".onnx"


class ProbabilityModel(nn.Module):
    """uint8 ``(B, H, W, 3)`` RGB -> probability of tumour ``(B,)``: the exported graph."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(to_float(pixels)))


def cached_onnx(model: Classifier) -> bytes:
    """:func:`to_onnx` of ``model``, kept in ``cache_root(kind="onnx")`` under a hash of what the graph depends on
    (architecture, image size, every tensor, torch's version): the dynamo export takes 6-16 s on a 2-core CPU, which
    every ``slide``, ``predict`` and ``serve`` on an ONNX engine would pay at start; a cached one loads in well
    under a second. Written atomically, so a killed process leaves no partial file under the final name."""
    digest = hashlib.sha256(f"{model.name}|{model.image_size}|{torch.__version__}|{__version__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return _cached(_cache_path(model.name, digest), lambda: model)


def cached_run_onnx(run: str | os.PathLike[str]) -> tuple[bytes, TrainConfig]:
    """The ONNX graph of a run folder's network and the run's config, cached (as :func:`cached_onnx`) under a hash
    of the run's own files (the architecture and image size its config names, ``model.safetensors``' bytes) and the
    versions that shape the graph (torch, timm, histodetect). On a hit the network is never built: no timm import
    and no PyTorch copy of the weights, about a second and 100+ MB less at the start of every ``slide``, ``predict``
    and ``serve`` on an ONNX engine. On a miss, or without weights, :func:`load_model` builds it (and names what is
    wrong with the run)."""
    run = Path(run)
    config = load_config(run)
    weights = run / WEIGHTS
    if not weights.is_file():
        return cached_onnx(load_model(run)[0]), config
    digest = hashlib.sha256(
        f"run|{config.model}|{config.image_size}|{torch.__version__}|{_version('timm')}|{__version__}|".encode()
    )
    with weights.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return _cached(_cache_path(config.model, digest), lambda: load_model(run)[0]), config


def _cache_path(name: str, digest: Any) -> Path:
    """Where the export of the network ``name`` with this ``digest`` is cached (a hub name's slashes made safe)."""
    return cache_root(kind="onnx") / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest.hexdigest()[:32]}{ONNX_SUFFIX}"


def _cached(path: Path, model: Callable[[], Classifier]) -> bytes:
    """The graph at ``path``, or :func:`to_onnx` of ``model()`` written there atomically."""
    if path.is_file():
        return path.read_bytes()
    graph = to_onnx(model().eval())
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


def opset(onnx_bytes: bytes) -> int:
    """The ONNX operator set the graph uses (the default domain's), which decides the runtimes that can load
    it."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
