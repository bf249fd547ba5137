"""Uploaded files -> checked pixels, in memory: multipart forms (read by :func:`limits.read_form`) and raw bodies.

A patch is decoded and checked by ingest's own decoder, so the server accepts and refuses exactly the patches that
``ingest`` and ``predict`` do, and says why with the same words (``wrong_size``, ``wrong_mode``, ``unreadable``...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from histodetect.app.limits import read_form
from histodetect.data.decode import decode_bytes
from histodetect.errors import InferError


async def form_files(request: Request, field: str, max_files: int) -> list[tuple[str, bytes]]:
    """``(filename, bytes)`` of every file sent in the multipart form field ``field``; none is the client's error."""
    form = await read_form(request, max_files)
    try:
        files = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
        if not files:
            raise InferError(f"no file in the form field {field!r}: send the image(s) as {field}=@FILE")
        return [(item.filename or f"file-{i}", await item.read()) for i, item in enumerate(files)]
    finally:
        await form.close()


def decode_patch(data: bytes, name: str) -> np.ndarray:
    """uint8 ``(96, 96, 3)`` pixels of one uploaded patch, or an :class:`InferError` naming it and the problem."""
    pixels, _, problems = decode_bytes(data)
    if pixels is None:
        raise InferError(f"{name}: " + "; ".join(f"{kind}: {detail}" for kind, detail in problems))
    return pixels


def openapi_form(field: str, many: bool) -> dict[str, Any]:
    """The OpenAPI body of a form with image file(s) in ``field``: routes read forms themselves (in memory, with
    limits), so FastAPI cannot infer it."""
    file = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": file} if many else file
    return {"multipart/form-data": {"schema": {"type": "object", "properties": {field: schema}, "required": [field]}}}
