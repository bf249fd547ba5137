"""Decode one patch file (or an upload's bytes) into 96x96 RGB pixels, and say what is wrong with it.

Ingest, ``predict`` on a folder and the web app's uploads all decode through here, so they accept and refuse
exactly the same files, with the same problem kinds (:mod:`histodetect.data.problems`).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image

from histodetect.data.store import PATCH_BYTES, PATCH_SHAPE

__all__ = ["Decoded", "decode_bytes", "decode_patch", "raw_tiff_rgb"]

TIFF_INTEGER_TYPES = {3: "H", 4: "I"}  # TIFF field types SHORT and LONG, as struct codes
NEXT_IFD = -1  # key of :func:`_tiff_tags`'s result for the offset of a TIFF's next page (not a real tag)
TIFF_BITS_PER_SAMPLE = 258
MODE_NAMES = {
    "1": "1-bit black and white",
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "P": "palette",
    "PA": "palette with alpha",
    "RGBA": "RGB with alpha",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "I": "32-bit integer",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "F": "32-bit float",
}

# What a decoder returns for one file: pixels (None when unusable), their SHA-1, and (kind, detail) problems.
Decoded = tuple[np.ndarray | None, str | None, list[tuple[str, str]]]


def decode_patch(path: str) -> Decoded:
    """Decode one image file into HWC uint8 RGB pixels and their SHA-1 (called by the decoding workers).

    The file is read in one call and decoded from memory. Competition patches (baseline uncompressed RGB TIFF)
    take :func:`raw_tiff_rgb`, about ten times faster than PIL; anything else, including every damaged or odd
    file, goes through PIL, which also says what is wrong with it.
    """
    try:
        data = _read_regular_file(path)
    except OSError as exc:
        return None, None, [("unreadable", f"cannot read the file ({exc.strerror or exc})")]
    if data is None:
        return None, None, [("not_a_file", "not a regular file (a FIFO, socket or device); not read")]
    return decode_bytes(data)


def _read_regular_file(path: str) -> bytes | None:
    """The bytes of ``path``, or None when it is not a regular file. Opened without blocking and checked on
    the open file itself, so a FIFO named ``x.tif`` cannot hang ingest (reading one waits for a writer)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read()


def decode_bytes(data: bytes) -> Decoded:
    """:func:`decode_patch` for an image already in memory (an upload to ``serve``): the same checks."""
    if not data:
        return None, None, [("empty_file", "0 bytes")]
    pixels = raw_tiff_rgb(data)
    if pixels is not None:
        return pixels, hashlib.sha1(pixels).hexdigest(), []
    with warnings.catch_warnings():
        # PIL warns about the corruption it then raises on; the exception is what gets reported.
        warnings.simplefilter("ignore")
        try:
            return _decode_with_pil(data)
        except Image.UnidentifiedImageError:  # its message names the in-memory buffer, which helps nobody
            return None, None, [("unreadable", "not an image format Pillow recognises (TIFF, PNG, JPEG...)")]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return None, None, [("unreadable", f"not a decodable image ({exc})")]


def raw_tiff_rgb(data: bytes) -> np.ndarray | None:
    """The pixels of a well-formed, uncompressed, 8-bit RGB, 96x96 TIFF, or None to let PIL decide.

    Such a file is a small header plus the raw HWC bytes in one or more strips, so the pixels can be sliced
    out after reading a dozen tags. Any tag that could change their meaning (compression, predictor, planar
    layout, extra samples, sample format, bit order) must be absent or at its baseline value, and the strips
    must lie inside the file. Pixels equal PIL's decode byte for byte (the tests check every real patch).
    """
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(data[:4])
    if order is None:
        return None
    try:
        tags = _tiff_tags(data, order)
    except struct.error:
        return None
    height, width, channels = PATCH_SHAPE
    required = {256: (width,), 257: (height,), 258: (8,) * channels, 259: (1,), 262: (2,), 277: (channels,)}
    baseline = {266: (1,), 284: (1,), 317: (1,), 339: (1,) * channels}
    if any(tags.get(tag) != value for tag, value in required.items()) or 338 in tags:
        return None
    if any(tags.get(tag, value) not in (value, value[:1]) for tag, value in baseline.items()):
        return None
    if tags.get(NEXT_IFD) != (0,):  # a second page: PIL counts the pages, and the file is refused
        return None
    offsets, counts = tags.get(273, ()), tags.get(279, ())
    if not offsets or len(offsets) != len(counts) or sum(counts) != PATCH_BYTES:
        return None
    if any(offset + count > len(data) for offset, count in zip(offsets, counts, strict=True)):
        return None
    strips = b"".join(data[offset : offset + count] for offset, count in zip(offsets, counts, strict=True))
    return np.frombuffer(strips, dtype=np.uint8).reshape(PATCH_SHAPE)


