"""Find out what an ingest SOURCE holds and list every patch it promises, before a single pixel is decoded.

:func:`discover` recognises four layouts and turns each into a :class:`Plan`: the image files to decode (or
the PCam HDF5 files to stream) with their ids, labels and splits, plus every :class:`Problem` that can be seen
from names and CSV files alone (a labeled id without an image, an image without a label, conflicting rows,
bad labels, unsafe ids). Keeping this apart from decoding lets ingest stop on a broken CSV before reading any
image, and lets the tests check the bookkeeping without pixels.

Safety rule: a path is never built from text found in the data. Folders are listed and their entries matched
to CSV ids by name, so an id like ``../evil`` or a file called ``..x.tif`` can only produce an ``unsafe_id``
error; it can never make ingest read or write outside the folders it was given.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py

from histodetect.data.ids import looks_like_sha1, shown, unsafe_reason
from histodetect.data.problems import ERROR, FATAL_KINDS, WARNING, check_kind
from histodetect.data.store import PATCH_SHAPE, Place
from histodetect.errors import IngestError

IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg"})
SPLIT_ORDER = ("train", "valid", "test")
PCAM_X = re.compile(r"^camelyonpatch_level_2_split_(?P<split>[A-Za-z0-9]+)_x\.h5$")
PCAM_META_SUFFIX = "_meta.csv"  # camelyonpatch_level_2_split_<split>_meta.csv: each patch's slide and position
LABELS_CSV = "train_labels.csv"
PLAIN_LABELS = frozenset({"0", "1", "0.0", "1.0"})  # other spellings of 0 and 1 (1e0, +1) are read with a warning
SUBMISSION_CSV = "sample_submission.csv"
DEFAULT_CLASS_DIRS = ("0", "1")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: an ``error`` drops the item (or refuses the ingest); a warning not."""

    kind: str
    severity: str
    split: str | None
    id: str | None
    file: str | None
    detail: str

    def __post_init__(self) -> None:
        check_kind(self.kind, self.severity)

    @classmethod
    def about(cls, item: Item, kind: str, severity: str, detail: str) -> Problem:
        return cls(kind, severity, item.split, item.id, item.source, detail)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


class Problems(list[Problem]):
    """The problems found so far, with shorthands that keep each check to one line."""

    def error(self, kind: str, split: str | None, id_: str | None, file: str | None, detail: str) -> None:
        self.append(Problem(kind, ERROR, split, id_, file, detail))

    def warning(self, kind: str, split: str | None, id_: str | None, file: str | None, detail: str) -> None:
        self.append(Problem(kind, WARNING, split, id_, file, detail))


@dataclass(frozen=True)
class Item:
    """One patch to store: an image file (``path``) or row ``source`` of a PCam HDF5 file (``path`` None), with
    its slide and position when the data's metadata says (``place``)."""

    id: str
    split: str
    label: int | None
    source: str
    path: Path | None = None
    place: Place | None = None


@dataclass(frozen=True)
class H5Part:
    """A PCam split: (N, 96, 96, 3) uint8 pixels under key ``x``, (N, 1, 1, 1) labels under ``y`` or none, and
    the metadata CSV beside them (``meta``: each patch's slide and position, row for row) or none."""

    split: str
    x: Path
    y: Path | None
    count: int
    meta: Path | None = None


@dataclass
class Plan:
    """Everything :func:`discover` found: what to decode and what is already known to be wrong."""

    root: Path
    layout: str
    items: list[Item] = field(default_factory=list)
    h5: list[H5Part] = field(default_factory=list)
    problems: Problems = field(default_factory=Problems)

    @property
    def fatal(self) -> bool:
        return any(p.kind in FATAL_KINDS for p in self.problems)

    @property
    def capacity(self) -> int:
        return len(self.items) + sum(part.count for part in self.h5)


