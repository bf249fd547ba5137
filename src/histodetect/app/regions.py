"""A region image uploaded to ``/slide`` -> the heatmap and summary that ``histodetect slide`` writes.

The slide code reads files, so the upload is written into a temporary folder for the length of one call and the
folder is removed after it, whatever happens: nothing uploaded stays on disk. The image's size is checked from
its header first (decompression bombs), and its format from its first bytes, not from the client's file name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from histodetect.app.batching import FairLock
from histodetect.app.limits import image_pixels
from histodetect.app.settings import Settings
from histodetect.data.stain import StainFit
from histodetect.data.wsi import open_slide
from histodetect.errors import InferError, UserError
from histodetect.infer.engine import Predictor
from histodetect.infer.slide import score_slide

SIGNATURES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"II*\x00": ".tif", b"MM\x00*": ".tif", b"II+\x00": ".tif"}
HIDDEN_KEYS = ("slide", "runs", "mask", "annotations")  # the summary's file-system paths


def check_region(data: bytes, name: str, max_pixels: int) -> str:
    """The file suffix the slide code reads ``data`` by; refuses what is not PNG/JPEG/TIFF or is over the limit."""
    suffix = next((s for magic, s in SIGNATURES.items() if data.startswith(magic)), None)
    if suffix is None:
        raise InferError(f"{name}: not a PNG, JPEG or TIFF image")
    pixels = image_pixels(data)
    if pixels > max_pixels:
        raise InferError(
            f"{name}: {pixels / 1e6:.1f} megapixels is over this server's limit of {max_pixels / 1e6:g}; "
            "send a smaller region or use `histodetect slide` on the file"
        )
    return suffix


class SharedPredictor:
    """The server's :class:`Predictor` as a region sees it: the same model and attributes, but each batch waits
    its turn for ``lock``, the lock patch batches take too, so patch requests are served between region batches."""

    def __init__(self, predictor: Predictor, lock: FairLock) -> None:
        self.predictor = predictor
        self.lock = lock

    def predict_batch(self, batch: np.ndarray, stain: StainFit | None = None) -> np.ndarray:
        with self.lock:
            return self.predictor.predict_batch(batch, stain)

    def __getattr__(self, name: str) -> Any:  # batch_size, mpp, tta, precision, sources: the predictor's
        return getattr(self.predictor, name)


def score_region(
    predictor: SharedPredictor, settings: Settings, data: bytes, name: str, suffix: str
) -> tuple[dict[str, Any], bytes]:
    """The slide summary (paths replaced by ``name``) and ``heatmap.png``'s bytes, through the same code as
    ``histodetect slide``, with the server's own, already loaded model; runs on the region thread."""
    with tempfile.TemporaryDirectory(prefix="histodetect-region-") as folder:
        image = Path(folder) / f"region{suffix}"
        image.write_bytes(data)
        try:
            with open_slide(image) as reader:
                width, height = reader.dimensions
                if width * height > settings.max_region_pixels:  # as decoded: the header check saw one page
                    raise InferError(f"{name}: {width}x{height} pixels decoded, over this server's limit")
                summary = score_slide(
                    predictor,
                    reader,
                    Path(folder) / "out",
                    min_tissue=settings.region_min_tissue,
                    threshold=settings.threshold,
                    workers=0,
                    progress=False,
                )
        except UserError as exc:  # the server's paths and command-line advice mean nothing to a web user
            message = str(exc).replace(str(image), name).replace(image.name, name).replace(folder, "")
            raise InferError(message.replace("pass --slide-mpp", "send the region at the model's scale")) from None
        heatmap = (Path(folder) / "out" / "heatmap.png").read_bytes()
    for key in HIDDEN_KEYS:
        summary.pop(key, None)
    return {"filename": name, **summary}, heatmap
