"""The packed store: what ``ingest`` writes and every later command reads.

Layout of a store folder (format version 1)::

    manifest.json   format name and version, patch shape, counts per split, creation time, command
    patches.u8      raw uint8 pixels, (N, H, W, 3) row-major: memory-mapped, never loaded whole
    index.csv       one row per patch: row, id, label (empty when unknown), split, source, sha1
    report.json     every problem ingest found, by file and kind

Raw bytes plus a manifest (rather than ``.npy``) follow nanoGPT: the file can be truncated in place when bad items
are skipped, and any tool can memory-map it. A store is built in a hidden sibling folder and renamed into place
by :meth:`StoreWriter.commit`, so an interrupted ingest never leaves a store that looks complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histodetect import __version__
from histodetect.errors import StoreError
from histodetect.io import atomic_write_json, atomic_write_text

STORE_FORMAT = "histodetect-store"
STORE_VERSION = 1
PATCH_SHAPE = (96, 96, 3)
UNLABELED = -1

MANIFEST = "manifest.json"
PATCHES = "patches.u8"
INDEX = "index.csv"
REPORT = "report.json"
INDEX_COLUMNS = ["row", "id", "label", "split", "source", "sha1"]


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
        if self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{manifest_path}: not a histodetect store manifest")
        if self.manifest.get("version") != STORE_VERSION:
            raise StoreError(
                f"{manifest_path}: store format version {self.manifest.get('version')} is not supported "
                f"(this histodetect reads version {STORE_VERSION}); re-run `histodetect ingest`"
            )
        self.patch_shape: tuple[int, int, int] = tuple(self.manifest["patch_shape"])  # type: ignore[assignment]
        self.index = pd.read_csv(
            self.path / INDEX,
            dtype={"id": str, "split": str, "source": str, "sha1": str},
            keep_default_na=False,
        )
        self.index["label"] = pd.to_numeric(self.index["label"], errors="raise").fillna(UNLABELED).astype(np.int8)
        expected = len(self.index) * int(np.prod(self.patch_shape))
        size = (self.path / PATCHES).stat().st_size if (self.path / PATCHES).exists() else -1
        if size != expected or len(self.index) != self.manifest["count"]:
            raise StoreError(
                f"{self.path}: {PATCHES} holds {size} bytes and the index {len(self.index)} rows, "
                f"but the manifest says {self.manifest['count']} patches of {self.patch_shape}"
            )
        self._patches: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.index)

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
        self.patch_shape = tuple(patch_shape)
        self.capacity = int(capacity)
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._records: list[tuple[str, int, str, str, str]] = []
        nbytes = max(self.capacity, 1) * int(np.prod(self.patch_shape))
        with open(self.tmp / PATCHES, "wb") as fh:
            fh.truncate(nbytes)
        self._pixels = np.memmap(
            self.tmp / PATCHES, dtype=np.uint8, mode="r+", shape=(max(self.capacity, 1), *self.patch_shape)
        )

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, pixels: np.ndarray, id: str, label: int | None, split: str, source: str, sha1: str) -> int:
        """Append one patch; returns its row number."""
        row = len(self._records)
        if row >= self.capacity:
            raise StoreError(f"{self.path}: more patches than the {self.capacity} the writer was sized for")
        if pixels.shape != self.patch_shape or pixels.dtype != np.uint8:
            raise StoreError(
                f"{source}: patch of shape {pixels.shape} {pixels.dtype}, expected {self.patch_shape} uint8"
            )
        self._pixels[row] = pixels
        self._records.append((id, UNLABELED if label is None else int(label), split, source, sha1))
        return row

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
            (i, UNLABELED if lab is None else int(lab), split, src, sha)
            for i, lab, src, sha in zip(ids, labels, sources, sha1s, strict=True)
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
        index = pd.DataFrame(self._records, columns=["id", "label", "split", "source", "sha1"])
        index.insert(0, "row", np.arange(n))
        labels = index["label"].astype("Int8").mask(index["label"] == UNLABELED)
        index["label"] = labels
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
        atomic_write_text(self.tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old.exists():
            shutil.rmtree(old)
        return Store(self.path)

    def abort(self) -> None:
        if hasattr(self, "_pixels"):
            del self._pixels
        shutil.rmtree(self.tmp, ignore_errors=True)