def discover(source: Path, *, labels: Path | None = None, class_dirs: str | None = None) -> Plan:
    """Recognise SOURCE's layout and list its patches; :class:`IngestError` when it cannot be read at all.

    Layouts, in the order they are tried:

    - one ``camelyonpatch_level_2_split_<split>_x.h5`` file, or a folder holding such files (PCam; split
      names kept);
    - ``class_dirs="NEG,POS"`` given, or ``0/`` and ``1/`` present: folder per class, split ``train``;
    - ``labels`` given: a bare folder of images labeled by that CSV, split ``train``;
    - ``train/`` and/or ``test/`` present: the competition layout (``train_labels.csv``,
      ``sample_submission.csv``);
    - otherwise a bare folder of images without labels, split ``test`` (patches to predict on).
    """
    if not source.exists():
        raise IngestError(f"{source}: no such file or folder")
    if not (source.is_file() or source.is_dir()):
        raise IngestError(f"{source}: not a regular file or folder (a FIFO, socket or device)")
    if source.is_file():
        if not PCAM_X.match(source.name):
            raise IngestError(
                f"{source}: a single file must be a PCam camelyonpatch_level_2_split_<split>_x.h5; "
                "give a folder for images"
            )
        plan = _pcam(source.parent, [source])
    elif pcam := sorted(p for p in source.iterdir() if PCAM_X.match(p.name)):
        plan = _pcam(source, pcam)
    elif class_dirs is not None or all((source / name).is_dir() for name in DEFAULT_CLASS_DIRS):
        plan = _class_folders(source, _class_names(class_dirs))
    elif labels is not None:
        if _is_competition(source) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in source.iterdir()):
            raise IngestError(
                f"{source}: a competition folder (train/, test/) takes its labels from train_labels.csv; --labels is "
                f"for a bare folder of images, e.g. {source / 'train'}"
            )
        plan = _bare_folder(source, labels)
    elif _is_competition(source):
        plan = _competition(source)
    else:
        plan = _bare_folder(source, None)
    if not plan.capacity and not plan.problems:
        raise IngestError(f"{source}: no patches found (no .tif/.tiff/.png/.jpg/.jpeg images or PCam .h5 files)")
    plan.problems.extend(_ids_in_several_splits(plan.items))
    plan.items.sort(key=lambda item: (split_rank(item.split), item.id))
    return plan


def _is_competition(source: Path) -> bool:
    return (source / "train").is_dir() or (source / "test").is_dir()


def split_rank(split: str) -> tuple[int, str]:
    """Sort key: train, valid, test, then any other split by name; also decides which duplicate is kept."""
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


# ------------------------------------------------------------------------------------------------ layouts
def _competition(root: Path) -> Plan:
    plan = Plan(root, "competition")
    if (root / "train").is_dir():
        if not (root / LABELS_CSV).is_file():
            raise IngestError(f"{root}: train/ has no {LABELS_CSV} beside it")
        table = _read_csv(root / LABELS_CSV, root, "train", with_labels=True, problems=plan.problems)
        if table is not None:
            images = _list_images(root / "train", root, "train", plan.problems)
            plan.items += _match_labeled(images, table, "train", LABELS_CSV, root, plan.problems)
    if (root / "test").is_dir():
        listed = None
        if has_submission := (root / SUBMISSION_CSV).is_file():
            listed = _read_csv(root / SUBMISSION_CSV, root, "test", with_labels=False, problems=plan.problems)
        if listed is not None or not has_submission:
            images = _list_images(root / "test", root, "test", plan.problems)
            plan.items += _match_unlabeled(images, listed, "test", root, plan.problems)
    plan.problems.extend(_stray_images(root, root))
    return plan


def _bare_folder(root: Path, labels: Path | None) -> Plan:
    plan = Plan(root, "folder")
    if labels is None:
        images = _list_images(root, root, "test", plan.problems)
        plan.items += _match_unlabeled(images, None, "test", root, plan.problems)
        return plan
    if not labels.is_file():
        raise IngestError(f"{labels}: no such labels CSV")
    table = _read_csv(labels, root, "train", with_labels=True, problems=plan.problems)
    if table is None:
        return plan
    skip = {labels.name} if labels.resolve().parent == root.resolve() else None
    images = _list_images(root, root, "train", plan.problems, skip)
    plan.items += _match_labeled(images, table, "train", relative(labels, root), root, plan.problems)
    return plan


def _class_folders(root: Path, names: tuple[str, str]) -> Plan:
    plan = Plan(root, "class-folders")
    images: dict[str, list[tuple[Path, int]]] = defaultdict(list)
    for label, name in enumerate(names):
        if not (root / name).is_dir():
            raise IngestError(f"{root}: no class folder {name}/ (class folders given: {','.join(names)})")
        for id_, paths in _list_images(root / name, root, "train", plan.problems).items():
            images[id_] += [(path, label) for path in paths]
    for id_, entries in sorted(images.items()):
        if len(entries) > 1:
            plan.problems.append(_duplicate_files(id_, "train", [p for p, _ in entries], root))
        else:
            path, label = entries[0]
            plan.items.append(Item(id_, "train", label, relative(path, root), path))
    plan.problems.extend(_stray_images(root, root))
    return plan


