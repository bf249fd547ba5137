"""Whole-slide images and plain image regions behind one reader interface.

A slide is never held in memory: :class:`OpenSlideReader` reads regions on demand from any format OpenSlide knows
(Aperio SVS with JPEG or JPEG 2000, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, DICOM, generic tiled TIFF).
Plain images (PNG, JPEG, untiled TIFF: a region exported from a viewer) have no pyramid and must be decoded whole,
so :class:`ArrayReader` holds them, up to ``MAX_PIXELS``. Both expose what the slide scorer needs: level sizes and
downsamples, the microns per pixel when the file records it, and ``read_region`` in OpenSlide's convention
(location in level-0 pixels, size in pixels of the level), uint8 RGB with white beyond the image, as glass.

An :class:`OpenSlideReader` pickles as its path and reopens itself in a new process, so worker processes (forked or
spawned) never share the parent's file handle.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histodetect.errors import InferError

MAX_PIXELS = 250_000_000  # ~750 MB as RGB: the most a plain image (no pyramid, decoded whole) may have
MAX_SIDE = 500_000  # pixels: the largest scanners make ~200,000; a header claiming more is not a slide
MAX_READ_PIXELS = 64_000_000  # ~190 MB as RGBA: the most one read may ask of a level (checked before reading)
# Formats only OpenSlide reads: a file with one of these suffixes that OpenSlide refuses is damaged, never a plain
# image (Pillow would decode a truncated SVS's first strip at the model's scale, ignoring the slide's own).
SLIDE_ONLY_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".btf"})
CM_PER_MICRON = 1e-4
WHITE = 255
# Area averaging, as pyramid levels are made: on real patches upscaled to 0.5 um/px and brought back it changed a
# run's probabilities less than Lanczos, bicubic or bilinear (mean 0.04-0.05 vs 0.05-0.09).
RESAMPLING = Image.Resampling.BOX


class SlideReader(ABC):
    """A slide or an image region: levels, resolution, and regions read on demand."""

    path: Path | None
    kind: str  # what reads it: "openslide" or "memory"
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) of each level, finest first
    level_downsamples: tuple[float, ...]
    mpp: float | None  # microns per level-0 pixel, when the file records it
    in_memory: bool  # True when reading a region costs no decoding (no reader threads needed)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "array"

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 ``(h, w, 3)`` RGB of ``size`` (w, h) level pixels from ``location`` (x, y) in level-0 pixels; parts
        beyond the image are white."""
        if not 0 <= level < len(self.level_dimensions):
            raise InferError(
                f"{self.name}: level {level} does not exist; it has levels 0..{len(self.level_dimensions) - 1}"
            )
        width, height = size
        if width < 1 or height < 1:
            raise InferError(f"{self.name}: cannot read a {width}x{height} region")
        return self._read((int(location[0]), int(location[1])), level, (int(width), int(height)))

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (the closest from the finer side)."""
        fitting = [k for k, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(fitting, key=lambda k: self.level_downsamples[k]) if fitting else 0

    def read_scaled(
        self, box: tuple[float, float, float, float], size: tuple[int, int], level: int | None = None
    ) -> np.ndarray:
        """uint8 ``(h, w, 3)``: the level-0 rectangle ``box`` (x0, y0, x1, y1, fractions allowed) resampled to
        ``size`` (w, h), read from ``level`` (default: the coarsest level still at least as fine as asked).

        When the rectangle falls on whole pixels of the level at the asked size, the pixels are returned as read:
        no resampling, so a slide at the model's own scale is scored on its exact pixels."""
        x0, y0, x1, y1 = box
        width, height = size
        if level is None:
            level = self.best_level(min((x1 - x0) / width, (y1 - y0) / height))
        d = self.level_downsamples[level]
        lx0, ly0, lx1, ly1 = x0 / d, y0 / d, x1 / d, y1 / d
        exact = all(abs(v - round(v)) < 1e-6 for v in (lx0, ly0, lx1, ly1))
        if exact and round(lx1 - lx0) == width and round(ly1 - ly0) == height:
            return self.read_region((round(lx0 * d), round(ly0 * d)), level, (width, height))
        # One pixel of context beyond the rectangle for the resampling filter; PIL's box keeps sub-pixel offsets.
        ix0, iy0 = math.floor(lx0) - 1, math.floor(ly0) - 1
        ix1, iy1 = math.ceil(lx1) + 1, math.ceil(ly1) + 1
        if (ix1 - ix0) * (iy1 - iy0) > MAX_READ_PIXELS:
            raise InferError(
                f"{self.name}: reading {ix1 - ix0}x{iy1 - iy0} pixels of level {level} for one view; over "
                f"{MAX_READ_PIXELS // 1_000_000} megapixels: the slide lacks a coarse enough level, or its header "
                "(dimensions, microns per pixel) is not credible"
            )
        pixels = self.read_region((round(ix0 * d), round(iy0 * d)), level, (ix1 - ix0, iy1 - iy0))
        inner = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        return np.asarray(Image.fromarray(pixels).resize((width, height), RESAMPLING, box=inner))

    def read_scaled_bands(
        self,
        box: tuple[float, float, float, float],
        size: tuple[int, int],
        level: int,
        *,
        step: int = 1,
        max_rows: int | None = None,
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """:meth:`read_scaled` of ``box`` at ``size`` from ``level``, top to bottom in bands of whole rows of the
        output: ``(first row, end row, pixels)``. Each band reads at most half of ``MAX_READ_PIXELS`` of the level,
        so a slide without coarse levels is read too (in more bands); band heights are multiples of ``step`` rows
        (whole cells of a grid) and at most ``max_rows`` (when given, rounded down to ``step``)."""
        x0, y0, x1, y1 = box
        width, height = size
        d = self.level_downsamples[level]
        per_row = ((x1 - x0) / d + 3) * ((y1 - y0) / d / height + 3)  # level pixels one output row reads
        band = max(step, int(MAX_READ_PIXELS // 2 // per_row) // step * step)
        if max_rows is not None:
            band = min(band, max(step, max_rows // step * step))
        for r0 in range(0, height, band):
            r1 = min(height, r0 + band)
            rows = (x0, y0 + r0 * (y1 - y0) / height, x1, y0 + r1 * (y1 - y0) / height)
            yield r0, r1, self.read_scaled(rows, (width, r1 - r0), level=level)

    def thumbnail(self, longest: int) -> np.ndarray:
        """The whole image with its longest side ``longest`` pixels (or its own size when smaller); read in bands
        (:meth:`read_scaled_bands`), so a slide without coarse levels is shown too."""
        width, height = self.dimensions
        scale = min(1.0, longest / max(width, height))
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        level = self.best_level(min(width / out_w, height / out_h))
        bands = self.read_scaled_bands((0, 0, width, height), (out_w, out_h), level)
        return np.concatenate([pixels for _, _, pixels in bands])

    @abstractmethod
    def close(self) -> None:
        """Release the file; the reader reopens it if used again."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArrayReader(SlideReader):
    """An image held in memory as uint8 RGB: one level, no decoding per read."""

    kind = "memory"
    in_memory = True

    def __init__(self, pixels: np.ndarray, *, path: Path | None = None, mpp: float | None = None) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3 or min(pixels.shape[:2]) < 1:
            where = path.name if path is not None else "array"
            raise InferError(f"{where}: expected a non-empty 8-bit RGB image, got {pixels.dtype} {pixels.shape}")
        self.pixels = pixels
        self.path = path
        self.mpp = mpp
        self.level_dimensions = ((pixels.shape[1], pixels.shape[0]),)
        self.level_downsamples = (1.0,)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        (x, y), (width, height) = location, size
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        image_h, image_w = self.pixels.shape[:2]
        sx0, sy0 = max(x, 0), max(y, 0)
        sx1, sy1 = min(x + width, image_w), min(y + height, image_h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = self.pixels[sy0:sy1, sx0:sx1]
        return out

    def close(self) -> None:
        """Nothing to release: the pixels stay with the reader."""


class OpenSlideReader(SlideReader):
    """A slide file read through OpenSlide, region by region."""

    kind = "openslide"
    in_memory = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._pid = -1
        slide = self._slide()
        self.vendor = str(slide.properties.get("openslide.vendor", "unknown"))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.mpp = _mpp(path, slide.properties)

    def _slide(self) -> Any:
        """The OpenSlide handle of this process (a forked worker opens its own)."""
        import openslide

        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, OSError) as exc:
                raise InferError(f"{self.path}: OpenSlide cannot open it ({exc})") from exc
            self._pid = os.getpid()
        return self._handle

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(self._slide().read_region(location, level, size))
        except (openslide.OpenSlideError, OSError) as exc:  # a truncated or damaged tile
            raise InferError(f"{self.path}: cannot read the region at {location}, level {level} ({exc})") from exc
        return over_white(rgba)

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1}


def over_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGBA image composited over white, as a viewer shows it (OpenSlide leaves the space beyond a slide's
    scanned area transparent)."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.float32) / 255
    return (rgba[..., :3] * a + WHITE * (1 - a)).round().astype(np.uint8)


def _mpp(path: Path, properties: Any) -> float | None:
    """OpenSlide's ``openslide.mpp-x/y`` (their mean when they differ slightly); None when absent."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            values.append(float(properties[key]))
        except (KeyError, ValueError):
            return None
    if min(values) <= 0:
        return None
    if abs(values[0] - values[1]) > 0.05 * max(values):
        raise InferError(f"{path}: pixels are not square ({values[0]} x {values[1]} microns); not supported")
    return sum(values) / 2


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """A reader for ``path``: OpenSlide when it recognises the file, else a plain image decoded into memory. Refuses,
    naming the file, what is neither."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise InferError(f"{path}: a symbolic link that leads nowhere (a loop, or its target is gone)")
    if not path.exists():
        raise InferError(f"{path}: no such slide or image")
    if path.is_dir():
        raise InferError(f"{path}: a folder, not a slide file")
    if not path.is_file():
        raise InferError(f"{path}: not a regular file (a FIFO, socket or device); give a slide file")
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        vendor = None
    if vendor is not None:
        return _credible(OpenSlideReader(path))
    if path.suffix.lower() in SLIDE_ONLY_SUFFIXES:
        raise InferError(f"{path}: OpenSlide cannot read it as a {path.suffix} slide (truncated or damaged?)")
    pixels, mpp = _read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else _read_pillow(path)
    return ArrayReader(pixels, path=path, mpp=mpp)


def _credible(reader: OpenSlideReader) -> OpenSlideReader:
    """Refuse a header that claims more than any scanner makes, before anything is read from it (a 480 KB file can
    claim 10^6 x 10^6 pixels, and OpenSlide would rebuild every missing tile)."""
    width, height = reader.dimensions
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        reader.close()
        raise InferError(
            f"{reader.path}: the header claims {width}x{height} pixels; a slide has 1..{MAX_SIDE:,} a side"
        )
    return reader


def _check_size(path: Path, height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise InferError(
            f"{path}: {width}x{height} pixels in a file OpenSlide does not read; a plain image is decoded whole, so "
            f"at most {MAX_PIXELS // 1_000_000} megapixels: save the slide as a tiled pyramidal TIFF or crop it"
        )


def _read_tiff(path: Path) -> tuple[np.ndarray, float | None]:
    """An untiled TIFF (OpenSlide reads tiled ones): its first image, and its resolution when given per cm, as
    OpenSlide reads it for generic TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape = page.shape
            planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
            _check_size(
                path, shape[-2] if planar else shape[0], shape[-1] if planar else shape[1] if len(shape) > 1 else 1
            )
            pixels = page.asarray()
            mpp = None
            if page.tags.get("ResolutionUnit") is not None and int(page.tags["ResolutionUnit"].value) == 3:
                numerator, denominator = page.tags["XResolution"].value
                if numerator > 0:
                    mpp = denominator / numerator / CM_PER_MICRON
    except InferError:
        raise
    except Exception as exc:  # tifffile raises many types: bad headers, truncated strips, unknown codecs
        raise InferError(f"{path}: cannot read as a slide or TIFF ({type(exc).__name__}: {exc})") from exc
    if planar:
        pixels = np.moveaxis(pixels, 0, -1)
    return _rgb(path, pixels), mpp


def _read_pillow(path: Path) -> tuple[np.ndarray, None]:
    try:
        with Image.open(path) as image:
            _check_size(path, image.height, image.width)
            if image.mode not in ("RGB", "RGBA"):
                raise InferError(f"{path}: colour mode {image.mode}; an H&E image must be RGB")
            return _rgb(path, np.asarray(image)), None
    except InferError:
        raise
    except Exception as exc:  # Pillow raises several types for unknown, unreadable or truncated files
        raise InferError(
            f"{path}: not a slide or image OpenSlide or Pillow can read ({type(exc).__name__}: {exc})"
        ) from exc


def _rgb(path: Path, pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[-1] == 4 and pixels.dtype == np.uint8:
        pixels = over_white(pixels)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise InferError(f"{path}: expected an 8-bit RGB image, got {pixels.dtype} with shape {pixels.shape}")
    return pixels
