"""Batches of patches straight from a store's memory map.

A batch is read as one sorted slice of the memory map and handed over as uint8 NHWC (a quarter of the bytes of
float), then converted and augmented on the device in the training step: no per-image Python, no PIL, and an
epoch of the 220,025-patch competition set never has to fit in RAM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from histodetect.data.split import groups_of, split_rows, stratified_subset
from histodetect.data.store import Store
from histodetect.errors import StoreError
from histodetect.io import atomic_path
from histodetect.runs.config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 (B,H,W,3), float labels (B,), int64 store rows (B,)


class PatchDataset(Dataset[Batch]):
    """Rows of a store, read a whole batch at a time through ``__getitems__``."""

    def __init__(self, store: Store, rows: np.ndarray):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        labels = store.labels[self.rows]
        self.labels = np.where(labels < 0, 0, labels).astype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        pixels = torch.from_numpy(self.store.read(rows))
        return pixels, torch.from_numpy(self.labels[idx]), torch.from_numpy(rows)


def collate_batch(batch: Batch) -> Batch:
    """The DataLoader hands ``__getitems__``'s result here: already a batch, so nothing is left to collate."""
    return batch


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch): a run resumed at an epoch boundary sees the same order
    as one that never stopped. Lightning calls ``set_epoch`` each epoch (and wraps it for DDP, which then splits
    what it yields among the processes).

    ``size`` (``epoch_patches``) cuts each epoch's permutation to its first ``size`` indices: a fresh random draw
    of that many patches per epoch.
    """

    def __init__(self, n: int, seed: int, size: int | None = None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.size = n if size is None else min(size, n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator)[: self.size].tolist())

    def __len__(self) -> int:
        return self.size


class StoreDataModule(L.LightningDataModule):
    """Splits a store's labeled patches into train/validation/test and serves train and validation as uint8
    batches.

    ``val_rows`` are all the validation patches (``split.csv`` lists them, ``evaluate`` scores them); each epoch
    validates on ``monitor_rows``, the ``val_patches``-sized stratified subset of them when one is set.
    ``test_rows`` are only listed: no loader serves them, so nothing in training sees them.
    ``parts`` (a resumed run's ``split.csv``) replaces the drawing of the split.
    """

    def __init__(
        self,
        store: Store,
        config: TrainConfig,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        parts: dict[str, np.ndarray] | None = None,
    ):
        super().__init__()
        self.store = store
        self.config = config
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        if parts is not None:
            self.train_rows, self.val_rows, self.test_rows = parts["train"], parts["val"], parts["test"]
        else:
            self.train_rows, self.val_rows, self.test_rows = self._split()
        self.monitor_rows = self.val_rows
        if config.val_patches is not None and config.val_patches < len(self.val_rows):
            labels = self.store.labels[self.val_rows].astype(np.int64)
            self.monitor_rows = self.val_rows[stratified_subset(labels, config.val_patches, config.seed)]

    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        labeled = self.store.rows(labeled=True)
        if len(labeled) == 0:
            raise StoreError(f"{self.store.path}: no labeled patches to train on")
        labels = self.store.labels[labeled].astype(np.int64)
        groups = groups_of(cfg.groups, self.store, labeled) if cfg.groups else None
        train, val, test = split_rows(
            labels,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            groups=groups,
            folds=cfg.folds,
            fold=cfg.fold,
            test_fraction=cfg.test_fraction,
        )
        train_rows = labeled[train]
        if cfg.limit_train is not None and cfg.limit_train < len(train_rows):
            keep = np.random.default_rng(cfg.seed).choice(len(train_rows), cfg.limit_train, replace=False)
            train_rows = np.sort(train_rows[keep])
        return train_rows, labeled[val], labeled[test]

    def write_split(self, path: str | os.PathLike[str]) -> Path:
        """Record which patch was used for what, so evaluation can find the run's own held-out patches."""
        frame = pd.concat(
            [
                pd.DataFrame({"id": self.store.ids[self.train_rows], "part": "train"}),
                pd.DataFrame({"id": self.store.ids[self.val_rows], "part": "val"}),
                pd.DataFrame({"id": self.store.ids[self.test_rows], "part": "test"}),
            ]
        )
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        return Path(path)

    def dataset(self, rows: np.ndarray, *, train: bool) -> Dataset[Batch]:
        """What a batch of ``rows`` holds: their pixels here; cached embeddings in ``train.probe``."""
        return PatchDataset(self.store, rows)

    def _loader(self, rows: np.ndarray, *, shuffle: bool) -> DataLoader[Batch]:
        dataset = self.dataset(rows, train=shuffle)
        sampler = EpochShuffle(len(dataset), self.config.seed, self.config.epoch_patches) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # Its own generator: creating an iterator must not draw from torch's global generator (dropout's), or a
            # resumed run would see other dropout masks than the run it continues.
            generator=torch.Generator().manual_seed(self.config.seed),
            drop_last=sampler is not None and len(sampler) > self.config.batch_size,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader(self.monitor_rows, shuffle=False)
