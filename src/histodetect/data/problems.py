"""Every kind of problem ingest can report, in one table: what it means, how grave it is, whether it is spoken.

Ingest's checks, its terminal summary, the EDA report and the docs' list of problem kinds all read this table,
so a new check is one row here and cannot be half-registered: :class:`~histodetect.data.sources.Problem`
refuses a kind or a severity the table does not hold.

- ``severities``: ``error`` drops the item (and refuses the ingest unless ``--skip-bad``); ``warning`` keeps it.
  ``duplicate_id`` is either, depending on whether the repeated rows agree.
- ``fatal``: the labels cannot be known, so ingest stops before reading any image, even with ``--skip-bad``,
  and shows only these errors (not the ones they caused).
- ``spoken``: a warning printed in full after a successful ingest, not only counted (it changes what the store
  can be used for).
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Kind:
    """One problem kind: its ``name`` in the report, the severities it comes with, and what it means."""

    name: str
    severities: tuple[str, ...]
    meaning: str
    fatal: bool = False
    spoken: bool = False


_E, _W = (ERROR,), (WARNING,)
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        # the CSVs: any of these makes the labels unknowable
        Kind("csv_missing_header", _E, "a CSV whose first line looks like data, or that holds no rows", fatal=True),
        Kind("csv_missing_column", _E, "a CSV header without a column it needs (`id`, `label`)", fatal=True),
        Kind("csv_unreadable", _E, "a CSV that cannot be read, is not UTF-8 or is not valid CSV", fatal=True),
        Kind("csv_multiline_field", _E, "a CSV field spanning several lines", fatal=True),
        Kind("csv_field_too_large", _E, "a CSV field too large to be an id or a label", fatal=True),
        Kind("csv_bom", _W, "a CSV starting with a byte-order mark (read without it)"),
        Kind("csv_blank_line", _W, "blank lines in a CSV (skipped)"),
        Kind("csv_spaces", _W, "an id read without its surrounding spaces"),
        Kind("csv_extra_column", _W, "a CSV column no one reads"),
        # labels and ids
        Kind("bad_label", _E, "a label that is not 0 or 1 (or a PCam `_y.h5` of another length than its `_x.h5`)"),
        Kind("label_format", _W, "a 0 or 1 spelled otherwise (e.g. `1e0`)"),
        Kind("unsafe_id", _E, "an id that is not a safe file name (path separators, control characters...)"),
        Kind(
            "duplicate_id",
            (ERROR, WARNING),
            "an id listed twice: an error when the rows or files disagree "
            "(conflicting labels, several files or splits), a warning when identical rows are kept once",
        ),
        Kind("id_not_sha1", _W, "a competition-style id that is not the SHA-1 of the image's pixels"),
        Kind("missing_image", _E, "an id listed in a CSV with no image file"),
        Kind("unlabeled_image", _E, "a training image with no row in the labels CSV"),
        Kind("unlisted_image", _W, "a test image not in the sample submission"),
        Kind("missing_labels", _W, "a PCam split without its `_y.h5` labels (stored unlabeled)"),
        Kind("ignored_file", _W, "a file that is not an image, or lies outside the layout (not read)"),
        # the images
        Kind("unreadable", _E, "a file that cannot be read or decoded as an image (or an HDF5 file without `x`)"),
        Kind("empty_file", _E, "a 0-byte image file"),
        Kind("not_a_file", _E, "a FIFO, socket or device named like an image (not read)"),
        Kind("wrong_size", _E, "an image that is not 96x96 pixels"),
        Kind("wrong_mode", _E, "an image that is not 8-bit RGB (grayscale, RGBA, palette, CMYK...)"),
        Kind("wrong_depth", _E, "more than 8 bits per channel (cutting them would change the data)"),
        Kind("multi_page", _E, "several pages (images) in one file"),
        Kind("duplicate_pixels", _E, "the same pixels already stored under another id (the copy is not kept)"),
        # slide groups (histodetect.data.groups)
        Kind("bad_meta", _E, "a PCam meta CSV not row for row with its HDF5 file, or a row without slide or place"),
        Kind("bad_group", _E, "an id of `--groups FILE` in two groups, or with an empty or unprintable group"),
        Kind("pcam_test_leak", _W, "test patches found among `--pcam-meta`'s PCam patches (not used)", spoken=True),
        Kind("no_group", _W, "labelled patches without a slide group", spoken=True),
        Kind("group_not_recorded", _W, "unlabeled patches with a group (groups are kept for labelled patches only)"),
        Kind("group_unknown_id", _W, "ids of `--groups FILE` that were not ingested"),
    )
}
FATAL_KINDS = frozenset(name for name, kind in KINDS.items() if kind.fatal)
SPOKEN_KINDS = frozenset(name for name, kind in KINDS.items() if kind.spoken)


def check_kind(name: str, severity: str) -> None:
    """Refuse a problem the table does not describe: a programming error, caught by the tests, never by a user."""
    kind = KINDS.get(name)
    if kind is None or severity not in kind.severities:
        raise ValueError(f"problem kind {name!r} with severity {severity!r} is not in histodetect.data.problems.KINDS")


def markdown_table() -> str:
    """The table as Markdown, for the docs' list of problem kinds (a test keeps the docs equal to it)."""
    rows = ["| kind | severity | fatal | spoken | meaning |", "| --- | --- | --- | --- | --- |"]
    for kind in KINDS.values():
        flags = ("yes" if kind.fatal else "", "yes" if kind.spoken else "")
        rows.append(f"| `{kind.name}` | {' or '.join(kind.severities)} | {flags[0]} | {flags[1]} | {kind.meaning} |")
    return "\n".join(rows)
