"""The one loaded model a server answers with, and what ``/health`` says about it (names, never paths)."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image

from histodetect import __version__
from histodetect.app.batching import MicroBatcher
from histodetect.app.settings import Settings
from histodetect.errors import InferError
from histodetect.infer.engine import ONNX_SUFFIX, Predictor
from histodetect.infer.explain import cams, overlay
from histodetect.models import Classifier
from histodetect.runs import load_config, load_model


class ModelService:
    """The :class:`Predictor` (``predict``'s own: ensembles, TTA, precision) behind a :class:`MicroBatcher`, and
    the first run's network for Grad-CAM (loaded on first use, on the model thread)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.predictor = Predictor(
            settings.runs,
            tta=settings.tta,
            precision=settings.precision,
            device=settings.device,
            engine=settings.engine,
            progress=False,
            stain_norm=settings.stain_norm,
            stain_reference=settings.stain_reference,
        )
        self.batcher = MicroBatcher(
            self.predictor.predict,
            enabled=settings.batching,
            window=settings.batch_window_ms / 1000,
            max_batch=settings.max_batch,
            queue_size=settings.queue_size,
        )
        self.models = [_describe(run) for run in settings.runs]
        self.explainable = settings.runs[0].suffix.lower() != ONNX_SUFFIX

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "models": self.models,
            "tta": self.settings.tta,
            "precision": self.predictor.precision,
            "engine": self.predictor.engine,
            "device": self.predictor.device.type,
            "threshold": self.settings.threshold,
            "batching": self.settings.batching,
            "explain": self.explainable,
            "token_required": self.settings.token is not None,
        }

    async def probabilities(self, patches: np.ndarray) -> np.ndarray:
        return await self.batcher.predict(patches)

    def decisions(self, probabilities: np.ndarray) -> list[int]:
        """0/1 at the server's threshold, as ``predict --threshold`` decides."""
        return [int(p >= self.settings.threshold) for p in probabilities]

    async def grad_cam(self, patch: np.ndarray) -> bytes:
        """A PNG of the Grad-CAM overlay for one uint8 ``(96, 96, 3)`` patch, from the first run's network."""
        if not self.explainable:
            raise InferError("Grad-CAM needs a run folder; this server serves an ONNX export")
        return await self.batcher.run(self._grad_cam, patch)

    def _grad_cam(self, patch: np.ndarray) -> bytes:
        seen = self.predictor.normalise(np.array(patch[None]))  # as the model sees it; decoded pixels may be read-only
        heat, _ = cams(self._cam_model, seen)
        return png(overlay(seen[0], heat[0]))

    @functools.cached_property
    def _cam_model(self) -> Classifier:
        """A CPU fp32 copy, so Grad-CAM's hooks never touch the network ``predict`` runs."""
        return load_model(self.settings.runs[0])[0]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _describe(run: Path) -> dict[str, str]:
    """The run's folder name and architecture (an ONNX export: its file name)."""
    if run.suffix.lower() == ONNX_SUFFIX:
        return {"name": run.stem, "architecture": "onnx"}
    return {"name": run.name, "architecture": load_config(run).model}


def get_service(request: Request) -> ModelService:
    """FastAPI dependency: the app's model."""
    return request.app.state.service
