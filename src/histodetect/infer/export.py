"""``histodetect export``: a run -> one self-contained ONNX file, uint8 RGB patches in, probabilities out.

The whole preprocessing (uint8 -> [0, 1], NHWC -> NCHW, resize, the backbone's normalisation) and the sigmoid
are inside the graph, so a consumer feeds raw decoded patches and cannot get the normalisation wrong. The
batch axis is dynamic. The export is checked on real patches against the PyTorch model in fp32 before this
returns: a file that disagrees is an error, not a warning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodetect.data.store import Store
from histodetect.errors import InferError
from histodetect.infer.engine import OnnxMember
from histodetect.infer.onnx_graph import ONNX_SUFFIX, ProbabilityModel, opset, to_onnx
from histodetect.infer.sources import ImageFiles, store_patches
from histodetect.io import atomic_write_bytes
from histodetect.runs import load_model
from histodetect.sample import sample_dir

MAX_ABS_DIFF = 1e-4  # fp32 probabilities; real exports agree to ~1e-6
CHECK_PATCHES = 64


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
    return {"max_abs_diff": diff, "n_checked": len(patches), "path": str(out), "opset": opset(onnx_bytes)}


def _check_patches(check_store: str | os.PathLike[str] | None) -> np.ndarray:
    """Up to 64 real patches: the first rows of ``check_store``, or the embedded sample's training patches."""
    if check_store is not None:
        source = store_patches(Store(check_store)).patches
        if len(source) == 0:
            raise InferError(f"{check_store}: the store is empty; nothing to check the export on")
    else:
        source = ImageFiles(sorted((sample_dir() / "train").glob("*.tif")))
    return source[: min(len(source), CHECK_PATCHES)]
