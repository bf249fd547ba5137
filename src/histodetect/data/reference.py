"""Which slides are tumour and which normal: a reference CSV in Camelyon16's own format.

Camelyon16 ships ``reference.csv`` as ``image,type[,...]`` rows (``test_001,Tumor,Macro``): the slide's name with or
without its file extension, ``Tumor`` or ``Normal``, and columns that do not matter here (the lesion size class).
A header row (``image,type``) may be there or not. Every row is checked: a type other than Tumor/Tumour/Normal, an
empty name, or a slide named twice is refused, naming the file and the line, since a cohort judged against a
reference with a typo in it is judged wrongly without anyone noticing.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from histodetect.errors import InferError

TYPES = {"tumor": True, "tumour": True, "normal": False}  # type (lower case) -> whether the slide holds tumour
HEADER = ("image", "type")
EXTENSION = re.compile(r"\.[A-Za-z]{1,5}$")  # a file extension (.tif, .svs, .ndpi, .mrxs): not part of the name


def slide_key(name: str) -> str:
    """How a slide and a reference row are matched: the name without its file extension (``test_001``)."""
    return EXTENSION.sub("", name.strip())


def read_reference(path: str | os.PathLike[str]) -> dict[str, bool]:
    """``slide_key`` of every row's image -> True for a tumour slide, False for a normal one."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InferError(f"{path}: cannot read the reference CSV ({exc})") from exc
    tumour: dict[str, bool] = {}
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue  # a blank line
        if line == 1 and tuple(c.lower() for c in cells[:2]) == HEADER:
            continue
        if len(cells) < 2 or not cells[0]:
            raise InferError(f"{path}: line {line}: expected image,type (e.g. test_001,Tumor), got {','.join(row)!r}")
        key, kind = slide_key(cells[0]), cells[1].lower()
        if kind not in TYPES:
            raise InferError(f"{path}: line {line}: type {cells[1]!r} for {cells[0]!r}; expected Tumor or Normal")
        if key in seen:
            raise InferError(f"{path}: line {line}: {cells[0]!r} is listed again (first on line {seen[key]})")
        seen[key] = line
        tumour[key] = TYPES[kind]
    if not tumour:
        raise InferError(f"{path}: no slide in the reference CSV")
    return tumour


def is_tumour(reference: dict[str, bool], slide: Path) -> bool | None:
    """What ``reference`` says of ``slide``; None when it does not list it."""
    return reference.get(slide_key(slide.name))
