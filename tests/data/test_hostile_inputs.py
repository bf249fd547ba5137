"""Hostile inputs to the data layer (annotations, masks, slide headers), grouped by the class of failure each
one caused before: a TRACEBACK (now one line naming the file), a HANG (now refused by a bound before the work) or
a SILENT ACCEPT (now an error or a warning). Each ``pytest.raises`` matches the one-line ``InferError``."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodetect.data.annotations import MAX_POLYGON_VERTICES, check_fits, read_area, read_polygons
from histodetect.data.tissue import region_mask
from histodetect.data.wsi import ArrayReader, open_slide
from histodetect.errors import InferError

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def feature(**fields: object) -> dict[str, object]:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]}, "properties": {}, **fields}


def hollow_svs(path: Path, side: int, mpp: float, tile: int = 4096) -> Path:
    """An Aperio SVS header claiming ``side`` x ``side`` pixels with no tile data (every offset and count zero): a
    few hundred KB that OpenSlide opens and would rebuild tile by missing tile."""
    n = (-(-side // tile)) ** 2
    desc = (
        f"Aperio Image Library v12.0.15\r\n{side}x{side} [0,0 {side}x{side}] ({tile}x{tile}) "
        f"JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}"
    ).encode() + b"\0"
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, None), (259, 3, 1, 7), (262, 3, 1, 2)]
    entries += [(270, 2, len(desc), None), (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile)]
    entries += [(324, 4, n, None), (325, 4, n, None)]
    extra = 8 + 2 + 12 * len(entries) + 4
    blobs: list[bytes] = []
    ifd = []
    for tag, kind, count, value in entries:
        if value is not None:
            packed = (
                struct.pack("<HHII", tag, kind, count, value)
                if kind == 4
                else struct.pack("<HHIHH", tag, kind, count, value, 0)
            )
            ifd.append(packed)
            continue
        data = {258: struct.pack("<3H", 8, 8, 8), 270: desc, 324: bytes(4 * n), 325: bytes(4 * n)}[tag]
        ifd.append(struct.pack("<HHII", tag, kind, count, extra + sum(len(b) for b in blobs)))
        blobs.append(data + b"\0" * (len(data) % 2))
    header = b"II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(ifd) + b"\0\0\0\0"
    path.write_bytes(header + b"".join(blobs))
    return path


# ---------------------------------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"type": "FeatureCollection", "features": None}, "'features' must be a list"),
        ({"type": "FeatureCollection", "features": 7}, "'features' must be a list"),
        ({"type": "FeatureCollection", "features": [feature(geometry="Polygon")]}, "geometry is a str"),
        ({"type": "FeatureCollection", "features": [feature(geometry=[1, 2])]}, "geometry is a list"),
        ({"type": "FeatureCollection", "features": [feature(properties="tumour")]}, "properties are a str"),
        ({"type": "FeatureCollection", "features": [feature(properties=[1])]}, "properties are a list"),
        ({"type": "FeatureCollection", "features": [3]}, "feature 0 is a int"),
    ],
    ids=[
        "features null",
        "features a number",
        "geometry a string",
        "geometry a list",
        "properties a string",
        "properties a list",
        "feature a number",
    ],
)
def test_geojson_of_the_wrong_types_is_one_line(tmp_path: Path, data: object, says: str) -> None:
    with pytest.raises(InferError, match=says):
        read_polygons(write_json(tmp_path / "a.geojson", data))


def test_geojson_nested_100000_deep_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.geojson"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InferError, match="nested too deeply"):
        read_polygons(path)


def test_nan_coordinates_are_refused_in_geojson_and_asap_xml(tmp_path: Path) -> None:
    bad = [[0, 0], [float("nan"), 0], [100, 100], [0, 100], [0, 0]]
    path = tmp_path / "nan.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [bad]}))  # json writes NaN, as the battery did
    with pytest.raises(InferError, match="not a finite number"):
        read_polygons(path)
    coords = "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(bad))
    xml = tmp_path / "nan.xml"
    xml.write_text(
        f'<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="Tumor"><Coordinates>{coords}'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    with pytest.raises(InferError, match="not a finite number"):
        read_polygons(xml)


def test_xml_bombs_and_external_entities_are_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.xml"
    bomb.write_text(
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
        "<ASAP_Annotations>&b;</ASAP_Annotations>"
    )
    external = tmp_path / "external.xml"
    external.write_text(
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<ASAP_Annotations>&x;</ASAP_Annotations>"
    )
    for path in (bomb, external):
        with pytest.raises(InferError, match="DTD or entities is refused"):
            read_polygons(path)


def test_a_png_mask_claiming_a_huge_size_is_refused_before_decoding(tmp_path: Path) -> None:
    """The header says 20000x19150 (and 100000x100000: Pillow's own bomb error): refused, never decoded."""
    reader = ArrayReader(np.full((64, 64, 3), 255, np.uint8))
    for width, height in ((20_000, 19_150), (100_000, 100_000)):
        path = tmp_path / f"mask-{width}.png"
        Image.new("1", (8, 8)).save(path)
        data = bytearray(path.read_bytes())
        data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height (its CRC then fails: no matter)
        path.write_bytes(bytes(data))
        with pytest.raises(InferError, match=str(path.name)):
            region_mask(path, reader, 32.0, (2, 2))


def test_a_slide_header_claiming_absurd_dimensions_or_mpp_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(InferError, match="header claims 600000x600000"):
        open_slide(hollow_svs(tmp_path / "huge.svs", 600_000, 0.25))
    from histodetect.infer.slide import choose_scale

    for mpp in (1e-5, 1e-7):
        with (
            open_slide(hollow_svs(tmp_path / f"tiny-{mpp}.svs", 20_000, mpp)) as reader,
            pytest.raises(InferError, match="not credible"),
        ):
            choose_scale(reader, 0.972)


# ---------------------------------------------------------------------------------------------------- hangs
def test_a_polygon_of_too_many_vertices_is_refused_before_geos_works_on_it(tmp_path: Path) -> None:
    """A 10^6-vertex zig-zag took GEOS past 300 s; the bound is checked first."""
    n = MAX_POLYGON_VERTICES + 1
    x = np.arange(n, dtype=float)
    zigzag = [*np.column_stack([x, (x % 2) * 100]).tolist(), [n, -10], [0, -10], [0, 0]]
    path = write_json(tmp_path / "zigzag.geojson", {"type": "Polygon", "coordinates": [zigzag]})
    with pytest.raises(InferError, match="vertices; at most"):
        read_polygons(path)


def test_a_hollow_slide_ends_with_one_line_once_its_tissue_view_runs_past_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header claiming 100,000 px a side (under MAX_SIDE) with no tile data read for hours (OpenSlide makes every
    missing tile); the tissue view judges its pace and stops. The budget is shrunk here, not the slide grown."""
    from histodetect.data import tissue

    monkeypatch.setattr(tissue, "BAND_PIXELS", 1)  # a band per row of cells: the pace is known after the first
    monkeypatch.setattr(tissue, "PACE_SECONDS", 0.0)
    monkeypatch.setattr(tissue, "TISSUE_SECONDS", 1e-9)
    with (
        open_slide(hollow_svs(tmp_path / "hollow.svs", 8192, 0.972)) as reader,
        pytest.raises(InferError, match=r"hollow.svs: finding the tissue would take .* tiles are missing"),
    ):
        tissue.tissue_fraction(reader, 32.0, (256, 256))
    monkeypatch.setattr(tissue, "TISSUE_SECONDS", 600.0)
    fraction, _ = tissue.tissue_fraction(ArrayReader(np.full((64, 64, 3), 255, np.uint8)), 32.0, (2, 2))
    assert fraction.shape == (2, 2)  # within the budget: done as before


# ---------------------------------------------------------------------------------------------------- silent accepts
def test_a_self_crossing_outline_is_repaired_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bowtie = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
    path = write_json(tmp_path / "bowtie.geojson", {"type": "Polygon", "coordinates": [bowtie]})
    area, notes = read_area(path)
    assert area.area == pytest.approx(5000) and notes and "repaired 1 polygon" in notes[0]
    with caplog.at_level(logging.WARNING):
        read_polygons(path)
    assert "cross themselves" in caplog.text


def test_polygons_beyond_the_slide_are_refused(tmp_path: Path) -> None:
    area = read_polygons(write_json(tmp_path / "a.geojson", {"type": "Polygon", "coordinates": [SQUARE]}))
    check_fits(area, "a.geojson", "slide", 100, 100)  # exactly the slide
    with pytest.raises(InferError, match="beyond slide"):
        check_fits(area, "a.geojson", "slide", 50, 50)


def test_a_slide_only_format_that_openslide_refuses_is_an_error_not_a_plain_image(tmp_path: Path) -> None:
    path = tmp_path / "truncated.svs"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(path, format="TIFF")  # Pillow reads it, OpenSlide does not
    with pytest.raises(InferError, match=r"OpenSlide cannot read it as a \.svs slide"):
        open_slide(path)


def test_a_fifo_or_a_symlink_loop_named_as_a_slide_is_named(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    with pytest.raises(InferError, match="not a regular file"):
        open_slide(fifo)
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    with pytest.raises(InferError, match="leads nowhere"):
        open_slide(loop)


def test_ingest_warns_of_a_label_spelled_1e0_and_of_columns_it_does_not_read(sample_dir: Path, tmp_path: Path) -> None:
    """Before, ``1e0`` was taken as 1 and an extra column ignored, both without a word."""
    import shutil

    from histodetect.data.ingest import ingest

    source = tmp_path / "source"
    shutil.copytree(sample_dir, source)
    lines = (source / "train_labels.csv").read_text().splitlines()
    first_id, first_label = lines[1].split(",")
    rows = [f"{first_id},{first_label}e0,checked"] + [f"{line},ok" for line in lines[2:]]
    (source / "train_labels.csv").write_text("\n".join(["id,label,note", *rows]) + "\n")
    result = ingest(source, tmp_path / "store", progress=False)
    assert result.exit_code == 0
    kinds = {(p["kind"], p.get("id")) for p in result.report["problems"]}
    assert ("label_format", first_id) in kinds
    assert any(kind == "csv_extra_column" for kind, _ in kinds)
    assert result.store is not None and result.store.labels[list(result.store.ids).index(first_id)] == int(first_label)


def test_a_reference_naming_slides_with_any_slide_suffix_matches_them(tmp_path: Path) -> None:
    """SILENT MISMATCH before: ``region.png`` or ``b.mrxs`` in a reference matched no slide (only .tif/.svs/... were
    cut), so a scored slide was reported both 'not in the reference' and 'not scored'. A BOM and CRLF are read."""
    from histodetect.data.reference import read_reference

    path = tmp_path / "reference.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,type\r\nregion.png,Tumor\r\nb.mrxs,Normal\r\nc.jpeg,Normal\r\nd.v2,Tumor\r\n")
    assert read_reference(path) == {"region": True, "b": False, "c": False, "d.v2": True}


def test_a_file_name_that_is_not_utf8_is_an_unsafe_id() -> None:
    """TRACEBACK before: a name in another encoding reached the CSV writer (UnicodeEncodeError) or matplotlib."""
    from histodetect.data.ids import first_unsafe, text_problem, unsafe_reason

    name = os.fsdecode(b"patch-\xe9")  # what Python makes of a Latin-1 file name
    assert first_unsafe(["a", "b", name]) == 2 and "not UTF-8" in str(unsafe_reason(name))
    assert text_problem(name) and text_problem("tab\there") and text_problem("a..b") is None
