"""``train``: store -> run folder. Every later command reads the folder back through :mod:`histodetect.runs`.

The run folder (DEVELOPERS.md; its names are :mod:`histodetect.runs.layout`'s) holds ``config.yaml``,
``model.safetensors`` (best weights), ``checkpoints/`` (``last.ckpt`` for ``--resume``, ``best.ckpt``),
``metrics.csv``, ``curves.png``, ``split.csv`` (which patch was train, val or test), ``stain.json`` (the stain
reference), ``store.json`` (the store's path and fingerprint) and ``summary.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from safetensors.torch import save_file

from histodetect import __version__
from histodetect.data.stain import StainNormalizer, read_reference
from histodetect.data.store import Store
from histodetect.device import Hardware, resolve_hardware
from histodetect.io import atomic_path, atomic_write_json
from histodetect.models import create_model
from histodetect.runs.config import ConfigError, TrainConfig, freeze_top_k
from histodetect.runs.layout import (
    CHECKPOINTS,
    CONFIG,
    METRICS,
    SPLIT,
    STAIN,
    SUMMARY,
    WEIGHTS,
    check_store,
    read_split,
    record_stain,
    record_store,
)
from histodetect.train.averaging import weight_averaging
from histodetect.train.callbacks import AtomicCheckpointIO, EpochLog, FreezeUnfreeze
from histodetect.train.datamodule import StoreDataModule
from histodetect.train.module import DivergedError, LitClassifier
from histodetect.train.probe import linear_probe


def train(
    store: Store,
    out: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume: bool = False,
    callbacks: list[L.Callback] | None = None,
) -> dict[str, Any]:
    """Train ``config`` on ``store`` into the run folder ``out``; returns the summary.

    With ``resume`` the run continues from ``checkpoints/last.ckpt`` under the configuration and the split saved in
    the folder (the ones given are ignored, so a resumed run cannot silently change its recipe or move a patch
    from one side to the other), and only on the store it was trained on (``store.json``).
    """
    out = Path(out)
    saved = out / CONFIG
    if resume:
        if not saved.exists():
            raise ConfigError(f"{out}: nothing to resume (no {CONFIG}); start the run without --resume")
        config = TrainConfig.load(saved)
        check_store(out, store)
    elif saved.exists() and rank_zero_only.rank == 0:  # other DDP ranks start after rank 0 wrote it
        raise ConfigError(f"{out}: already holds a run; pass --resume to continue it, or choose another --out")
    if config.stain_reference is not None and not resume:
        read_reference(config.stain_reference)  # a bad reference is refused before the run folder is made
    L.seed_everything(config.seed, workers=True, verbose=False)
    hardware = hardware_for(config)
    parts = read_split(out, store) if resume and (out / SPLIT).is_file() else None
    model = create_model(
        config.model, pretrained=config.pretrained, dropout=config.dropout, image_size=config.image_size
    )
    datamodule: StoreDataModule
    module: LitClassifier
    if config.cache_embeddings:  # the head alone, trained on the frozen backbone's cached embeddings
        datamodule, module = linear_probe(store, config, model, hardware, parts=parts, log=_say)
    else:
        datamodule = StoreDataModule(
            store, config, num_workers=hardware.num_workers, pin_memory=hardware.pin_memory, parts=parts
        )
        module = LitClassifier(
            config, model, channels_last=hardware.channels_last, depthwise_fp32=hardware.depthwise_fp32
        )
    made = _entries_made_by(out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused model, split or group file leaves no empty --out
    # Every process fits the same reference from the same rows; the file is written atomically, so any may write it.
    reference = record_stain(out, store, datamodule.train_rows, config)
    if config.stain_norm != "none":
        module.stain = StainNormalizer(config.stain_norm, reference, reference_source=STAIN)
    _quiet_lightning()
    try:
        trainer = _trainer(config, hardware, out, has_val=len(datamodule.monitor_rows) > 0, extra=callbacks or [])
    except (ValueError, TypeError, MisconfigurationException) as exc:  # hardware this machine does not have
        made()
        raise ConfigError(
            f"accelerator {config.accelerator}, devices {config.devices}, num_nodes {config.num_nodes}, strategy "
            f"{config.strategy}: Lightning refuses them here ({str(exc).splitlines()[0][:200]})"
        ) from None
    if trainer.is_global_zero:
        if not resume:
            config.save(saved)
            record_store(out, store)
        if parts is None:
            datamodule.write_split(out / SPLIT)
        Console(stderr=True).print(
            f"{'resuming' if resume else 'training'} [bold]{config.model}[/] (freeze {config.freeze}) on "
            f"{len(datamodule.train_rows)} patches{_epoch_note(config, datamodule)}, {_val_note(datamodule)}"
            f"{_test_note(datamodule)}; "
            f"{hardware.accelerator}, {hardware.precision}, channels_last={hardware.channels_last}; run: {out}",
            highlight=False,
        )
    last = out / CHECKPOINTS / "last.ckpt"
    started = time.perf_counter()
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=last if resume and last.exists() else None, weights_only=True
        )
    except DivergedError:
        if not resume and trainer.is_global_zero:
            made()  # a diverged run is no model and cannot be resumed into one: the same command may run again
        raise
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    _export_best(trainer, out)
    summary = _summary(trainer, config, hardware, datamodule, out, wall, resumed=resume)
    atomic_write_json(out / SUMMARY, summary)
    _plot_curves(out / METRICS, out / "curves.png")
    return summary


@rank_zero_only
def _say(message: str) -> None:
    Console(stderr=True).print(message, highlight=False)


def _epoch_note(config: TrainConfig, datamodule: StoreDataModule) -> str:
    if config.epoch_patches is None or config.epoch_patches >= len(datamodule.train_rows):
        return ""
    return f" ({config.epoch_patches} per epoch)"


def _val_note(datamodule: StoreDataModule) -> str:
    if len(datamodule.val_rows) == 0:
        return "no validation (the last epoch's weights are kept)"
    if len(datamodule.monitor_rows) == len(datamodule.val_rows):
        return f"validating on {len(datamodule.val_rows)}"
    return f"validating on {len(datamodule.monitor_rows)} of {len(datamodule.val_rows)} held out"


def _test_note(datamodule: StoreDataModule) -> str:
    return f", {len(datamodule.test_rows)} test patches untouched" if len(datamodule.test_rows) else ""


def hardware_for(config: TrainConfig) -> Hardware:
    """The hardware settings a run's config asks for, resolved on this machine."""
    return resolve_hardware(config.accelerator, config.precision, config.channels_last, config.num_workers)