def _pcam(root: Path, xs: list[Path]) -> Plan:
    plan = Plan(root, "pcam")
    for x in xs:
        split = PCAM_X.match(x.name)["split"]  # type: ignore[index]
        y = x.with_name(x.name[: -len("_x.h5")] + "_y.h5")
        part = _check_h5(split, x, y if y.is_file() else None, root, plan.problems)
        if part is not None:
            meta = pcam_meta_path(x)
            plan.h5.append(dataclasses.replace(part, meta=meta if meta.is_file() else None))
    plan.h5.sort(key=lambda part: split_rank(part.split))
    return plan


def pcam_meta_path(x: Path) -> Path:
    """Where the PCam release keeps the metadata CSV of the split whose pixels are ``x``."""
    return x.with_name(x.name[: -len("_x.h5")] + PCAM_META_SUFFIX)


def pcam_patch_count(x: Path, split: str, root: Path, problems: Problems) -> int | None:
    """Number of patches in a PCam ``_x.h5`` file (uint8 (N, 96, 96, 3) under ``x``); None, recorded, when unusable."""
    return _h5_dataset_len(x, "x", lambda rest: rest == PATCH_SHAPE, "(N, 96, 96, 3)", split, root, problems)


def _check_h5(split: str, x: Path, y: Path | None, root: Path, problems: Problems) -> H5Part | None:
    """Open a PCam pair just to check datasets and shapes; the pixels are streamed later, in chunks.

    Labels are accepted as (N, 1, 1, 1), as PCam ships them, or any shape with one value per patch, e.g. (N,).
    """
    count = pcam_patch_count(x, split, root, problems)
    if count is None:
        return None
    if y is None:
        detail = f"no {x.name[: -len('_x.h5')]}_y.h5 beside it: split {split!r} is stored unlabeled"
        problems.warning("missing_labels", split, None, relative(x, root), detail)
        return H5Part(split, x, None, count)
    labels = _h5_dataset_len(y, "y", lambda rest: math.prod(rest) == 1, "(N, 1, 1, 1)", split, root, problems)
    if labels is None:
        return None
    if labels != count:
        problems.error("bad_label", split, None, relative(y, root), f"{labels} labels for {count} patches in {x.name}")
        return None
    return H5Part(split, x, y, count)


def _h5_dataset_len(
    path: Path,
    key: str,
    fits: Callable[[tuple[int, ...]], bool],
    expected: str,
    split: str,
    root: Path,
    problems: Problems,
) -> int | None:
    """Length of uint8 dataset ``key`` whose per-patch shape ``fits``; else record why not and return None."""
    file = relative(path, root)
    try:
        with h5py.File(path, "r") as fh:
            ds = fh.get(key)
            if not isinstance(ds, h5py.Dataset):
                problems.error("unreadable", split, None, file, f"no dataset {key!r}")
                return None
            if ds.dtype != "uint8":
                problems.error("wrong_mode", split, None, file, f"{key} is {ds.dtype}, not uint8")
                return None
            if not ds.shape or not fits(tuple(ds.shape[1:])):
                problems.error("wrong_size", split, None, file, f"{key} has shape {ds.shape}, expected {expected}")
                return None
            return int(ds.shape[0])
    except OSError as exc:
        problems.error("unreadable", split, None, file, f"not a readable HDF5 file ({exc})")
        return None


# ------------------------------------------------------------------------------------------------ matching
def _match_labeled(
    images: dict[str, list[Path]],
    table: dict[str, int | None],
    split: str,
    csv_file: str,
    root: Path,
    problems: Problems,
) -> list[Item]:
    """Pair a labeled split's images with its CSV rows; ids on one side only are errors."""
    items = []
    for id_ in sorted(table.keys() - images.keys()):
        problems.error("missing_image", split, id_, csv_file, f"listed here, but no image in {split}")
    for id_, paths in sorted(images.items()):
        if len(paths) > 1:
            problems.append(_duplicate_files(id_, split, paths, root))
            continue
        if id_ not in table:
            problems.error("unlabeled_image", split, id_, relative(paths[0], root), f"image has no row in {csv_file}")
        items.append(Item(id_, split, table.get(id_), relative(paths[0], root), paths[0]))
    return items


def _match_unlabeled(
    images: dict[str, list[Path]],
    listed: dict[str, int | None] | None,
    split: str,
    root: Path,
    problems: Problems,
) -> list[Item]:
    """Pair an unlabeled split's images with the ids a sample submission lists (when there is one)."""
    items = []
    for id_ in sorted(listed.keys() - images.keys()) if listed is not None else ():
        problems.error("missing_image", split, id_, SUBMISSION_CSV, f"listed here, but no image in {split}")
    for id_, paths in sorted(images.items()):
        if len(paths) > 1:
            problems.append(_duplicate_files(id_, split, paths, root))
            continue
        if listed is not None and id_ not in listed:
            detail = f"not in {SUBMISSION_CSV}; ingested anyway"
            problems.warning("unlisted_image", split, id_, relative(paths[0], root), detail)
        items.append(Item(id_, split, None, relative(paths[0], root), paths[0]))
    return items


