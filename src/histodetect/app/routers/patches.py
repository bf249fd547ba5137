"""``POST /predict`` and ``POST /explain``: probabilities, decisions and Grad-CAM for 96x96 patches.

``/predict`` takes a multipart form (field ``files``, one or more images) and answers one object per file; the
older forms, one image or a ``.npy`` uint8 ``(N, 96, 96, 3)`` as the raw body, keep their ``{"probabilities":
[...]}`` answer so existing clients do not break.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from histodetect.app.limits import NPY_MAGIC, read_npy
from histodetect.app.model import ModelService, get_service, png
from histodetect.app.uploads import decode_patch, form_files, openapi_form

router = APIRouter(tags=["patches"])
IMAGE_TYPES = ["image/tiff", "image/png", "image/jpeg"]


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **openapi_form("files", many=True),
            **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_TYPES},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/predict",
    summary="Probability of tumour per patch",
    description="Multipart `files` (96x96 RGB TIFF/PNG/JPEG): a list of {filename, probability, label}. "
    "A raw image or `.npy` uint8 (N, 96, 96, 3) body: {probabilities: [...]}.",
    openapi_extra=PREDICT_BODY,
)
async def predict(request: Request, service: ModelService = Depends(get_service)) -> Any:
    settings = service.settings
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        with service.batcher.incoming():
            files = await form_files(request, "files", settings.max_files)
            patches = np.stack([decode_patch(data, name) for name, data in files])
        probabilities = await service.probabilities(patches)
        decisions = service.decisions(probabilities)
        return [
            {"filename": name, "probability": float(p), "label": label}
            for (name, _), p, label in zip(files, probabilities, decisions, strict=True)
        ]
    with service.batcher.incoming():
        body = await request.body()
        is_npy = body.startswith(NPY_MAGIC)
        patches = read_npy(body, settings.max_patches) if is_npy else decode_patch(body, "body")[None]
    return {"probabilities": [float(p) for p in await service.probabilities(patches)]}


@router.post(
    "/explain",
    summary="One patch: probability, decision and its Grad-CAM overlay",
    description="Multipart `file`: {filename, probability, label, patch_png, overlay_png} (PNGs base64-encoded). "
    "The Grad-CAM is the first run's; the probability is the server's, as /predict gives it.",
    openapi_extra={"requestBody": {"required": True, "content": openapi_form("file", many=False)}},
)
async def explain(request: Request, service: ModelService = Depends(get_service)) -> dict[str, Any]:
    [(name, data)] = await form_files(request, "file", max_files=1)
    patch = decode_patch(data, name)
    overlay = await service.grad_cam(patch)
    [probability] = await service.probabilities(patch[None])
    return {
        "filename": name,
        "probability": float(probability),
        "label": service.decisions(np.array([probability]))[0],
        "patch_png": base64.b64encode(png(patch)).decode(),
        "overlay_png": base64.b64encode(overlay).decode(),
    }