def _entries_made_by(out: Path) -> Callable[[], None]:
    """A function that removes what appeared in ``out`` since now (``out`` itself, if it did not exist): nothing
    that was there before is touched."""
    existed = out.exists()
    before = set(out.iterdir()) if existed else set()

    def remove() -> None:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
            return
        for entry in set(out.iterdir()) - before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    return remove


def _trainer(
    config: TrainConfig, hardware: Hardware, out: Path, *, has_val: bool, extra: list[L.Callback]
) -> L.Trainer:
    folder = out / CHECKPOINTS
    checkpoints: list[L.Callback]
    if has_val:
        # Two callbacks, not one with save_last: a monitored ModelCheckpoint rewrites last.ckpt only in epochs that
        # improve on the best, so a resume would replay every epoch since then. The first is the trainer's
        # checkpoint_callback, whose best_model_path _export_best reads.
        checkpoints = [
            ModelCheckpoint(
                dirpath=folder, filename="best", monitor="val_auc", mode="max", enable_version_counter=False
            ),
            ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False),
        ]
    else:  # unmonitored, so it saves (and rewrites last.ckpt) every epoch
        checkpoints = [ModelCheckpoint(dirpath=folder, filename="best", save_last=True, enable_version_counter=False)]
    callbacks: list[L.Callback] = [*checkpoints, EpochLog(out / METRICS), *extra]
    if has_val and config.patience > 0:
        callbacks.append(EarlyStopping(monitor="val_auc", mode="max", patience=config.patience))
    top_k = freeze_top_k(config.freeze)
    if top_k is not None:
        callbacks.append(FreezeUnfreeze(top_k, config.warmup_epochs))
    if averaging := weight_averaging(config):
        callbacks.append(averaging)
    return L.Trainer(
        accelerator=hardware.accelerator,
        devices=_devices(config.devices),
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=hardware.precision,  # type: ignore[arg-type]
        max_epochs=config.epochs,
        max_time=dt.timedelta(minutes=config.max_time) if config.max_time else None,
        callbacks=callbacks,
        logger=_loggers(config.logger, out),
        default_root_dir=out,
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=10,
        enable_model_summary=False,
        benchmark=hardware.accelerator == "cuda",  # cuDNN autotuning: fixed 96 px shapes, so it pays off
        enable_progress_bar=os.isatty(2),
    )


def _out_of_time(callback: L.Callback) -> bool:
    """Whether ``callback`` is the ``max_time`` Timer and the budget is spent (a Timer without one never is)."""
    left = callback.time_remaining() if isinstance(callback, Timer) else None
    return left is not None and left <= 0


