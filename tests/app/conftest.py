"""A tiny real run to serve (baseline-cnn, 16 patches, one epoch), the app on it, and a live uvicorn on loopback.

The app is served in fp32 so that its answers compare with ``Predictor`` within 1e-5. ``live_server`` runs the
same uvicorn set-up as ``histodetect serve`` in a thread, on a socket bound to a free 127.0.0.1 port, and stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from histodetect.app import Settings, create_app
from histodetect.app.server import serving_in_thread
from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.runs.config import TrainConfig
from histodetect.train.run import train

TINY = dict(epochs=1, batch_size=8, limit_train=16, val_fraction=0.2, patience=0, num_workers=0)
LiveServer = Callable[..., contextlib.AbstractContextManager[str]]


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> Path:
    run = tmp_path_factory.mktemp("app-runs") / "baseline-cnn"
    train(sample_store, run, TrainConfig(model="baseline-cnn", pretrained="none", **TINY))
    return run


@pytest.fixture(scope="session")
def settings(served_run: Path) -> Settings:
    return Settings((served_run,), precision="fp32")


@pytest.fixture(scope="session")
def reference(served_run: Path) -> Predictor:
    """``predict``'s own scoring of the served run, at the server's precision."""
    return Predictor([served_run], precision="fp32", progress=False)


@pytest.fixture(scope="session")
def patch_files(sample_dir: Path) -> list[Path]:
    return sorted((sample_dir / "test").glob("*.tif"))


@pytest.fixture(scope="session")
def region_png(sample_store: Store) -> bytes:
    """A 192x192 PNG region: four real patches, two by two (36 cells of the 32 px grid)."""
    tiles = sample_store.read(np.arange(4))
    region = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)])
    buffer = io.BytesIO()
    Image.fromarray(region).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def live_server() -> LiveServer:
    """``live_server(settings, **changes)``: a context manager that serves the app and yields its base URL."""

    def serve(settings: Settings, **changes: Any) -> contextlib.AbstractContextManager[str]:
        return serving_in_thread(dataclasses.replace(settings, **changes))

    return serve
