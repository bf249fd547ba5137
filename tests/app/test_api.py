"""The HTTP API through FastAPI's TestClient: answers equal predict's, and each bad input gets its reason."""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from histodetect.app import Settings, create_app
from histodetect.app.batching import Busy
from histodetect.data.stain import StainFit
from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.infer.slide import score_slide


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_health_names_the_model_and_settings_but_no_path(client: TestClient, served_run: Path) -> None:
    answer = client.get("/health")
    assert answer.status_code == 200
    info = answer.json()
    assert info["status"] == "ok" and info["precision"] == "fp32" and info["tta"] == "none"
    assert info["models"] == [{"name": "baseline-cnn", "architecture": "baseline-cnn"}]
    assert {"device", "version", "threshold"} <= info.keys()
    assert str(served_run.parent) not in answer.text and "/" not in json.dumps(info["models"])


def test_a_form_of_patches_gets_each_file_its_probability_and_label(
    client: TestClient, reference: Predictor, patch_files: list[Path]
) -> None:
    chosen = patch_files[:3]
    files = [("files", (path.name, path.read_bytes(), "image/tiff")) for path in chosen]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    expected = reference.predict(np.stack([pixels(p) for p in chosen]))
    assert [row["filename"] for row in answer.json()] == [p.name for p in chosen]
    np.testing.assert_allclose([row["probability"] for row in answer.json()], expected, atol=1e-5)
    assert [row["label"] for row in answer.json()] == [int(p >= 0.5) for p in expected]


def test_the_old_raw_body_forms_keep_their_answer(
    client: TestClient, reference: Predictor, patch_files: list[Path], sample_store: Store
) -> None:
    answer = client.post("/predict", content=patch_files[0].read_bytes())
    assert answer.status_code == 200 and list(answer.json()) == ["probabilities"]
    expected = reference.predict(pixels(patch_files[0])[None])
    np.testing.assert_allclose(answer.json()["probabilities"], expected, atol=1e-5)
    batch = sample_store.read(np.arange(5))
    answer = client.post("/predict", content=npy(batch))
    assert answer.status_code == 200 and len(answer.json()["probabilities"]) == 5
    np.testing.assert_allclose(answer.json()["probabilities"], reference.predict(batch), atol=1e-5)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (image_bytes(Image.new("L", (96, 96), 100)), "wrong_mode"),
        (image_bytes(Image.new("RGB", (64, 64))), "64x64"),
        (b"certainly not an image", "unreadable"),
        (b"", "empty"),
        (npy(np.zeros((2, 96, 96, 3), np.float32)), "uint8"),
        (npy(np.zeros((2, 32, 32, 3), np.uint8)), "(N, 96, 96, 3)"),
    ],
)
def test_what_is_not_a_patch_is_refused_with_the_reason(client: TestClient, body: bytes, reason: str) -> None:
    answer = client.post("/predict", content=body)
    assert answer.status_code == 400 and reason in answer.json()["error"]


def test_one_bad_file_in_a_form_is_named(client: TestClient, patch_files: list[Path]) -> None:
    files = [
        ("files", ("good.tif", patch_files[0].read_bytes(), "image/tiff")),
        ("files", ("grey.png", image_bytes(Image.new("L", (96, 96))), "image/png")),
    ]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 400 and answer.json()["error"].startswith("grey.png: wrong_mode")
    answer = client.post("/predict", files=[("other", ("a.tif", patch_files[0].read_bytes(), "image/tiff"))])
    assert answer.status_code == 400 and "'files'" in answer.json()["error"]


def test_a_npy_header_asking_for_too_much_is_refused_before_any_allocation(client: TestClient) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 96, 96, 3)})
    answer = client.post("/predict", content=header.getvalue() + b"\0" * 100)
    assert answer.status_code == 400 and "over the limit" in answer.json()["error"]  # 27 TB, never allocated
    short = npy(np.zeros((3, 96, 96, 3), np.uint8))[:-10]
    answer = client.post("/predict", content=short)
    assert answer.status_code == 400 and "promises" in answer.json()["error"]


def test_explain_gives_predicts_probability_and_a_grad_cam_png(
    client: TestClient, reference: Predictor, patch_files: list[Path]
) -> None:
    path = patch_files[1]
    answer = client.post("/explain", files={"file": (path.name, path.read_bytes(), "image/tiff")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    np.testing.assert_allclose(body["probability"], reference.predict(pixels(path)[None])[0], atol=1e-5)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    patch = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["patch_png"]))))
    assert overlay.size == (96, 96) and overlay.mode == "RGB"
    np.testing.assert_array_equal(patch, pixels(path))


def test_a_region_gets_the_slide_heatmap_and_leaves_no_file(
    client: TestClient, region_png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the app's temporary folder goes
    answer = client.post("/slide", files={"file": ("region.png", region_png, "image/png")})
    assert answer.status_code == 200, answer.text
    summary = answer.json()["summary"]
    assert summary["filename"] == "region.png" and (summary["width"], summary["height"]) == (192, 192)
    assert summary["cells"] == 36 and "image" not in summary and "runs" not in summary
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["heatmap_png"]))).format == "PNG"
    assert list(tmp_path.iterdir()) == []


