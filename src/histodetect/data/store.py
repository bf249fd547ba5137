"""The packed store: what ``ingest`` writes and every later command reads.

Layout of a store folder (format version 2)::

    manifest.json   format name and version, patch shape, counts per split, creation time, command
    patches.u8      raw uint8 pixels, (N, H, W, 3) row-major: memory-mapped, never loaded whole
    index.csv       one row per patch: row, id, label (empty when unknown), split, source, sha1, and its slide
                    (group) and position on it (coord_x, coord_y), empty when unknown
    report.json     every problem ingest found, by file and kind

Raw bytes plus a manifest (rather than ``.npy``) follow nanoGPT: the file can be truncated in place when bad items
are skipped, and any tool can memory-map it. A store is built in a hidden sibling folder and renamed into place
by :meth:`StoreWriter.commit`, so an interrupted ingest never leaves a store that looks complete. Version 1
stores (without the last three index columns) still open, with every group and position unknown.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from histodetect import __version__
from histodetect.data.ids import first_bad_group, first_unsafe, group_problem, shown, unsafe_reason
from histodetect.errors import StoreError
from histodetect.io import atomic_write_json, atomic_write_text, fsync_path, remove_dead_leftovers

STORE_FORMAT = "histodetect-store"
STORE_VERSION = 2
READABLE_VERSIONS = (1, STORE_VERSION)
PATCH_SHAPE = (96, 96, 3)
PATCH_BYTES = PATCH_SHAPE[0] * PATCH_SHAPE[1] * PATCH_SHAPE[2]  # one patch, packed
UNLABELED = -1
NO_COORD = -1  # coord_x / coord_y of a patch whose position on its slide is unknown

MANIFEST = "manifest.json"
PATCHES = "patches.u8"
INDEX = "index.csv"
REPORT = "report.json"
INDEX_COLUMNS_V1 = ["row", "id", "label", "split", "source", "sha1"]
INDEX_COLUMNS = [*INDEX_COLUMNS_V1, "group", "coord_x", "coord_y"]
STORE_FILES = frozenset({MANIFEST, PATCHES, INDEX, REPORT})
LABEL_TEXT = ("", "0", "1")  # how index.csv writes unknown, negative, positive


def why_not_replaceable(path: str | os.PathLike[str], source: str | os.PathLike[str] | None = None) -> str | None:
    """Why ``--overwrite`` must not replace ``path``; None when it is a histodetect store and nothing else.

    Only an empty folder or one holding a store manifest and no file a store does not have is replaced, never the folder
    being ingested or one that contains it: ``--overwrite`` deletes what ingest made, never the user's data.
    """
    path = Path(path)
    if source is not None and Path(source).resolve().is_relative_to(path.resolve()):
        return f"is the source being ingested, or contains it ({source}); choose another --out"
    if not path.is_dir():
        return "is not a folder; --overwrite replaces only a store folder"
    if not any(path.iterdir()):  # an empty folder: nothing to lose
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        return f"is not a histodetect store (no store {MANIFEST}); --overwrite replaces only a store"
    others = sorted(entry.name for entry in path.iterdir() if entry.name not in STORE_FILES)
    if others:
        listed = ", ".join(shown(name) for name in others[:5]) + (" ..." if len(others) > 5 else "")
        return f"holds files that are not part of a store ({listed}); move them or choose another --out"
    return None


class Store:
    """A read-only view of a store folder.

    Pixels are memory-mapped lazily and the object pickles as its path, so it can be handed to DataLoader
    workers or DDP processes without copying 220,025 patches.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(
                f"{self.path}: not a histodetect store (no {MANIFEST}); create one with `histodetect ingest`"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise StoreError(f"{manifest_path}: unreadable manifest ({exc})") from exc
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{manifest_path}: not a histodetect store manifest")
        version = self.manifest.get("version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{manifest_path}: store format version {version} is not supported "
                f"(this histodetect reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                "re-run `histodetect ingest`"
            )
        try:
            self.patch_shape: tuple[int, int, int] = tuple(int(n) for n in self.manifest["patch_shape"])  # type: ignore[assignment]
            count = int(self.manifest["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{manifest_path}: damaged manifest (patch_shape or count: {exc!r})") from exc
        self.index = read_index(self.path / INDEX, version=version)
        expected = len(self.index) * int(np.prod(self.patch_shape))
        size = (self.path / PATCHES).stat().st_size if (self.path / PATCHES).exists() else -1
        if size != expected or len(self.index) != count:
            raise StoreError(
                f"{self.path}: {PATCHES} holds {size} bytes and the index {len(self.index)} rows, "
                f"but the manifest says {count} patches of {self.patch_shape}"
            )
        self._patches: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.index)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What the store holds, in one string: the SHA-256 of its ``manifest.json`` and ``index.csv`` (ids, labels,
        splits and each patch's SHA-1), so a re-ingested or edited store at the same path is told apart. Hashed once
        per opened store (the files do not change under a store that is open)."""
        digest = hashlib.sha256()
        for name in (MANIFEST, INDEX):
            digest.update((self.path / name).read_bytes())
            digest.update(b"\0")
        return "sha256:" + digest.hexdigest()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n={len(self)}, splits={self.manifest.get('splits')})"

    @property
    def patches(self) -> np.ndarray:
        """All pixels as a read-only (N, H, W, 3) uint8 memory map."""
        if self._patches is None:
            if len(self) == 0:
                return np.zeros((0, *self.patch_shape), dtype=np.uint8)
            self._patches = np.memmap(
                self.path / PATCHES, dtype=np.uint8, mode="r", shape=(len(self), *self.patch_shape)
            )
        return self._patches

    @property
    def ids(self) -> np.ndarray:
        return self.index["id"].to_numpy()

    @property
    def labels(self) -> np.ndarray:
        """int8 labels, ``UNLABELED`` (-1) where none is known."""
        return self.index["label"].to_numpy()

    @property
    def groups(self) -> np.ndarray:
        """Each patch's slide (or other group recorded at ingest), ``""`` where none is known."""
        return self.index["group"].to_numpy()

    @property
    def splits(self) -> list[str]:
        return sorted(self.index["split"].unique().tolist())

    def rows(self, split: str | Sequence[str] | None = None, labeled: bool | None = None) -> np.ndarray:
        """Row numbers of the patches in ``split`` (one name or several), optionally only (un)labeled ones."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            names = [split] if isinstance(split, str) else list(split)
            unknown = set(names) - set(self.splits)
            if unknown:
                raise StoreError(f"{self.path}: no split named {sorted(unknown)}; this store has {self.splits}")
            mask &= self.index["split"].isin(names).to_numpy()
        if labeled is not None:
            mask &= (self.labels != UNLABELED) == labeled
        return np.flatnonzero(mask)

    def read(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Pixels of ``rows`` as an (n, H, W, 3) uint8 array; sorted reads keep the memory map sequential."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.patch_shape), dtype=np.uint8)
        out[order] = self.patches[rows[order]]
        return out

    @property
    def report(self) -> dict[str, Any]:
        path = self.path / REPORT
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def read_index(path: Path, version: int = STORE_VERSION) -> pd.DataFrame:
    """A store's ``index.csv``, checked: its columns, rows numbered 0..N-1, labels 0, 1 or empty, ids unique and
    safe (an id names output files, e.g. ``explain``'s overlays), splits named, groups printable or empty,
    coordinates both empty or both whole numbers >= 0. A damaged one is a StoreError naming the file and the line,
    rather than a ValueError later or a file written outside an output folder. A version 1 index has no group or
    coordinate columns: they are added, unknown, so every reader sees one shape."""
    try:
        index = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise StoreError(f"{path}: missing; the store is incomplete, re-run `histodetect ingest`") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not a readable index ({exc})") from exc
    expected = INDEX_COLUMNS_V1 if version == 1 else INDEX_COLUMNS
    if list(index.columns) != expected:
        raise StoreError(f"{path}: columns {list(index.columns)}, expected {expected}")
    for column in INDEX_COLUMNS[len(expected) :]:
        index[column] = ""

    def refuse(position: int, what: str) -> StoreError:
        return StoreError(f"{path}: line {position + 2}: {what}; the store is damaged, re-run `histodetect ingest`")

    def first(mask: pd.Series) -> int | None:  # checked column-wise: a store may hold 220,025 rows
        hits = np.flatnonzero(mask.to_numpy())
        return int(hits[0]) if len(hits) else None

    ids, labels, splits, groups = index["id"], index["label"], index["split"], index["group"]
    if (at := first(index["row"] != pd.Series(np.arange(len(index)).astype(str)))) is not None:
        raise refuse(at, f"row {shown(index['row'].iloc[at])}, expected {at}")
    if (at := first_unsafe(ids.tolist())) is not None:
        raise refuse(at, f"id {shown(ids.iloc[at])}: {unsafe_reason(ids.iloc[at])}")
    if (at := first(ids.duplicated())) is not None:
        raise refuse(at, f"id {shown(ids.iloc[at])} is listed twice")
    if (at := first(~labels.isin(LABEL_TEXT))) is not None:
        raise refuse(at, f"label {shown(labels.iloc[at])} is not 0, 1 or empty")
    if (at := first_unsafe(splits.tolist())) is not None:
        raise refuse(at, f"split {shown(splits.iloc[at])} is not a valid split name")
    if (at := first_bad_group(groups.tolist())) is not None:
        raise refuse(at, f"group {shown(groups.iloc[at])}: {group_problem(groups.iloc[at])}")
    (x, x_empty), (y, y_empty) = (_coordinates(index[column]) for column in ("coord_x", "coord_y"))
    unusable = (x_empty != y_empty) | ((x == NO_COORD) & ~x_empty) | ((y == NO_COORD) & ~y_empty)
    if (at := first(pd.Series(unusable))) is not None:
        found = f"{shown(index['coord_x'].iloc[at])}, {shown(index['coord_y'].iloc[at])}"
        raise refuse(at, f"coord_x, coord_y {found} are not both empty or both whole numbers >= 0")
    index["row"] = np.arange(len(index), dtype=np.int64)  # just checked to be exactly these
    text = labels.to_numpy(dtype=object)
    index["label"] = np.select([text == "0", text == "1"], [0, 1], UNLABELED).astype(np.int8)
    index["coord_x"], index["coord_y"] = x, y
    return index


def _coordinates(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A coordinate column as int64 (``NO_COORD`` where empty or not a whole number in 0..10^9-1) and where it is
    empty; parsed in C, since every store open reads the whole index."""
    empty = (text == "").to_numpy()
    value = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    whole = (value >= 0) & (value < 1e9) & (np.floor(value) == value)  # NaN compares False
    return np.where(whole, value, NO_COORD).astype(np.int64), empty


class Place(NamedTuple):
    """Where a patch comes from: its slide (or any other group of patches that must stay on one side of a split)
    and, when known, the position of its top-left corner on that slide at PCam's level 2."""

    group: str
    coord_x: int = NO_COORD
    coord_y: int = NO_COORD


def _record(
    id: str, label: int | None, split: str, source: str, sha1: str, place: Place | None
) -> tuple[str, int, str, str, str, str, int, int]:
    """One row of the index as the writer keeps it, unknown label and place as sentinels."""
    group, x, y = place if place is not None else ("", NO_COORD, NO_COORD)
    return (id, UNLABELED if label is None else int(label), split, source, sha1, group, x, y)


class StoreWriter:
    """Builds a store in a hidden sibling folder; :meth:`commit` renames it into place, :meth:`abort` removes it.

    Use as a context manager: leaving the block by an exception aborts, so a half-written store is never seen.
    Patches are written straight into a pre-sized memory map (``capacity``); the file is truncated to the patches
    actually added when the store is committed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        patch_shape: tuple[int, int, int] = PATCH_SHAPE,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path}: already exists; pass --overwrite to replace it")
        if self.path.exists() and (why := why_not_replaceable(self.path)):
            raise StoreError(f"{self.path}: {why}")
        self.patch_shape = tuple(patch_shape)
        self.capacity = int(capacity)
        # Built in a hidden sibling named by this process; those of processes no longer alive (killed) are removed.
        prefix = f".{self.path.name}.partial-"
        self.tmp = self.path.parent / f"{prefix}{os.getpid()}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(self.path.parent, re.compile(re.escape(prefix) + r"(?P<pid>\d+)"))
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self._records: list[tuple[str, int, str, str, str, str, int, int]] = []
        nbytes = max(self.capacity, 1) * int(np.prod(self.patch_shape))
        try:  # an interrupt here, before the with block is entered, must not leave the folder behind
            self.tmp.mkdir()
            with open(self.tmp / PATCHES, "wb") as fh:
                fh.truncate(nbytes)
            self._pixels = np.memmap(
                self.tmp / PATCHES, dtype=np.uint8, mode="r+", shape=(max(self.capacity, 1), *self.patch_shape)
            )
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        pixels: np.ndarray,
        id: str,
        label: int | None,
        split: str,
        source: str,
        sha1: str,
        place: Place | None = None,
    ) -> int:
        """Append one patch, with its slide and position on it when known (``place``); returns its row number."""
        row = len(self._records)
        if row >= self.capacity:
            raise StoreError(f"{self.path}: more patches than the {self.capacity} the writer was sized for")
        if pixels.shape != self.patch_shape or pixels.dtype != np.uint8:
            raise StoreError(
                f"{source}: patch of shape {pixels.shape} {pixels.dtype}, expected {self.patch_shape} uint8"
            )
        self._pixels[row] = pixels
        self._records.append(_record(id, label, split, source, sha1, place))
        return row

    def replace_record(
        self, row: int, id: str, label: int | None, split: str, source: str, place: Place | None = None
    ) -> None:
        """Give row ``row`` another id, label, split, source and place, for the same pixels (and so the same SHA-1)."""
        self._records[row] = _record(id, label, split, source, self._records[row][4], place)

    def add_many(
        self,
        pixels: np.ndarray,
        ids: Sequence[str],
        labels: Sequence[int | None],
        split: str,
        sources: Sequence[str],
        sha1s: Sequence[str],
    ) -> None:
        """Append a block of patches at once (PCam chunks, synthetic benchmarks): one copy, no Python loop."""
        start, n = len(self._records), len(pixels)
        if start + n > self.capacity:
            raise StoreError(f"{self.path}: more patches than the {self.capacity} the writer was sized for")
        if pixels.shape[1:] != self.patch_shape or pixels.dtype != np.uint8:
            raise StoreError(
                f"{sources[0] if n else self.path}: block of shape {pixels.shape} {pixels.dtype}, "
                f"expected (n, {self.patch_shape}) uint8"
            )
        self._pixels[start : start + n] = pixels
        self._records.extend(
            _record(i, lab, split, src, sha, None) for i, lab, src, sha in zip(ids, labels, sources, sha1s, strict=True)
        )

    def commit(
        self, *, source: str, extra: dict[str, Any] | None = None, report: dict[str, Any] | None = None
    ) -> Store:
        """Finish the store: truncate the pixels, write index, report and manifest, rename into place."""
        n = len(self._records)
        self._pixels.flush()
        del self._pixels
        with open(self.tmp / PATCHES, "r+b") as fh:
            fh.truncate(n * int(np.prod(self.patch_shape)))
        index = pd.DataFrame(self._records, columns=INDEX_COLUMNS[1:])
        index.insert(0, "row", np.arange(n))
        labels = index["label"].astype("Int8").mask(index["label"] == UNLABELED)
        index["label"] = labels
        for column in ("coord_x", "coord_y"):
            index[column] = index[column].astype("Int64").mask(index[column] == NO_COORD)
        index.to_csv(self.tmp / INDEX, index=False)
        splits: dict[str, dict[str, int]] = {}
        for name, part in index.groupby("split", sort=True):
            lab = part["label"].dropna()
            splits[str(name)] = {
                "count": len(part),
                "labeled": len(lab),
                "unlabeled": int(part["label"].isna().sum()),
                "positive": int((lab == 1).sum()),
                "negative": int((lab == 0).sum()),
            }
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "patch_shape": list(self.patch_shape),
            "dtype": "uint8",
            "count": n,
            "splits": splits,
            "source": source,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "histodetect_version": __version__,
            **(extra or {}),
        }
        atomic_write_json(self.tmp / REPORT, report or {})
        fsync_path(self.tmp / PATCHES)
        fsync_path(self.tmp / INDEX)
        atomic_write_text(self.tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: marks it complete
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        if old.exists():
            shutil.rmtree(old)
        return Store(self.path)

    def abort(self) -> None:
        if hasattr(self, "_pixels"):
            del self._pixels
        shutil.rmtree(self.tmp, ignore_errors=True)
