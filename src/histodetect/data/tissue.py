"""Where the tissue is: the share of each cell that is stained tissue, from a low-resolution view of the slide.

Glass is most of a slide's area, so the slide scorer reads and scores only cells with tissue. The view is read at a
few pixels per cell (from the pyramid level closest to that, band by band, so memory does not grow with the slide);
a pixel is tissue when its HSV saturation is above an Otsu threshold (stain is saturated, glass and white fat are
not) and it is not near black (scanner borders, slide labels). Otsu is clamped to ``SATURATION_RANGE``: on a region
that is all tissue, or all glass, the unclamped split would fall inside one class. Holes smaller than a cell are
filled and specks smaller than a quarter cell removed (scikit-image morphology). The view has a time budget
(``TISSUE_SECONDS``, judged from its pace): a hollow file or one without coarse levels ends with one line.
The slide scorer selects cells by the tissue share of their 96 px window (:func:`window_share`).

``--mask`` narrows the scored cells to a region: a PNG (the slide's shape at any scale; nonzero = inside) or
polygons (GeoJSON or ASAP XML, level-0 pixels); a cell is inside when its centre is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import correlate1d
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from histodetect.data.annotations import check_fits, inside, read_polygons
from histodetect.data.wsi import MAX_READ_PIXELS, SlideReader
from histodetect.errors import InferError

SATURATION_RANGE = (0.04, 0.08)  # bounds of the Otsu threshold on saturation
DARK = 30  # brightest channel below this: black, not stain
MASK_PIXELS = 32_000_000  # at most this many pixels in the tissue view (4 per cell side when they fit, else 2, 1)
BAND_PIXELS = 4_000_000  # pixels of the view read at once
TISSUE_SECONDS = 600.0  # the most the tissue view may take (a slide's is seconds; scoring takes longer anyway)
PACE_SECONDS = 5.0  # the view's pace is judged once it has read for this long
SHAPE_TOLERANCE = 0.02  # a PNG mask's aspect ratio may differ from the slide's by this much (rounding)


def tissue_fraction(reader: SlideReader, cell: float, grid: tuple[int, int]) -> tuple[np.ndarray, float]:
    """float32 ``grid`` (rows, cols): the tissue share of each ``cell``-sized (level-0 pixels) cell; and the
    saturation threshold used."""
    rows, cols = grid
    k = next((k for k in (4, 2) if rows * cols * k * k <= MASK_PIXELS), 1)
    saturation = np.zeros((rows * k, cols * k), dtype=np.uint8)
    level = reader.best_level(cell / k)
    # Bands of whole rows of cells, each at most BAND_PIXELS of the view and a share of MAX_READ_PIXELS of the level
    # (a slide without coarse levels reads more of it).
    bands = reader.read_scaled_bands(
        (0, 0, cols * cell, rows * cell), (cols * k, rows * k), level, step=k, max_rows=BAND_PIXELS // (cols * k)
    )
    start = time.monotonic()
    for r0, r1, view in bands:
        saturation[r0:r1] = _saturation(view)
        _within_budget(reader, level, time.monotonic() - start, r1 / (rows * k))
    threshold = _otsu(saturation)
    tissue = saturation > round(threshold * 255)
    if k > 1:
        tissue = remove_small_holes(tissue, max_size=k * k)
        tissue = remove_small_objects(tissue, max_size=k * k // 4)
    return tissue.reshape(rows, k, cols, k).mean(axis=(1, 3), dtype=np.float32), threshold


def _within_budget(reader: SlideReader, level: int, elapsed: float, done: float) -> None:
    """Stop a tissue view that would take more than ``TISSUE_SECONDS``, judged from its pace once it has run for
    ``PACE_SECONDS``: a hollow file (a header claiming a large slide, its tiles missing, which OpenSlide rebuilds one
    by one from finer levels) or a slide without coarse levels would otherwise read for hours."""
    if done >= 1 or elapsed < PACE_SECONDS:
        return
    expected = elapsed / done
    if expected > TISSUE_SECONDS:
        width, height = reader.level_dimensions[level]
        raise InferError(
            f"{reader.name}: finding the tissue would take about {expected / 60:.0f} minutes ({done:.1%} of level "
            f"{level}, {width}x{height} pixels, in {elapsed:.0f} s); over the {TISSUE_SECONDS / 60:.0f}-minute "
            "budget: the slide lacks coarse levels, or its tiles are missing (a damaged or hollow file)"
        )


def window_share(fraction: np.ndarray, cell: int = 32, window: int = 96) -> np.ndarray:
    """The tissue share of each cell's ``window`` (model pixels) centred on it, for cells of ``cell`` pixels: the
    cell and the parts of its 8 neighbours the window covers (all of them at 32 px, half at 48, none at 96), glass
    beyond the grid. Cells are selected by this rather than by their own share: a patch whose centre is fat but
    whose window is tissue is a question the model was trained on, and the heatmap keeps no holes for it."""
    margin = (window - cell) / 2
    weights = np.array([margin, cell, margin]) / window
    share = correlate1d(fraction, weights, axis=0, mode="constant")
    return correlate1d(share, weights, axis=1, mode="constant").astype(np.float32)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """uint8 HSV saturation (0-255), 0 for near-black pixels."""
    high = rgb.max(axis=-1).astype(np.int32)
    low = rgb.min(axis=-1).astype(np.int32)
    s = np.where(high >= DARK, (high - low) * 255 // np.maximum(high, 1), 0)
    return s.astype(np.uint8)


def _otsu(saturation: np.ndarray) -> float:
    counts = np.bincount(saturation.ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:
        return SATURATION_RANGE[0]
    threshold = threshold_otsu(hist=(counts, np.arange(256))) / 255
    return float(np.clip(threshold, *SATURATION_RANGE))


def region_mask(path: str | os.PathLike[str], reader: SlideReader, cell: float, grid: tuple[int, int]) -> np.ndarray:
    """bool ``grid``: the cells whose centre lies inside the region ``path`` outlines (PNG mask or polygons)."""
    path = Path(path)
    rows, cols = grid
    x = (np.arange(cols) + 0.5) * cell
    y = (np.arange(rows) + 0.5) * cell
    if path.suffix.lower() != ".png":
        area = read_polygons(path)
        check_fits(area, path, reader.name, *reader.dimensions)
        xx, yy = np.meshgrid(x, y)
        return inside(area, xx, yy)
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_READ_PIXELS:  # checked on the header, before decoding
                raise InferError(
                    f"{path}: a {image.width}x{image.height} mask; at most {MAX_READ_PIXELS // 1_000_000} megapixels "
                    "(a mask may be at any scale: save a smaller one)"
                )
            mask = np.asarray(image.convert("L")) > 0
    except InferError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InferError(f"{path}: not a readable PNG mask ({str(exc)[:200]})") from None
    width, height = reader.dimensions
    ratio = (mask.shape[1] / mask.shape[0]) / (width / height)
    if abs(ratio - 1) > SHAPE_TOLERANCE:
        raise InferError(
            f"{path}: a {mask.shape[1]}x{mask.shape[0]} mask does not have the shape of {reader.name} "
            f"({width}x{height}); it must cover the whole slide, at any scale"
        )
    col = np.minimum((x * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    row = np.minimum((y * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    return mask[row[:, None], col[None, :]]
