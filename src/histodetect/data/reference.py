"""Which slides of a cohort hold tumour: a Camelyon16 reference CSV.

Camelyon16 ships its truth as ``reference.csv``: a row per slide, ``image,type[,...]`` with ``type`` ``Tumor`` or
``Normal`` (the official file has no header and adds the metastasis size and the primary; a header row
``image,type,...`` is accepted too). The image is named with or without its extension (``test_001`` or
``test_001.tif``); slides are matched by name without it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from histodetect.data.sources import IMAGE_SUFFIXES
from histodetect.data.wsi import SLIDE_ONLY_SUFFIXES, TIFF_SUFFIXES
from histodetect.errors import InferError

TYPES = {"tumor": True, "tumour": True, "normal": False}
MAX_BYTES = 16 * 1024 * 1024  # a reference of a few thousand slides is a few hundred KB
# a row may name its slide with any suffix slide reads (a slide file, a plain image) or its outlines' .xml
KNOWN_SUFFIXES = SLIDE_ONLY_SUFFIXES | TIFF_SUFFIXES | IMAGE_SUFFIXES | {".xml"}


def read_reference(path: str | os.PathLike[str]) -> dict[str, bool]:
    """slide name (no extension) -> True for a tumour slide, False for a normal one."""
    path = Path(path)
    try:
        if not path.is_file():
            raise InferError(f"{path}: no such reference file")
        if path.stat().st_size > MAX_BYTES:
            raise InferError(f"{path}: over {MAX_BYTES // 2**20} MB; a reference CSV is a row per slide")
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InferError(f"{path}: not a readable reference CSV ({exc})") from exc
    truth: dict[str, bool] = {}
    first_line: dict[str, int] = {}
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise InferError(f"{path}, line {number}: expected image,type (Tumor or Normal)")
        image, kind = row[0].strip(), row[1].strip()
        if number == 1 and kind.lower() not in TYPES and image.lower() in ("image", "slide", "name"):
            continue  # a header
        if kind.lower() not in TYPES:
            raise InferError(f"{path}, line {number}: type {kind[:40]!r} for {image[:80]!r}; expected Tumor or Normal")
        name = _stem(image)
        if not name:
            raise InferError(f"{path}, line {number}: no image name")
        if name in truth:
            raise InferError(f"{path}, line {number}: {name!r} again (first on line {first_line[name]})")
        truth[name], first_line[name] = TYPES[kind.lower()], number
    if not truth:
        raise InferError(f"{path}: no slide in it; expected rows of image,type (Tumor or Normal)")
    return truth


def _stem(image: str) -> str:
    """``test_001.tif`` -> ``test_001``; a name without a known extension stays as it is."""
    name = Path(image).name
    suffix = Path(name).suffix.lower()
    return name[: -len(suffix)] if suffix in KNOWN_SUFFIXES else name
