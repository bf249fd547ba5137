"""What one request may cost, enforced before the cost is paid.

- :class:`LimitsMiddleware` (pure ASGI, outermost of the app's own layers): a ``Content-Length`` over the limit is
  answered 413 without reading a byte, and a body without one is counted as it arrives and cut at the limit; a
  client that has not sent its whole request within ``request_timeout`` seconds is answered 408 and dropped
  (the limit is on the total, so a client trickling one byte a second cannot hold a connection); any exception
  that escapes a route is logged with its traceback and answered 500 in JSON, never a dropped connection.
- :func:`read_npy`: a ``.npy`` body's header is read and checked (dtype, shape, patch count, byte count) before
  the array is built, and the array is a view of the body, so a 100-byte file that claims a terabyte costs nothing.
- :func:`image_pixels`: an image's width x height from its header alone, for the region limit (decompression
  bombs); patches need no such check, ingest's decoder refuses a wrong size from the header too.
- :func:`read_form`: multipart uploads parsed in memory (the body is already bounded), never spooled to disk,
  with at most ``max_files`` files.

The concurrency limit (503) is uvicorn's ``limit_concurrency``, set by :mod:`histodetect.app.server`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histodetect.data.store import PATCH_SHAPE
from histodetect.errors import InferError

log = logging.getLogger("histodetect.app")
NPY_MAGIC = b"\x93NUMPY"
LINGER = 2.0  # seconds a refused body is read and dropped so that its client can read the refusal


class _Cut(Exception):
    """Raised inside ``receive`` to stop a request whose body breaks a limit; answered by the middleware."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LimitsMiddleware:
    """Body size (413), total receive time (408) and the last-resort 500, for every HTTP request."""

    def __init__(self, app: ASGIApp, *, max_body: int, request_timeout: float) -> None:
        self.app = app
        self.max_body = max_body
        self.request_timeout = request_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():  # bytes.isdigit: ASCII digits only
            await _json(send, 400, f"Content-Length {length.decode('latin-1')!r} is not a number of bytes")
            return
        if length is not None and int(length) > self.max_body:
            message = f"body of {int(length)} bytes is over the limit of {self.max_body}: send less"
            await _json(send, 413, message, drain=receive)
            return
        try:
            await self.app(scope, self._limited(receive), tracked_send)
        except _Cut as cut:
            if started:
                raise
            await _json(send, cut.status, str(cut), drain=receive if cut.status == 413 else None)
        except ClientDisconnect:  # the client went away (or uvicorn dropped a malformed chunk): no one to answer
            return
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if started:
                raise
            await _json(send, 500, "internal error: the server could not answer this request (see its log)")

    def _limited(self, receive: Receive) -> Receive:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise _Cut(408, f"the request was not received within {self.request_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _Cut(413, f"body over the limit of {self.max_body} bytes: send less")
            return message

        return limited_receive


async def _json(send: Send, status: int, error: str, *, drain: Receive | None = None) -> None:
    """Answer ``{"error": ...}`` and close the connection (the rest of a refused body may still be on its way).

    With ``drain``, the answer is sent first and then what the client still sends is read and thrown away for up to
    ``LINGER`` seconds before the connection closes (nginx's "lingering close"): closing on unread data makes the
    kernel reset the connection, and a client still busy sending would never read its 413.
    """
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": drain is not None})
    if drain is not None:
        await _discard(drain, LINGER)
        await send({"type": "http.response.body", "body": b""})


async def _discard(receive: Receive, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def read_npy(body: bytes, max_patches: int) -> np.ndarray:
    """uint8 ``(N, 96, 96, 3)`` patches from a ``.npy`` body (a single ``(96, 96, 3)`` patch too), checked from the
    header before any array exists; the result is a read-only view of ``body``."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
        shape, fortran, dtype = read_header(stream, max_header_size=10_000)
    except ValueError as exc:
        raise InferError(f"not a readable .npy array ({exc})") from exc
    if len(shape) == len(PATCH_SHAPE):
        shape = (1, *shape)
    if dtype != np.uint8 or tuple(shape[1:]) != PATCH_SHAPE or len(shape) != 4 or shape[0] == 0:
        raise InferError(f"expected uint8 patches of shape (N, 96, 96, 3), got {dtype} {tuple(shape)}")
    if shape[0] > max_patches:
        raise InferError(f"{shape[0]} patches in one .npy is over the limit of {max_patches}: send fewer at a time")
    offset = stream.tell()
    if len(body) - offset != int(np.prod(shape)):
        raise InferError(f"the .npy header promises {tuple(shape)} but the body holds {len(body) - offset} bytes")
    return np.frombuffer(body, dtype=np.uint8, offset=offset).reshape(shape, order="F" if fortran else "C")


def image_pixels(data: bytes) -> int:
    """Width x height of a PNG, JPEG or TIFF (the first series' full resolution), from its header only."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series
                shape = series[0].shape
        except Exception as exc:  # tifffile raises many types for damaged headers
            raise InferError(f"not a readable TIFF ({type(exc).__name__}: {str(exc)[:200]})") from None
        planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
        if len(series) > 1 or len(shape) > 3 or (len(shape) == 3 and not planar and shape[-1] not in (3, 4)):
            # (3, 8000, 8000, 3) is three 64 MP pages, not 3 x 8000 pixels: only one image is read, so refuse
            raise InferError(f"a multi-page TIFF ({len(series)} series, shape {shape}); send one image")
        height, width = (shape[1], shape[2]) if planar else shape[:2]
        return int(height) * int(width)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, far above ours
        raise InferError(f"image too large ({exc})") from exc
    except Exception as exc:  # Pillow raises several types for what it cannot identify
        raise InferError("not an image this server reads (PNG, JPEG or TIFF)") from exc


class _InMemoryParser(MultiPartParser):
    """Starlette's parser without its spill to a temporary file past 1 MB: the body is bounded by ``max_body``."""

    spool_max_size = 2**62


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form of ``request``, its files kept in memory; too many files is the client's error."""
    parser = _InMemoryParser(request.headers, request.stream(), max_files=max_files, max_fields=16)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InferError(f"multipart form refused: {exc.message} (at most {max_files} files per request)") from exc