def _duplicate_files(id_: str, split: str, paths: list[Path], root: Path) -> Problem:
    files = ", ".join(sorted(relative(p, root) for p in paths))
    return Problem("duplicate_id", ERROR, split, id_, files, f"{len(paths)} image files for one id")


def _ids_in_several_splits(items: list[Item]) -> Problems:
    """An id must name one patch in the whole store, or predictions and splits keyed by id are ambiguous."""
    splits: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        splits[item.id].append(item)
    problems = Problems()
    for same in (same for same in splits.values() if len(same) > 1):
        detail = f"the same id is in splits {', '.join(sorted(i.split for i in same))}"
        for item in same:
            problems.error("duplicate_id", item.split, item.id, item.source, detail)
    return problems


# ------------------------------------------------------------------------------------------------ listing
def _list_images(
    folder: Path, root: Path, split: str, problems: Problems, skip: set[str] | None = None
) -> dict[str, list[Path]]:
    """Image files of ``folder`` by id (name without suffix); anything else there but ``skip`` is reported."""
    images: dict[str, list[Path]] = defaultdict(list)
    with os.scandir(folder) as entries:
        for entry in entries:
            if skip and entry.name in skip:
                continue
            path = folder / entry.name
            stem, dot, suffix = entry.name.rpartition(".")
            if entry.is_dir() or not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                problems.warning("ignored_file", split, None, relative(path, root), "not an image file; not read")
            elif reason := unsafe_reason(stem):
                problems.error("unsafe_id", split, stem, relative(path, root), f"{reason}; not read")
            else:
                images[stem].append(path)
    return images


def _stray_images(folder: Path, root: Path) -> Problems:
    """Images lying next to the layout's folders belong to no split; say so rather than ignore them."""
    problems = Problems()
    for name in sorted(os.listdir(folder)):
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and (folder / name).is_file():
            problems.warning("ignored_file", None, None, relative(folder / name, root), "outside the layout; not read")
    return problems


def _class_names(class_dirs: str | None) -> tuple[str, str]:
    if class_dirs is None:
        return DEFAULT_CLASS_DIRS
    names = tuple(name.strip() for name in class_dirs.split(","))
    if len(names) != 2 or any(unsafe_reason(name) or name in {"", "."} for name in names):
        raise IngestError(f"--class-dirs {class_dirs!r}: give two folder names inside SOURCE, negative first: NEG,POS")
    return names  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ CSV
def _read_csv(
    path: Path, root: Path, split: str, *, with_labels: bool, problems: Problems
) -> dict[str, int | None] | None:
    """Read an ``id[,label]`` CSV into {id: label}; label None when unknown, invalid or contradictory.

    Every irregularity becomes a problem: a BOM, blank lines or spaces around an id are tolerated (warnings;
    the id is read without them), a missing header or column or a file the csv module cannot parse is fatal
    (None is returned, so that the split is not matched and the fatal problem is not buried under one
    ``unlabeled_image`` per image), an unsafe id or a bad label is an error for that id, and an id listed
    twice is kept once (warning) unless its rows disagree (error: the id is dropped with --skip-bad).
    """
    table = csv_table(path, root, split, ("id", "label") if with_labels else ("id",), problems, known=("id", "label"))
    if table is None:
        return None
    file, at, body = table
    id_col, label_col = at[0], (at[1] if with_labels else None)
    seen: dict[str, list[tuple[int, str | None]]] = defaultdict(list)
    for line, row in body:
        raw = row[id_col] if id_col < len(row) else ""
        id_ = raw.strip()
        if reason := unsafe_reason(id_):
            problems.error("unsafe_id", split, raw, file, f"line {line}: {reason}; ignored")
            continue
        if id_ != raw:
            detail = f"line {line}: id {shown(raw)} has spaces around it; read as {shown(id_)}"
            problems.warning("csv_spaces", split, id_, file, detail)
        label = None if label_col is None else (row[label_col] if label_col < len(row) else "")
        seen[id_].append((line, label))
    return {id_: _settle_rows(id_, entries, split, file, problems) for id_, entries in seen.items()}