def _tiff_tags(data: bytes, order: str) -> dict[int, tuple[int, ...]]:
    """The integer (SHORT/LONG) tags of a TIFF's first image; other types map to () so they never match.
    Key ``NEXT_IFD`` holds the offset of the next image (0 when the file has one page)."""
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (n_tags,) = struct.unpack_from(order + "H", data, ifd)
    tags: dict[int, tuple[int, ...]] = {NEXT_IFD: struct.unpack_from(order + "I", data, ifd + 2 + 12 * n_tags)}
    for entry in range(ifd + 2, ifd + 2 + 12 * n_tags, 12):
        tag, kind, count = struct.unpack_from(order + "HHI", data, entry)
        code = TIFF_INTEGER_TYPES.get(kind)
        if code is None:
            tags[tag] = ()
            continue
        where = entry + 8
        if count * struct.calcsize(code) > 4:  # the values do not fit in the entry: it holds their offset
            (where,) = struct.unpack_from(order + "I", data, where)
        tags[tag] = struct.unpack_from(f"{order}{count}{code}", data, where)
    return tags


def _decode_with_pil(data: bytes) -> Decoded:
    """Size and mode are checked from the header before decoding, so an odd or huge file costs nothing."""
    with Image.open(io.BytesIO(data)) as image:
        found = _shape_problems(image)
        if found:
            return None, None, found
        image.load()
        pixels = np.asarray(image)
    return pixels, hashlib.sha1(pixels).hexdigest(), []


def _shape_problems(image: Image.Image) -> list[tuple[str, str]]:
    """Wrong size, any mode but 8-bit RGB (grayscale, RGBA, 16-bit, palette, CMYK...), more than 8 bits per
    channel (which PIL opens as 'RGB', silently keeping the top 8 bits), or more than one page."""
    height, width, _ = PATCH_SHAPE
    found = []
    if image.size != (width, height):
        found.append(("wrong_size", f"{image.size[0]}x{image.size[1]} pixels, expected {width}x{height}"))
    if image.mode != "RGB":
        what = MODE_NAMES.get(image.mode, "not 8-bit RGB")
        found.append(("wrong_mode", f"mode {image.mode!r} ({what}) in a {image.format} file, expected 8-bit 'RGB'"))
    elif bits := _bits_beyond_8(image):
        detail = f"{bits} bits per channel in a {image.format} file, expected 8 (cutting them would change the data)"
        found.append(("wrong_depth", detail))
    if (pages := getattr(image, "n_frames", 1)) > 1:
        found.append(("multi_page", f"{pages} pages (images) in one {image.format} file, expected one patch"))
    return found


def _bits_beyond_8(image: Image.Image) -> int | None:
    """Bits per channel of an 'RGB' image stored deeper than 8 bits (16-bit TIFF or PNG), else None."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(TIFF_BITS_PER_SAMPLE) if tags is not None else None
    if bits is not None:
        deepest = max(bits) if isinstance(bits, tuple) else int(bits)
        return deepest if deepest > 8 else None
    rawmodes = [args if isinstance(args, str) else (args or ("",))[0] for *_, args in image.tile]
    return 16 if any(";16" in str(rawmode) for rawmode in rawmodes) else None
