"""``histodetect serve``: runs (an ensemble, or an ONNX export) behind a small HTTP API.

For a viewer plug-in or a lab pipeline that wants a probability per patch without Python: the model is loaded once
and every request goes through the same :class:`~histodetect.infer.engine.Predictor` as ``predict`` (TTA,
precision, batching), and uploads are decoded and checked by ingest's decoder, so the server accepts and refuses
exactly the patches the other commands do. Standard-library HTTP, one process: requests are read in threads and
scored one at a time, since one model already uses every core. It binds to 127.0.0.1 unless told otherwise and has
no authentication: put a proxy in front before exposing it.

    GET  /health   -> {"status": "ok", "runs": [...], "tta": "none", "precision": "bf16", "device": "cpu"}
    POST /predict  body: one image file (TIFF, PNG or JPEG; 96x96 RGB), or a .npy uint8 array (N, 96, 96, 3)
                   -> {"probabilities": [p, ...]}

Errors answer ``{"error": "..."}`` with 400 (input that is not a patch), 404, 411 (no Content-Length) or 413 (a body
over ``MAX_BODY``).
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from histodetect import __version__
from histodetect.data.ingest import decode_bytes
from histodetect.data.store import PATCH_SHAPE
from histodetect.infer.engine import InferError, Predictor

MAX_BODY = 64 * 2**20  # 64 MiB: about 2,400 patches as one .npy
NPY_MAGIC = b"\x93NUMPY"


def read_patches(body: bytes) -> np.ndarray:
    """uint8 ``(N, 96, 96, 3)`` from a request body: a .npy array, or one image file checked as ingest checks it."""
    if body.startswith(NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as exc:
            raise InferError(f"not a readable .npy array ({exc})") from exc
        if array.ndim == 3:
            array = array[None]
        if array.dtype != np.uint8 or array.shape[1:] != PATCH_SHAPE or len(array) == 0:
            raise InferError(f"expected uint8 patches of shape (N, 96, 96, 3), got {array.dtype} {array.shape}")
        return array
    pixels, _, problems = decode_bytes(body)
    if pixels is None:
        raise InferError("; ".join(f"{kind}: {detail}" for kind, detail in problems))
    return pixels[None]


class PatchService:
    """The loaded model and what the API says about it; scores one request at a time."""

    def __init__(self, predictor: Predictor, runs: Sequence[str | os.PathLike[str]], tta: str) -> None:
        self.predictor = predictor
        self.lock = threading.Lock()
        self.info = {
            "status": "ok",
            "runs": [str(r) for r in runs],
            "tta": tta,
            "precision": predictor.precision,
            "device": predictor.device.type,
            "version": __version__,
        }

    def predict(self, body: bytes) -> list[float]:
        patches = read_patches(body)
        with self.lock:
            return [round(float(p), 6) for p in self.predictor.predict(patches)]


class _Handler(BaseHTTPRequestHandler):
    service: PatchService  # set on the subclass that make_server builds
    server_version = f"histodetect/{__version__}"
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/health":
            self._answer(HTTPStatus.OK, self.service.info)
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/predict":
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path}"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "send the body with a Content-Length"})
            return
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is not read, so the connection cannot carry another request
            self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY} bytes: send fewer"})
            return
        try:
            probabilities = self.service.predict(self.rfile.read(int(length)))
        except InferError as exc:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        self._answer(HTTPStatus.OK, {"probabilities": probabilities})

    def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_server(
    runs: Sequence[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tta: str = "none",
    batch_size: int | None = None,
    precision: str = "auto",
) -> ThreadingHTTPServer:
    """A server with the model loaded, bound and ready for ``serve_forever`` (port 0 picks a free one)."""
    predictor = Predictor(runs, tta=tta, batch_size=batch_size, precision=precision, progress=False)
    handler = type("Handler", (_Handler,), {"service": PatchService(predictor, runs, tta)})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise InferError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc
