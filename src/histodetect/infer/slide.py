"""``histodetect slide``: one large image (a slide region, or a level of a pyramidal TIFF) -> a tumour heatmap.

A PCam/Kaggle label speaks for a patch's centre 32x32 pixels; the rest of the 96x96 patch is context. So the image
is cut into cells of ``stride`` pixels (32 by default) and each cell is scored by the 96x96 window centred on it,
the image padded with white so that border cells have one too: at the default stride every cell is scored once,
by the model answering exactly the question it was trained on. Cells that are mostly glass (unsaturated or near
white) are not scored; on a slide they are most of the area.

The model has only seen patches at the magnification of the competition data (PCam: about 1 micron a pixel, a
10x objective), so the image must be at that scale: pick the pyramid level (``level``) or resize beforehand.

Outputs, written atomically into one folder: ``heatmap.npy`` (float32 cells, NaN where not scored), ``cells.csv``
(one row per scored cell: row, col, x, y of its top-left pixel, probability), ``heatmap.png`` (the image with the
heatmap over it) and ``summary.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histodetect.data.store import PATCH_SHAPE
from histodetect.infer.engine import InferError, Predictor
from histodetect.io import atomic_path, atomic_write_json

WINDOW = PATCH_SHAPE[0]  # 96: what every model was trained on
CENTRE = 32  # the labelled centre of a window
MAX_PIXELS = 250_000_000  # ~750 MB as RGB; a whole slide at full resolution is far larger: choose a level
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".btf"})
SATURATION = 0.07  # HSV saturation above which a pixel counts as stained tissue (glass and white are below)
THUMBNAIL = 1600  # longest side of heatmap.png's image, in pixels


def read_image(path: str | os.PathLike[str], *, level: int = 0) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB of ``path``: a TIFF (pyramid ``level``, as tifffile reads SVS too) or any image Pillow
    reads. Refuses what cannot be an H&E image and what would not fit in memory, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    if path.suffix.lower() in TIFF_SUFFIXES:
        pixels = _read_tiff(path, level)
    else:
        if level:
            raise InferError(f"{path}: --level applies to pyramidal TIFF files only")
        pixels = _read_pillow(path)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:  # RGBA: composite over white, as a viewer shows it
        alpha = pixels[..., 3:4].astype(np.float32) / 255
        pixels = (pixels[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise InferError(f"{path}: expected an 8-bit RGB image, got {pixels.dtype} with shape {pixels.shape}")
    if min(pixels.shape[:2]) < 1:
        raise InferError(f"{path}: the image is empty")
    return pixels


def _check_size(path: Path, height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise InferError(
            f"{path}: {width}x{height} pixels is more than {MAX_PIXELS // 1_000_000} megapixels; choose a lower "
            "--level of the pyramid (the model wants about 1 micron a pixel) or crop the region of interest"
        )


def _read_tiff(path: Path, level: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            levels = tif.series[0].levels
            if not 0 <= level < len(levels):
                raise InferError(f"{path}: --level {level} does not exist; the file has levels 0..{len(levels) - 1}")
            shape = levels[level].shape
            if len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4):  # planar (C, H, W)
                _check_size(path, shape[1], shape[2])
                return np.moveaxis(levels[level].asarray(), 0, -1)
            _check_size(path, shape[0], shape[1] if len(shape) > 1 else 1)
            return levels[level].asarray()
    except InferError:
        raise
    except Exception as exc:  # tifffile raises many types: bad headers, codecs it lacks (pip install imagecodecs)
        raise InferError(f"{path}: cannot read as TIFF ({type(exc).__name__}: {exc})") from exc


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            _check_size(path, image.height, image.width)
            if image.mode not in ("RGB", "RGBA"):
                raise InferError(f"{path}: colour mode {image.mode}; an H&E image must be RGB")
            return np.asarray(image)
    except InferError:
        raise
    except Exception as exc:  # Pillow raises several types for unreadable or truncated files
        raise InferError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc


def tissue_fraction(image: np.ndarray, stride: int) -> np.ndarray:
    """Share of each ``stride`` cell's pixels that are stained tissue: HSV saturation above ``SATURATION`` and not
    near black (scanner borders). Computed a band of cells at a time, so it costs little memory."""
    rows, cols = -(-image.shape[0] // stride), -(-image.shape[1] // stride)
    out = np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        band = image[r * stride : (r + 1) * stride]
        high = band.max(axis=-1).astype(np.int16)
        low = band.min(axis=-1).astype(np.int16)
        tissue = ((high - low) > SATURATION * high) & (high > 30)
        padded = np.zeros((stride, cols * stride), dtype=bool)
        padded[: tissue.shape[0], : tissue.shape[1]] = tissue
        out[r] = padded.reshape(stride, cols, stride).mean(axis=(0, 2))
    return out


class CellWindows:
    """The 96x96 window centred on each listed cell, read on demand (a ``PatchReader`` for the engine)."""

    def __init__(self, image: np.ndarray, cells: np.ndarray, stride: int) -> None:
        pad = (WINDOW - stride) // 2
        self.padded = np.pad(image, ((pad, pad + stride), (pad, pad + stride), (0, 0)), constant_values=255)
        self.cells = cells
        self.stride = stride

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index: slice) -> np.ndarray:
        s = self.stride
        return np.stack([self.padded[r * s : r * s + WINDOW, c * s : c * s + WINDOW] for r, c in self.cells[index]])


def score_slide(
    runs: Sequence[str | os.PathLike[str]],
    image_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    level: int = 0,
    stride: int = CENTRE,
    min_tissue: float = 0.1,
    tta: str = "none",
    threshold: float = 0.5,
    batch_size: int | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Score every tissue cell of ``image_path`` with the mean of ``runs``; write the outputs; return the summary."""
    if stride < 8 or stride > WINDOW or stride % 2:
        raise InferError(f"--stride {stride}: must be an even number of pixels from 8 to {WINDOW}")
    if not 0.0 <= min_tissue <= 1.0:
        raise InferError(f"--min-tissue {min_tissue}: must be within [0, 1]")
    if not 0.0 <= threshold <= 1.0:
        raise InferError(f"--threshold {threshold}: must be within [0, 1]")
    started = time.perf_counter()
    image = read_image(image_path, level=level)
    predictor = Predictor(runs, tta=tta, batch_size=batch_size, precision=precision)
    fraction = tissue_fraction(image, stride)
    scored = fraction >= min_tissue  # all cells when min_tissue is 0
    cells = np.argwhere(scored)
    probabilities = predictor.predict(CellWindows(image, cells, stride), label="slide")
    heatmap = np.full(fraction.shape, np.nan, dtype=np.float32)
    heatmap[scored] = probabilities  # argwhere and boolean indexing share row-major order

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "heatmap.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, heatmap)
    frame = pd.DataFrame(
        {
            "row": cells[:, 0],
            "col": cells[:, 1],
            "x": cells[:, 1] * stride,
            "y": cells[:, 0] * stride,
            "tissue": fraction[scored].round(3),
            "probability": probabilities,
        }
    )
    with atomic_path(out / "cells.csv") as tmp:
        frame.to_csv(tmp, index=False)
    summary = {
        "image": str(image_path),
        "level": level,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "stride": stride,
        "cells": int(heatmap.size),
        "cells_scored": len(cells),
        "min_tissue": min_tissue,
        "threshold": threshold,
        "cells_at_or_above_threshold": int((probabilities >= threshold).sum()),
        "max_probability": float(probabilities.max()) if len(cells) else None,
        "mean_probability": float(probabilities.mean()) if len(cells) else None,
        "runs": [str(r) for r in runs],
        "tta": tta,
        "precision": predictor.precision,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _plot(image, heatmap, stride, summary, out / "heatmap.png")
    atomic_write_json(out / "summary.json", summary)
    return summary


def _plot(image: np.ndarray, heatmap: np.ndarray, stride: int, summary: dict[str, Any], target: Path) -> None:
    """The image with each scored cell tinted by its probability; the tint's opacity grows with it, so tissue the
    model finds benign stays readable and glass is left as it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = plt.get_cmap("YlOrRd")
    p = np.nan_to_num(heatmap, nan=0.0)
    overlay = cmap(p)
    overlay[..., 3] = np.where(np.isfinite(heatmap), 0.1 + 0.65 * p, 0.0)
    step = max(1, -(-max(image.shape[:2]) // THUMBNAIL))
    height, width = image.shape[:2]
    fig, ax = plt.subplots(figsize=(9, 9 * height / width), dpi=120)
    ax.imshow(image[::step, ::step], extent=(0, width, height, 0))
    cells_extent = (0, heatmap.shape[1] * stride, heatmap.shape[0] * stride, 0)
    ax.imshow(overlay, extent=cells_extent, interpolation="nearest")
    ax.set(xlim=(0, width), ylim=(height, 0), xticks=[], yticks=[])
    ax.set_title(
        f"{Path(summary['image']).name}: {summary['cells_at_or_above_threshold']} of {summary['cells_scored']} "
        f"tissue cells at P >= {summary['threshold']:g}",
        fontsize=10,
    )
    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
    fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02, label="P(tumour in the cell)")
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
