"""``--freeze frozen --cache-embeddings``: a linear probe trained on cached embeddings, saved as an ordinary run.

The protocol of the eva benchmark for pathology foundation models: the backbone stays frozen and one linear
layer (the ``Classifier``'s head: dropout + linear) is trained on its embeddings with the run's optimiser (AdamW
by default) and early stopping on validation ROC AUC. Since the backbone never changes, each patch is embedded
once (``train.embeddings``) and an epoch costs a few matrix products instead of a backbone pass per patch.

Everything else is the ordinary run: the same split, callbacks, checkpoints and metrics, and the LightningModule
still holds the whole ``Classifier``, so ``model.safetensors`` is backbone + trained head and ``predict``,
``evaluate``, ``export`` and ``serve`` see nothing different.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from histodetect.data.store import Store
from histodetect.device import Hardware
from histodetect.models import Classifier
from histodetect.runs.config import TrainConfig
from histodetect.train.datamodule import Batch, PatchDataset, StoreDataModule
from histodetect.train.embeddings import EmbeddingCache, open_or_build
from histodetect.train.module import LitClassifier


class EmbeddingDataset(PatchDataset):
    """Store rows served as their cached embeddings: every view ``(B, views, F)`` for training, the patch as it
    is ``(B, F)`` for validation."""

    def __init__(self, store: Store, cache: EmbeddingCache, rows: np.ndarray, *, all_views: bool):
        super().__init__(store, rows)
        self.positions = cache.index_of(self.rows)
        self.embeddings = cache.embeddings
        self.all_views = all_views

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(self.positions[idx], kind="stable")  # sorted reads keep the memory map sequential
        chosen = np.empty((len(idx), *self.embeddings.shape[1:]), dtype=np.float32)
        chosen[order] = self.embeddings[self.positions[idx][order]]
        data = torch.from_numpy(chosen if self.all_views else chosen[:, 0])
        return data, torch.from_numpy(self.labels[idx]), torch.from_numpy(self.rows[idx])


class EmbeddingDataModule(StoreDataModule):
    """The run's split, served from the cache (in-process: reading embeddings needs no worker processes)."""

    def __init__(
        self, store: Store, config: TrainConfig, cache: EmbeddingCache, parts: dict[str, np.ndarray] | None = None
    ):
        super().__init__(store, config, num_workers=0, pin_memory=False, parts=parts)
        self.cache = cache

    def dataset(self, rows: np.ndarray, *, train: bool) -> Dataset[Batch]:
        return EmbeddingDataset(self.store, self.cache, rows, all_views=train)


class LitProbe(LitClassifier):
    """Trains the ``Classifier``'s head on embeddings; batches hold embeddings where ``LitClassifier``'s hold
    pixels. Each training sample takes one of its cached views, drawn from the generator the parent re-seeds
    every epoch, so a resumed run draws the same views as one that never stopped."""

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.head(embeddings)[:, 0]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        embeddings, targets, _ = batch
        view = torch.randint(embeddings.shape[1], (len(targets),), generator=self.generator).to(embeddings.device)
        logits = self(embeddings[torch.arange(len(targets), device=embeddings.device), view])
        loss = self.loss_fn(logits.float(), targets)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss


def linear_probe(
    store: Store,
    config: TrainConfig,
    model: Classifier,
    hardware: Hardware,
    *,
    parts: dict[str, np.ndarray] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[EmbeddingDataModule, LitProbe]:
    """The data module and LightningModule of a ``cache_embeddings`` run; embeds the store first if no cache
    holds this backbone's embeddings of it yet."""
    cache = open_or_build(
        model,
        store,
        views=8 if config.aug_dihedral else 1,
        hardware=hardware,
        batch_size=config.batch_size,
        cache_dir=config.cache_dir,
        log=log,
    )
    datamodule = EmbeddingDataModule(store, config, cache, parts)
    return datamodule, LitProbe(config, model)
