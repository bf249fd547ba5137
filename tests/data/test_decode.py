"""Patch decoding (``data.decode``) and the table of problem kinds (``data.problems``) ingest reports from."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import histodetect
from histodetect.data.decode import decode_bytes, decode_patch, raw_tiff_rgb
from histodetect.data.problems import ERROR, KINDS, WARNING, check_kind, markdown_table
from histodetect.data.sources import Problem


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


TIFF_VARIANTS = {
    # name: (writer, whether the raw fast path may take it); every variant must decode to the same pixels
    "pil-uncompressed": (lambda path, a: Image.fromarray(a).save(path, format="TIFF"), True),
    "multi-strip": (lambda path, a: tifffile.imwrite(path, a, photometric="rgb", rowsperstrip=10), True),
    "big-endian": (lambda path, a: tifffile.imwrite(path, a, photometric="rgb", byteorder=">"), True),
    "lzw": (lambda path, a: Image.fromarray(a).save(path, format="TIFF", compression="tiff_lzw"), False),
    "deflate": (lambda path, a: tifffile.imwrite(path, a, photometric="rgb", compression="zlib"), False),
    "png": (lambda path, a: Image.fromarray(a).save(path, format="PNG"), False),
}


@pytest.mark.parametrize("variant", TIFF_VARIANTS)
def test_every_encoding_decodes_to_the_same_pixels(sample_dir: Path, tmp_path: Path, variant: str) -> None:
    """The raw TIFF fast path takes only what it can read exactly; everything else goes to PIL."""
    write, fast = TIFF_VARIANTS[variant]
    original = next((sample_dir / "train").glob("*.tif"))
    expected = pixels_of(original)
    write(tmp_path / "patch.tif", expected)
    pixels, digest, found = decode_patch(str(tmp_path / "patch.tif"))
    assert found == [] and digest == original.stem
    np.testing.assert_array_equal(pixels, expected)
    assert (raw_tiff_rgb((tmp_path / "patch.tif").read_bytes()) is not None) == fast
    assert raw_tiff_rgb(original.read_bytes()) is not None  # the competition's own files


def test_an_upload_decodes_as_its_file_does(sample_dir: Path) -> None:
    original = next((sample_dir / "train").glob("*.tif"))
    from_file, from_bytes = decode_patch(str(original)), decode_bytes(original.read_bytes())
    np.testing.assert_array_equal(from_file[0], from_bytes[0])
    assert from_file[1:] == from_bytes[1:] == (original.stem, [])
    assert decode_bytes(b"")[2] == [("empty_file", "0 bytes")]


def _kinds_in_source() -> set[tuple[str, str]]:
    """(kind, severity) of every problem the package's source creates with a literal kind."""
    found = set()
    for path in Path(histodetect.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            kind = node.args[0].value
            if name in ("error", "warning") and isinstance(kind, str) and "_" in kind and kind.islower():
                found.add((kind, ERROR if name == "error" else WARNING))
    return found


def test_every_kind_the_code_reports_is_in_the_table() -> None:
    found = _kinds_in_source()
    assert len(found) > 20  # the scan still finds the checks
    for kind, severity in found:
        assert severity in KINDS[kind].severities, kind


def test_a_kind_outside_the_table_is_refused() -> None:
    with pytest.raises(ValueError, match="is not in"):
        Problem("made_up", ERROR, None, None, None, "")
    with pytest.raises(ValueError, match="severity 'error'"):
        check_kind("csv_bom", ERROR)  # a warning kind, never an error


def test_fatal_kinds_are_errors_and_spoken_kinds_warnings() -> None:
    for kind in KINDS.values():
        assert not kind.fatal or kind.severities == (ERROR,), kind.name
        assert not kind.spoken or kind.severities == (WARNING,), kind.name
        assert kind.meaning and not kind.meaning.endswith("."), kind.name


def test_markdown_table_lists_every_kind_once() -> None:
    lines = markdown_table().splitlines()
    assert len(lines) == 2 + len(KINDS)
    assert all(line.count("|") == 6 for line in lines)