def test_the_page_its_files_and_the_openapi_docs_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<h1>histodetect</h1>" in page.text
    assert "http" not in page.text.replace('href="/docs"', "")  # nothing fetched from elsewhere
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/predict", "/explain", "/slide"} <= paths.keys()
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_an_unexpected_exception_is_logged_and_answered_500_in_json(
    client: TestClient, patch_files: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: np.ndarray) -> np.ndarray:
        raise RuntimeError("model on fire")

    monkeypatch.setattr(client.app.state.service.batcher, "predict_fn", broken)  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="histodetect.app"):
        answer = client.post("/predict", content=patch_files[0].read_bytes())
    assert answer.status_code == 500 and "internal error" in answer.json()["error"]
    assert "model on fire" in caplog.text
    monkeypatch.undo()
    assert client.post("/predict", content=patch_files[0].read_bytes()).status_code == 200


def test_limits_answer_413_and_400_before_the_work(settings: Settings, patch_files: list[Path]) -> None:
    strict = Settings(settings.runs, precision="fp32", max_body=100_000, max_files=2, max_region_pixels=10_000)
    tif = patch_files[0].read_bytes()
    with TestClient(create_app(strict)) as client:
        answer = client.post("/predict", content=b"\0" * 200_000)
        assert answer.status_code == 413 and "100000" in answer.json()["error"]

        def chunks() -> bytes:  # no Content-Length: counted as it arrives
            yield from [b"\0" * 50_000] * 4

        assert client.post("/predict", content=chunks()).status_code == 413
        files = [("files", (f"{i}.tif", tif, "image/tiff")) for i in range(3)]
        answer = client.post("/predict", files=files)
        assert answer.status_code == 400 and "Too many files" in answer.json()["error"]
        region = image_bytes(Image.new("RGB", (200, 200), (200, 120, 160)))
        answer = client.post("/slide", files={"file": ("big.png", region, "image/png")})
        assert answer.status_code == 400 and "megapixels" in answer.json()["error"]
        answer = client.post("/slide", files={"file": ("notes.txt", b"plain text", "text/plain")})
        assert answer.status_code == 400 and "not a PNG, JPEG or TIFF" in answer.json()["error"]
        assert client.get("/health").status_code == 200


def test_a_large_upload_stays_in_memory(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was spilled to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)  # where a SpooledTemporaryFile rolls over to
    big = b"\0" * (3 * 2**20)  # past Starlette's 1 MB spool
    answer = client.post("/predict", files=[("files", ("big.tif", big, "image/tiff"))])
    assert answer.status_code == 400 and "big.tif" in answer.json()["error"]


def test_a_full_model_queue_answers_503_with_retry_after(
    client: TestClient, patch_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def full(_: np.ndarray) -> np.ndarray:
        raise Busy("256 requests already wait for the model; try again shortly")

    monkeypatch.setattr(client.app.state.service.batcher, "predict", full)  # type: ignore[attr-defined]
    answer = client.post("/predict", content=patch_files[0].read_bytes())
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1" and "wait" in answer.json()["error"]


def test_a_patch_request_is_answered_between_the_batches_of_a_large_region(
    settings: Settings,
    region_png: bytes,
    reference: Predictor,
    patch_files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The region holds the model for one of its batches at a time: a /predict sent while it is being scored is
    answered before the region's next batch, which waits (holding the model) until that answer has arrived."""
    app = create_app(settings)
    service = app.state.service
    monkeypatch.setattr(service.predictor, "batch_size", 4)  # a model call for every 4 of its tissue cells
    calls: list[str] = []
    started, answered = threading.Event(), threading.Event()
    region_batch, patch_batch = service.predictor.predict_batch, service.batcher.predict_fn

    def observed_region_batch(batch: np.ndarray, stain: StainFit | None = None) -> np.ndarray:
        calls.append("region")
        if calls.count("region") == 1:  # hold the model until the patch request waits for it
            started.set()
            deadline = time.monotonic() + 30
            while not service.batcher.lock.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
        elif calls.count("region") == 2:
            answered.wait(30)
        return region_batch(batch, stain)

    def observed_patch_batch(batch: np.ndarray) -> np.ndarray:
        calls.append("patch")
        return patch_batch(batch)

    monkeypatch.setattr(service.predictor, "predict_batch", observed_region_batch)
    monkeypatch.setattr(service.batcher, "predict_fn", observed_patch_batch)
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        region = pool.submit(client.post, "/slide", files={"file": ("region.png", region_png, "image/png")})
        assert started.wait(30)
        answer = client.post("/predict", content=patch_files[0].read_bytes())
        region_still_scoring = not region.done()
        answered.set()
        summary = region.result(60).json()["summary"]
    assert answer.status_code == 200 and region_still_scoring
    expected_patch = reference.predict(pixels(patch_files[0])[None])
    np.testing.assert_allclose(answer.json()["probabilities"], expected_patch, atol=1e-5)
    assert calls == ["region", "patch"] + ["region"] * (-(-summary["cells_scored"] // 4) - 1)
    with tempfile.TemporaryDirectory() as folder:  # the region's answer is the one `histodetect slide` gives
        (Path(folder) / "region.png").write_bytes(region_png)
        expected = score_slide(reference, Path(folder) / "region.png", Path(folder) / "out", progress=False, workers=0)
    assert summary["cells_scored"] == expected["cells_scored"] > 3 * 4
    assert summary["cells_at_or_above_threshold"] == expected["cells_at_or_above_threshold"]
    assert summary["max_probability"] == pytest.approx(expected["max_probability"], abs=1e-5)
