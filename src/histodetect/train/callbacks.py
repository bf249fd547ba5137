"""Callbacks and plug-ins a run is made of: freeze-then-unfreeze, the per-epoch metrics file, atomic checkpoints."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.plugins.io import TorchCheckpointIO
from rich.console import Console
from torch.optim import Optimizer

from histodetect.io import atomic_path


class FreezeUnfreeze(BaseFinetuning):
    """``--freeze frozen``: the backbone never trains. ``--freeze top:K``: the head trains alone for
    ``warmup_epochs``, then the top K stages join it (at the backbone's lower learning rate: its parameter group
    is in the optimiser from the start, see ``LitClassifier.parameter_groups``).

    Unfreezing is checked with ``>=`` so that a run resumed after the warm-up is unfrozen again.
    """

    def __init__(self, top_k: int, warmup_epochs: int):
        super().__init__()
        self.top_k = top_k
        self.warmup_epochs = warmup_epochs

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.model.backbone, train_bn=False)
        # Lightning keeps whatever mode each module is in; Classifier.train puts the frozen BatchNorms in eval
        # mode, so they normalise with their pretrained statistics in training as in validation.
        pl_module.model.train(pl_module.model.training)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.top_k and epoch >= self.warmup_epochs:
            stages = pl_module.model.stages()[-self.top_k :]
            self.make_trainable(stages)
            pl_module.model.train(pl_module.model.training)  # modes were set before this hook: unfrozen BN trains


class EpochLog(L.Callback):
    """Writes ``metrics.csv`` (one row per epoch, rewritten atomically) and prints one line per epoch.

    Throughput counts training images only, over the time spent in training batches, across all processes.
    """

    def __init__(self, path: str | os.PathLike[str], console: Console | None = None):
        self.path = Path(path)
        self.console = console or Console(stderr=True)
        self.rows: list[dict[str, Any]] = []
        self._start = 0.0
        self._images = 0
        self._train_seconds: float | None = None  # set when validation starts, so it is not counted

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path.exists():  # resumed: rows past the restored epoch are dropped when training starts
            self.rows = pd.read_csv(self.path).to_dict("records")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = [row for row in self.rows if row["epoch"] < trainer.current_epoch]
        self._start = time.perf_counter()
        self._images = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[0]) * trainer.world_size

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._start:
            self._train_seconds = time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._train_seconds or (time.perf_counter() - self._start)
        self._train_seconds = None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        optimizer = trainer.optimizers[0]
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": metrics.get("train_loss_epoch", metrics.get("train_loss")),
            "val_loss": metrics.get("val_loss"),
            "val_acc": metrics.get("val_acc"),
            "val_auc": metrics.get("val_auc"),
            "val_f1": metrics.get("val_f1"),
            "lr": optimizer.param_groups[0]["lr"],
            "backbone_trainable": sum(p.requires_grad for p in pl_module.model.backbone.parameters()),
            "epoch_seconds": round(time.perf_counter() - self._start, 2),
            "train_images_per_s": round(self._images / seconds, 1) if seconds else None,
        }
        self.rows.append(row)
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                pd.DataFrame(self.rows).to_csv(tmp, index=False)
            self.console.print(
                f"epoch {row['epoch']:>3}  train_loss {_fmt(row['train_loss'])}  val_loss {_fmt(row['val_loss'])}  "
                f"val_auc [bold]{_fmt(row['val_auc'])}[/]  val_acc {_fmt(row['val_acc'])}  "
                f"{row['train_images_per_s']} img/s  {row['epoch_seconds']:.0f}s",
                highlight=False,
            )


def _fmt(value: float | None) -> str:
    return "  -   " if value is None else f"{value:.4f}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file and are renamed into place, so a kill mid-save never leaves a truncated
    ``last.ckpt``; they are loaded with ``weights_only=True``, since a checkpoint file is untrusted input."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
