"""Camelyon16 reference CSVs: the official headerless form, a header, and one line for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from histodetect.data.reference import read_reference
from histodetect.errors import InferError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,Tumor\na.tif,Normal\n", "line 2: 'a' again (first on line 1)"),
        ("a,Tumour\nb,Metastasis\n", "line 2: type 'Metastasis'"),
        ("a\n", "line 1: expected image,type"),
        ("", "no slide in it"),
    ],
)
def test_a_bad_reference_is_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "reference.csv"
    path.write_text(text)
    with pytest.raises(InferError, match=re.escape(message)):
        read_reference(path)


def test_a_reference_with_a_header_reads_as_without(tmp_path: Path) -> None:
    path = tmp_path / "reference.csv"
    path.write_text("image,type,size\ntest_001.tif,Tumor,Macro\ntest_002,normal,\n")
    assert read_reference(path) == {"test_001": True, "test_002": False}