def _quiet_lightning() -> None:
    """Lightning's start-up banners and tips repeat what the line above says; warnings still show."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")  # frozen BN
    # train() itself refuses a used folder unless resuming, and resuming writes into the old checkpoints/ on purpose.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def _devices(value: str) -> Any:
    if value == "auto":
        return "auto"
    return int(value) if value.isdigit() else value


def _loggers(names: str, out: Path) -> list[Any] | bool:
    """``metrics.csv`` is always written (EpochLog); these add TensorBoard and MLflow on request (the names were
    checked with the config)."""
    loggers: list[Any] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=out, name="tensorboard", version=""))
        elif name == "mlflow":
            try:
                from lightning.pytorch.loggers import MLFlowLogger

                loggers.append(
                    MLFlowLogger(
                        experiment_name="histodetect",
                        run_name=out.name,
                        tracking_uri=f"file:{(out / 'mlruns').resolve()}",
                    )
                )
            except ModuleNotFoundError as exc:
                raise ConfigError("--logger mlflow needs the mlflow package: pip install mlflow") from exc
    return loggers or False


def _export_best(trainer: L.Trainer, out: Path) -> None:
    """Best weights of the network alone, as safetensors: what evaluate/predict/export load."""
    callback = trainer.checkpoint_callback
    best = Path(callback.best_model_path) if callback and callback.best_model_path else None
    if best is not None and best.exists():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    else:
        state = trainer.lightning_module.state_dict()
    weights = {k.removeprefix("model."): v.contiguous() for k, v in state.items() if k.startswith("model.")}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "histodetect-classifier", "version": "1"})


def _summary(
    trainer: L.Trainer,
    config: TrainConfig,
    hardware: Hardware,
    datamodule: StoreDataModule,
    out: Path,
    wall: float,
    *,
    resumed: bool,
) -> dict[str, Any]:
    metrics = pd.read_csv(out / METRICS) if (out / METRICS).exists() else pd.DataFrame()
    best: dict[str, Any] = {}
    if len(metrics) and metrics["val_auc"].notna().any():
        best = metrics.loc[metrics["val_auc"].idxmax()].to_dict()
    stopped = "max_epochs"
    if any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks):
        stopped = "early_stopping"
    elif any(_out_of_time(c) for c in trainer.callbacks):
        stopped = "max_time"  # also when the budget ran out in the last epoch, which it then cut short
    elif trainer.interrupted:
        stopped = "interrupted"
    previous = _read_json(out / SUMMARY)
    return {
        "model": config.model,
        "freeze": config.freeze,
        "image_size": trainer.lightning_module.model.image_size,  # resolved: config.yaml may say "auto"
        "best_epoch": int(best["epoch"]) if best else None,
        "best_val_auc": _num(best.get("val_auc")),
        "best_val_acc": _num(best.get("val_acc")),
        "best_val_loss": _num(best.get("val_loss")),
        "epochs_run": len(metrics),
        "stopped_by": stopped,
        "n_train": len(datamodule.train_rows),
        "n_val": len(datamodule.val_rows),
        "n_val_monitored": len(datamodule.monitor_rows),
        "n_test": len(datamodule.test_rows),
        # Which weights model.safetensors holds: the best validation epoch's, or the last when nothing validated.
        "weights": "best_val_auc" if len(datamodule.monitor_rows) else "last_epoch",
        "wall_time_s": round(wall + (previous.get("wall_time_s", 0.0) if resumed else 0.0), 1),
        "train_images_per_s": _num(metrics["train_images_per_s"].median()) if len(metrics) else None,
        "device": _device_name(hardware),
        "accelerator": hardware.accelerator,
        "precision": hardware.precision,
        "channels_last": hardware.channels_last,
        "world_size": trainer.world_size,
        "stain_norm": config.stain_norm,
        "stain_reference": STAIN,  # the reference any command normalises to without --stain-reference
        "stain_aug": config.stain_aug,
        "stain_consistency": config.stain_consistency,
        "store": str(datamodule.store.path),
        "store_fingerprint": datamodule.store.fingerprint,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "histodetect": __version__,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "timm": timm.__version__,
        },
    }


def _device_name(hardware: Hardware) -> str:
    if hardware.accelerator == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else round(float(value), 6)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _plot_curves(metrics_path: Path, target: Path) -> None:
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = pd.read_csv(metrics_path)
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for column, style in (("train_loss", "-"), ("val_loss", "--")):
        if metrics[column].notna().any():
            ax_loss.plot(metrics["epoch"], metrics[column], style, marker="o", label=column.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    for column in ("val_auc", "val_acc"):
        if metrics[column].notna().any():
            ax_auc.plot(metrics["epoch"], metrics[column], marker="o", label=column.replace("_", " "))
    ax_auc.set(xlabel="epoch", title="Validation")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label without validation
            ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
