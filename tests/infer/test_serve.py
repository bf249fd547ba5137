"""serve: the HTTP API on a loopback port, answering as predict does and refusing what is not a patch."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodetect.data.store import Store
from histodetect.infer import serve as serve_module
from histodetect.infer.engine import Predictor
from histodetect.infer.serve import make_server


@pytest.fixture(scope="module")
def server(baseline_run: Path) -> Iterator[str]:
    """The baseline run served on a free loopback port, in fp32 so answers compare exactly with Predictor."""
    httpd = make_server([baseline_run], port=0, precision="fp32")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def call(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_health_says_what_is_served(server: str, baseline_run: Path) -> None:
    status, info = call(f"{server}/health")
    assert status == 200 and info["status"] == "ok"
    assert info["runs"] == [str(baseline_run)] and info["precision"] == "fp32" and info["tta"] == "none"


def test_an_image_file_and_a_npy_batch_get_predicts_probabilities(
    server: str, baseline_run: Path, test_images: Path, sample_store: Store
) -> None:
    expected = Predictor([baseline_run], precision="fp32", progress=False)
    tif = sorted(test_images.glob("*.tif"))[0]
    status, answer = call(f"{server}/predict", tif.read_bytes())
    assert status == 200
    one = np.asarray(Image.open(tif).convert("RGB"))[None]
    np.testing.assert_allclose(answer["probabilities"], expected.predict(one), atol=1e-5)
    batch = sample_store.read(np.arange(5))
    status, answer = call(f"{server}/predict", npy(batch))
    assert status == 200 and len(answer["probabilities"]) == 5
    np.testing.assert_allclose(answer["probabilities"], expected.predict(batch), atol=1e-5)


def test_what_is_not_a_patch_is_refused_with_the_reason(server: str, sample_store: Store) -> None:
    buffer = io.BytesIO()
    Image.new("L", (96, 96), 100).save(buffer, format="PNG")
    status, answer = call(f"{server}/predict", buffer.getvalue())
    assert status == 400 and "wrong_mode" in answer["error"]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    status, answer = call(f"{server}/predict", buffer.getvalue())
    assert status == 400 and "64x64" in answer["error"]
    status, answer = call(f"{server}/predict", npy(sample_store.read(np.arange(2)).astype(np.float32)))
    assert status == 400 and "uint8" in answer["error"]
    status, answer = call(f"{server}/predict", b"certainly not an image")
    assert status == 400 and "unreadable" in answer["error"]
    status, answer = call(f"{server}/predict", b"")
    assert status == 400 and "empty" in answer["error"]
    assert call(f"{server}/nowhere")[0] == 404
    assert call(f"{server}/nowhere", b"x")[0] == 404


def test_a_body_over_the_limit_is_refused_unread(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "MAX_BODY", 1000)
    status, answer = call(f"{server}/predict", b"\0" * 5000)
    assert status == 413 and "1000" in answer["error"]
    assert call(f"{server}/health")[0] == 200  # and the server goes on
