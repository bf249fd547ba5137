"""``POST /slide``: a region image -> the heatmap PNG and the summary ``histodetect slide`` writes."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Depends, Request

from histodetect.app.model import ModelService, get_service
from histodetect.app.regions import SharedPredictor, check_region, score_region
from histodetect.app.uploads import form_files, openapi_form

router = APIRouter(tags=["regions"])


@router.post(
    "/slide",
    summary="A tumour heatmap over a region image",
    description="Multipart `file` (PNG/JPEG/TIFF, up to the server's pixel limit, 50 megapixels by default): "
    "{summary, heatmap_png} with the PNG base64-encoded; the image is scored as `histodetect slide` scores it.",
    openapi_extra={"requestBody": {"required": True, "content": openapi_form("file", many=False)}},
)
async def slide(request: Request, service: ModelService = Depends(get_service)) -> dict[str, Any]:
    settings = service.settings
    [(name, data)] = await form_files(request, "file", max_files=1)
    suffix = check_region(data, name, settings.max_region_pixels)
    shared = SharedPredictor(service.predictor, service.batcher.lock)
    summary, heatmap = await service.batcher.run_aside(score_region, shared, settings, data, name, suffix)
    return {"summary": summary, "heatmap_png": base64.b64encode(heatmap).decode()}
