"""What ``predict`` and ``explain`` read patches from: a store, a folder of images, or one image file.

Each source becomes a :class:`PatchSet`: ids, labels when known, and a lazy reader that hands out uint8 ``(n,
96, 96, 3)`` arrays for slices, so neither a store's 57k test patches nor a folder of 57k TIFF files is ever
loaded whole. Folders are listed with ingest's :func:`~histodetect.data.sources.discover` and files decoded
with :func:`~histodetect.data.decode.decode_patch`, as ingest does, so predict accepts and refuses exactly the files
ingest does (wrong size or mode, unreadable, unsafe names) and names the file when it refuses one.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodetect.data.decode import decode_patch
from histodetect.data.ids import shown, unsafe_reason
from histodetect.data.problems import ERROR
from histodetect.data.sources import IMAGE_SUFFIXES, discover
from histodetect.data.store import MANIFEST, PATCH_SHAPE, UNLABELED, Store
from histodetect.errors import InferError

SHOWN = 5  # problems quoted in an error message


class StoreRows:
    """Rows of a store as a lazy read-only uint8 array: slices and index arrays read only those rows, in sorted
    order (one sequential pass over the memory map). It has the ``shape``/``dtype``/``ndim`` of the array it
    stands for, so the evaluation report can pick its worst mistakes out of a whole split without loading it."""

    def __init__(self, store: Store, rows: np.ndarray) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *store.patch_shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return self.store.read(self.rows[index])

    def take(self, index: np.ndarray) -> StoreRows:
        return StoreRows(self.store, self.rows[index])


class ImageFiles:
    """Image files decoded on demand, a slice at a time, by a thread per core (file reads, PIL's decoder and
    SHA-1 all release the GIL, so threads scale without pickling pixels between processes)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        paths = self.paths[index] if isinstance(index, slice) else [self.paths[i] for i in np.asarray(index)]
        out = np.empty((len(paths), *PATCH_SHAPE), dtype=np.uint8)
        workers = min(len(paths), os.cpu_count() or 1) or 1
        with ThreadPoolExecutor(workers) as pool:
            for i, (path, (pixels, _, problems)) in enumerate(
                zip(paths, pool.map(decode_patch, map(str, paths)), strict=True)
            ):
                if pixels is None:
                    detail = "; ".join(f"{kind}: {text}" for kind, text in problems)
                    raise InferError(f"{path}: cannot be used as a patch ({detail})")
                out[i] = pixels
        return out

    def take(self, index: np.ndarray) -> ImageFiles:
        return ImageFiles([self.paths[i] for i in np.asarray(index)])


@dataclass(frozen=True)
class PatchSet:
    """Patches to score: ``ids`` (str), ``labels`` (int8, -1 where unknown) and ``patches``, aligned."""

    ids: np.ndarray
    labels: np.ndarray
    patches: StoreRows | ImageFiles
    description: str

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> PatchSet:
        index = np.asarray(index, dtype=np.int64)
        return PatchSet(self.ids[index], self.labels[index], self.patches.take(index), self.description)


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def open_source(source: str | os.PathLike[str], *, split: str | None = None) -> PatchSet:
    """The patches of ``source``: a store (``split``, default ``test`` if it has one, else all; in row order,
    so batches are sequential reads of the memory map), a folder of images or a competition folder (``split``
    as for a store; in id order), or a single image file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if is_store(source):
        return store_patches(Store(source), split)
    if source.is_file():
        if split is not None:
            raise InferError(f"--split {split!r} applies to a store or a folder, not to the image file {source}")
        return _image_file(source)
    return _folder(source, split)


def store_patches(store: Store, split: str | None = None) -> PatchSet:
    """A store's patches in ``split`` (default: ``test`` if the store has one, else all), in row order."""
    if split is None and "test" in store.splits:
        split = "test"
    rows = store.rows(split)
    what = f"split {split!r} of {store.path}" if split else str(store.path)
    return PatchSet(store.ids[rows], store.labels[rows], StoreRows(store, rows), what)


def _image_file(path: Path) -> PatchSet:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InferError(f"{path}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) or a store folder")
    if reason := unsafe_reason(path.stem):
        raise InferError(f"{shown(str(path))}: {reason}; rename the file")
    return PatchSet(np.array([path.stem]), np.array([UNLABELED], dtype=np.int8), ImageFiles([path]), str(path))


def _folder(root: Path, split: str | None) -> PatchSet:
    """Image files of a folder as ingest sees them; an error ingest would refuse on is an error here too."""
    plan = discover(root)  # its IngestError is a UserError too
    splits = sorted({item.split for item in plan.items})
    if split is None:
        split = "test" if "test" in splits else None
    elif split not in splits:
        raise InferError(f"{root}: no split named {split!r}; this folder has {splits}")
    items = [item for item in plan.items if split is None or item.split == split]
    errors = [p for p in plan.problems if p.severity == ERROR and (split is None or p.split in (split, None))]
    if errors:
        shown = "; ".join(f"{p.file or p.id}: {p.detail}" for p in errors[:SHOWN])
        more = f" (and {len(errors) - SHOWN} more)" if len(errors) > SHOWN else ""
        raise InferError(f"{root}: {len(errors)} problem(s): {shown}{more}")
    if not items:
        raise InferError(f"{root}: no image files to predict on")
    ids = np.array([item.id for item in items])
    labels = np.array([UNLABELED if item.label is None else item.label for item in items], dtype=np.int8)
    paths = [item.path for item in items if item.path is not None]
    if len(paths) != len(items):
        raise InferError(f"{root}: holds PCam HDF5 files; ingest them into a store first (`histodetect ingest`)")
    what = f"split {split!r} of {root}" if split and plan.layout == "competition" else str(root)
    return PatchSet(ids, labels, ImageFiles(paths), what)
