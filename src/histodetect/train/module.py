"""The LightningModule: one training step, one validation step, the optimiser and its schedule.

Randomness is re-seeded from (seed, epoch, rank) at the start of every epoch, for the augmentation generator and for
torch's global generator (dropout). Together with :class:`~histodetect.train.datamodule.EpochShuffle` this makes a
run resumed from an epoch checkpoint follow exactly the path of one that never stopped.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_accuracy, binary_f1_score

from histodetect.data.augment import BatchAugment, mix_batch, stain_pairs, to_float
from histodetect.data.stain import StainNormalizer
from histodetect.device import depthwise_in_fp32
from histodetect.errors import ConfigError
from histodetect.loss import build_loss, paired_divergence
from histodetect.metrics import roc_auc
from histodetect.models import Classifier
from histodetect.runs.config import TrainConfig
from histodetect.train.datamodule import Batch


class DivergedError(ConfigError):
    """The loss turned NaN or infinite: the run's weights are no model (``train`` removes the folder it made)."""


class LitClassifier(L.LightningModule):
    def __init__(
        self,
        config: TrainConfig,
        model: Classifier,
        *,
        channels_last: bool = False,
        depthwise_fp32: bool = False,
        stain: StainNormalizer | None = None,
    ):
        super().__init__()
        self.config = config
        self.model = model
        self.channels_last = channels_last
        if depthwise_fp32:
            depthwise_in_fp32(model)
        # Kept out of the module tree so the weights are saved once, under ``model.``.
        self.__dict__["forward_fn"] = torch.compile(model) if config.compile else model
        self.loss_fn = build_loss(config)
        # Normalises every batch, training and validation, before augmentation: the same function, with the same
        # reference (the run's stain.json), as every command that scores the run.
        self.stain = stain
        self.augment = BatchAugment(
            dihedral=config.aug_dihedral,
            hed=config.aug_hed,
            # With a consistency loss the re-stainings come in pairs (training_step), not one sample in two.
            stain=0.0 if config.stain_consistency else config.stain_aug,
            brightness=config.aug_brightness,
            contrast=config.aug_contrast,
        )
        self.generator = torch.Generator()
        # (rows, logits, targets) of each batch of this validation pass, in this process
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []
        self._finite: torch.Tensor | None = None  # every training loss so far finite (a device flag: no sync a step)
        self.validated_rows = torch.empty(0, dtype=torch.int64)  # the store rows the last validation counted

    # ---- set-up and seeding (frozen BatchNorm stays in eval mode: Classifier.train sees to it)
    def on_fit_start(self) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        seed = self.config.seed * 1_000_003 + self.current_epoch * 7919 + self.global_rank
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)

    # ---- steps
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for a uint8 (B, H, W, 3) batch."""
        return self.forward_fn(to_float(self._normalised(pixels), channels_last=self.channels_last))

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stain(pixels) if self.stain is not None else pixels

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        pixels, targets, _ = batch
        x = self.augment(to_float(self._normalised(pixels), channels_last=self.channels_last), self.generator)
        x, targets = mix_batch(x, targets, self.config.mixup, self.config.cutmix, self.generator)
        if self.config.stain_consistency:
            x, targets = stain_pairs(x, targets, self.config.stain_aug, self.generator)
        logits = self.forward_fn(x)
        loss = self.loss_fn(logits.float(), targets)
        if self.config.stain_consistency:
            loss = loss + self.config.stain_consistency * paired_divergence(logits)
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._check_finite()  # before the diverged weights are validated and checkpointed as the best
        self._val_outputs = []

    def on_train_epoch_end(self) -> None:
        self._check_finite()

    def _check_finite(self) -> None:
        """Stop, in one line, a run whose loss turned NaN or infinite: its weights are no longer a model."""
        if self._finite is not None and not bool(self._finite):
            raise DivergedError(
                f"training diverged: the loss became NaN or infinite in epoch {self.current_epoch}; lower --lr, "
                "check --pos-weight and the loss settings"
            )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        pixels, targets, rows = batch
        self._val_outputs.append((rows, self(pixels).float(), targets))

    def on_validation_epoch_end(self) -> None:
        """Metrics over every validation patch exactly once. Under DDP, Lightning's distributed sampler pads the
        processes' shares to one length with repeated patches; gathering (row, logit) pairs from all processes
        and keeping each row once measures the validation set itself, on every process alike."""
        if not self._val_outputs:
            return
        rows, logits, targets = (torch.cat(parts) for parts in zip(*self._val_outputs, strict=True))
        self._val_outputs = []
        if self.trainer.world_size > 1:
            rows, logits, targets = (self.all_gather(t).reshape(-1) for t in (rows, logits, targets))
        rows, first = np.unique(rows.cpu().numpy(), return_index=True)
        keep = torch.from_numpy(first).to(logits.device)
        logits, targets = logits[keep], targets[keep]
        self.validated_rows = torch.from_numpy(rows)
        probs, target_int = torch.sigmoid(logits), targets.round().int()
        self.log_dict(
            {
                "val_auc": _val_auc(target_int, probs),
                "val_acc": binary_accuracy(probs, target_int),
            },
            prog_bar=True,
        )
        self.log_dict(
            {
                "val_f1": binary_f1_score(probs, target_int),
                "val_loss": F.binary_cross_entropy_with_logits(logits, targets),
            }
        )

    # ---- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Head and backbone as groups from the start, each split into weights that decay and normalisation/bias
        parameters that do not (as timm's ``param_groups_weight_decay``: decaying a norm's scale or a bias only
        fights the normalisation). Frozen parameters have no gradient, so optimisers skip them; unfreezing
        (``FreezeUnfreeze``) only flips ``requires_grad`` and every scheduler keeps working."""
        cfg = self.config
        head_ids = {id(p) for p in self.model.head.parameters()}
        pretrained = cfg.pretrained != "none" and cfg.model != "baseline-cnn"
        backbone_lr = cfg.lr * (cfg.backbone_lr_scale if pretrained else 1.0)
        groups: dict[str, dict[str, Any]] = {}
        for name, parameter in self.model.named_parameters():
            part, lr = ("head", cfg.lr) if id(parameter) in head_ids else ("backbone", backbone_lr)
            decays = parameter.ndim > 1 and not name.endswith(".bias")
            key = part if decays else f"{part}_no_decay"
            group = groups.setdefault(
                key, {"params": [], "lr": lr, "weight_decay": cfg.weight_decay if decays else 0.0, "name": key}
            )
            group["params"].append(parameter)
        return [groups[k] for k in ("head", "head_no_decay", "backbone", "backbone_no_decay") if k in groups]

    def configure_optimizers(self) -> Any:
        cfg = self.config
        groups = self.parameter_groups()
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(groups, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        else:
            optimizer = torch.optim.SGD(groups, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=True)
        if cfg.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=0.5, patience=max(1, cfg.patience // 2)
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val_auc", "interval": "epoch"},
            }
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, cfg.epochs))
        warmup = int(cfg.lr_warmup_epochs * steps_per_epoch)
        if cfg.scheduler == "onecycle":
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in groups],
                total_steps=total,
                pct_start=min(0.5, warmup / total) if warmup else 0.3,
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, warmup, total, cosine=cfg.scheduler == "cosine")
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, warmup: int, total: int, *, cosine: bool, floor: float = 0.01) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or a cosine decay to ``floor`` of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _val_auc(targets: torch.Tensor, probs: torch.Tensor) -> float:
    """The one ROC AUC (:func:`histodetect.metrics.roc_auc`) of the validation set. A set of one class scores 0.0,
    as torchmetrics' ``binary_auroc`` did before: a nan would stop EarlyStopping and never rank a checkpoint."""
    auc = roc_auc(targets.cpu().numpy(), probs.cpu().numpy())
    return 0.0 if math.isnan(auc) else auc
