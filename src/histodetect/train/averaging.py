"""Weight averaging, ``--ema DECAY`` and ``--swa-epochs N``, through Lightning's ``WeightAveraging`` callback.

Lightning's callback keeps a torch ``AveragedModel`` beside the LightningModule and swaps the averaged weights in
for every validation, so ``val_auc``, early stopping and the best checkpoint all judge the averaged model. A
checkpoint's ``state_dict`` holds the averaged weights (the raw ones under ``current_model_state``, the average's
count under ``averaging_state``; both are restored on ``--resume``), so ``model.safetensors``, taken from the best
checkpoint, is the averaged network and every later command sees an ordinary model. BatchNorm statistics are
averaged along with the weights (``use_buffers``), so no extra pass over the data is needed to recompute them.

EMA updates the average after every optimiser step (``torch.optim.swa_utils.get_ema_multi_avg_fn``). SWA is the
same callback with equal weights, one snapshot per epoch over the last N epochs, taken just before that epoch's
validation so the average is judged with the epoch it includes. Lightning's ``StochasticWeightAveraging`` is not
used: it validates and checkpoints the raw weights, replaces the learning-rate schedule, and adds a hidden extra
epoch to recompute BatchNorm statistics, none of which fits a run whose saved model is its best-validated one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from histodetect.runs.config import TrainConfig


class AveragedWeights(WeightAveraging):
    """``ema``: decay per step; ``swa_start``: first epoch (0-based) whose weights join an equal average."""

    def __init__(self, *, ema: float | None = None, swa_start: int | None = None):
        if (ema is None) == (swa_start is None):
            raise ValueError("give exactly one of ema and swa_start")
        super().__init__(use_buffers=True, **({"multi_avg_fn": get_ema_multi_avg_fn(ema)} if ema is not None else {}))
        self.ema = ema
        self.swa_start = swa_start
        self._swapped = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls setup before it moves the module to its device: keep the average on that device (a GPU's).
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if self.ema is not None:
            return step_idx is not None
        return epoch_idx is not None and epoch_idx >= (self.swa_start or 0)

    @property
    def count(self) -> int:
        """Snapshots in the average so far (0 before SWA's window opens)."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    def _add_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """SWA's per-epoch snapshot, at most once per epoch (the parent's epoch-end rule)."""
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swa_start is not None and trainer.state.fn == TrainerFn.FITTING:
            self._add_epoch(trainer, pl_module)
        # Before the first snapshot the average is only the initial copy: validate the weights being trained.
        self._swapped = self.count > 0
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._add_epoch(trainer, pl_module)  # runs without validation; a no-op when validation took it

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.count:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if "current_model_state" in checkpoint and not self.count:
            checkpoint["state_dict"] = checkpoint["current_model_state"]  # nothing averaged yet: the raw weights

    def state_dict(self) -> dict[str, Any]:
        # The parent keeps only the step; SWA also needs the epoch, or a resumed run could add an epoch twice.
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)


def weight_averaging(config: TrainConfig) -> AveragedWeights | None:
    """The callback ``config`` asks for (``ema`` or ``swa_epochs``), or None (``ema`` 0 is none)."""
    if config.ema:
        return AveragedWeights(ema=config.ema)
    if config.swa_epochs:
        return AveragedWeights(swa_start=config.epochs - config.swa_epochs)
    return None