def csv_table(
    path: Path,
    root: Path,
    split: str | None,
    needed: tuple[str, ...],
    problems: Problems,
    expected: str | None = None,
    known: tuple[str, ...] | None = None,
) -> tuple[str, list[int], list[tuple[int, list[str]]]] | None:
    """A CSV's name for the report, the positions of its ``needed`` columns (named in its header, in any order,
    among others) and its body rows with their lines; None, with a fatal problem recorded, when it is unusable or
    lacks a column (``expected`` names the header wanted, default the needed columns). With ``known``, a column
    outside it is a warning (``csv_extra_column``): read by nothing, it is never dropped without a word."""
    file = relative(path, root)
    rows = csv_rows(path, file, split, problems)
    if rows is None:
        return None
    (_, header), body = rows[0], rows[1:]
    columns = [name.strip().lower() for name in header]
    if missing := [name for name in needed if name not in columns]:
        looks_like_data = bool(header) and (looks_like_sha1(header[0].strip()) or _parse_label(header[-1]) is not None)
        kind, what = (
            ("csv_missing_header", f"first line {','.join(header)!r} looks like data, not a header")
            if looks_like_data
            else ("csv_missing_column", f"header {','.join(header)!r} has no {missing}")
        )
        problems.error(kind, split, None, file, f"{what}; expected a header {expected or ','.join(needed)!r}")
        return None
    if known is not None and (extra := [name for name in columns if name not in known]):
        listed = ", ".join(shown(name) for name in extra[:5]) + (" ..." if len(extra) > 5 else "")
        problems.warning("csv_extra_column", split, None, file, f"column(s) {listed} are not read; ignored")
    return file, [columns.index(name) for name in needed], body


def csv_rows(path: Path, file: str, split: str | None, problems: Problems) -> list[tuple[int, list[str]]] | None:
    """Non-blank rows with the line each starts on; None, with a fatal problem recorded, when the file is unusable.

    The csv module parses the whole file, so a quoted field is one field wherever it ends. An id or a label never
    spans lines, so a field that does is fatal: it is almost always an unclosed quote that swallowed the rows
    after it. So is a field beyond the csv module's size limit. BOM and blank lines are warnings.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.error("csv_unreadable", split, None, file, f"cannot read the file ({exc.strerror or exc})")
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        problems.warning("csv_bom", split, None, file, "starts with a UTF-8 byte-order mark (ignored)")
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.error("csv_unreadable", split, None, file, f"not UTF-8 text ({exc})")
        return None
    rows: list[tuple[int, list[str]]] = []
    blank: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for row in reader:
            if any("\n" in cell or "\r" in cell for cell in row):
                detail = f"lines {start}-{reader.line_num}: a quoted field holds a line break (an unclosed quote?)"
                problems.error("csv_multiline_field", split, None, file, detail)
                return None
            if any(cell.strip() for cell in row):
                rows.append((start, row))
            else:
                blank.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            detail = f"line {start}: a field is longer than {csv.field_size_limit():,} characters (an unclosed quote?)"
            problems.error("csv_field_too_large", split, None, file, detail)
        else:
            problems.error("csv_unreadable", split, None, file, f"line {start}: not valid CSV ({exc})")
        return None
    if blank:
        where = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
        problems.warning("csv_blank_line", split, None, file, f"{len(blank)} blank line(s) skipped (line {where})")
    if not rows:
        problems.error("csv_missing_header", split, None, file, "the file holds no rows")
        return None
    return rows


def _settle_rows(
    id_: str, entries: list[tuple[int, str | None]], split: str, file: str, problems: Problems
) -> int | None:
    """The one label of an id's CSV rows, reporting bad labels and repeated rows."""
    if len(entries) > 1:
        labels = {raw.strip() if raw is not None else None for _, raw in entries}
        listed = f"listed {len(entries)} times (lines {', '.join(str(line) for line, _ in entries)})"
        if len(labels) > 1:
            detail = f"{listed} with conflicting labels {sorted(map(str, labels))}"
            problems.error("duplicate_id", split, id_, file, detail)
            return None
        problems.warning("duplicate_id", split, id_, file, f"{listed} with the same label; kept once")
    raw = entries[0][1]
    if raw is None:
        return None
    label = _parse_label(raw)
    if label is None:
        problems.error("bad_label", split, id_, file, f"line {entries[0][0]}: label {raw!r} is not 0 or 1")
    elif raw.strip() not in PLAIN_LABELS:
        detail = f"line {entries[0][0]}: label {shown(raw.strip())} read as {label}"
        problems.warning("label_format", split, id_, file, detail)
    return label


def _parse_label(raw: str) -> int | None:
    """0 or 1 (also written 0.0 / 1.0 by some tools); None for anything else."""
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def relative(path: Path, root: Path) -> str:
    """``path`` relative to SOURCE for the index and the report; a CSV outside SOURCE keeps its own path."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
