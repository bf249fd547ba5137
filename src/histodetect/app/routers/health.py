"""``GET /health``: is it up, and what does it serve (names and settings, never file-system paths). No token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from histodetect.app.model import ModelService, get_service

router = APIRouter(tags=["health"])


@router.get("/health", summary="Status, models, TTA, precision, device, version")
def health(service: ModelService = Depends(get_service)) -> dict[str, Any]:
    return service.health()
