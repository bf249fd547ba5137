"""GPU training throughput: ResNet50 at 96 px, one epoch over a synthetic store of 220,025 patches.

Run on a machine with a GPU (target: 10,000 images/s on one H100); ``benchmarks/gpu_checks.sh`` runs it with the
other GPU checks in one call:

    python benchmarks/gpu_train_throughput.py --out /tmp/gpu-bench

The store is built by tiling the embedded real sample (so BatchNorm sees realistic statistics) and is read through
the same memory-mapped loader as real training. Three rates come out of one run, so a shortfall names its cause:

- ``loader_images_per_s``: the training DataLoader alone (workers, pinning, copy to the device), no model;
- ``step_images_per_s``: the training step alone (augmentation, forward, backward, optimiser) on one batch that
  already sits on the device: the ceiling for this model, precision and batch size;
- ``train_images_per_s``: ``histodetect.train.train`` for one epoch, as a user runs it.

``train / step`` near 1 means the loader and Lightning add nothing; ``loader / step`` below 1 means the loader is the
bottleneck. GPU utilisation is sampled with ``nvidia-smi`` during the epoch. Prints one JSON object. On a CPU-only
machine, ``--n 2048 --model baseline-cnn`` checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from histodetect.data.store import Store, StoreWriter
from histodetect.device import Hardware
from histodetect.models import create_model
from histodetect.runs.config import TrainConfig, build_config
from histodetect.sample import sample_dir
from histodetect.train.datamodule import StoreDataModule
from histodetect.train.module import LitClassifier
from histodetect.train.run import hardware_for, train


def synthetic_store(path: Path, n: int) -> Store:
    if (path / "manifest.json").exists() and len(Store(path)) == n:  # built by an earlier run of this script
        return Store(path)
    from PIL import Image

    files = sorted((sample_dir() / "train").glob("*.tif"))
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    if path.exists():
        shutil.rmtree(path)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    with StoreWriter(path, capacity=n) as writer:
        for start in range(0, n, 8192):
            stop = min(n, start + 8192)
            ids = [f"{i:040x}" for i in range(start, stop)]
            writer.add_many(
                tiles[rng.integers(0, len(tiles), stop - start)],
                ids,
                labels[start:stop].tolist(),
                "train",
                ["synthetic"] * len(ids),
                [""] * len(ids),
            )
        return writer.commit(source="synthetic")


class GpuSampler(threading.Thread):
    """Samples utilisation.gpu every 500 ms with nvidia-smi until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.samples.append(float(text.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self.stop.wait(0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_images_per_s(store: Store, config: TrainConfig, hardware: Hardware, device: torch.device) -> float:
    """One pass of the training DataLoader, each batch copied to the device as ``train`` does, no model."""
    datamodule = StoreDataModule(store, config, num_workers=hardware.num_workers, pin_memory=hardware.pin_memory)
    loader = datamodule.train_dataloader()
    images = 0
    started = time.perf_counter()
    for pixels, targets, _ in loader:
        pixels.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        images += len(pixels)
    _sync(device)
    return images / (time.perf_counter() - started)


def step_images_per_s(
    store: Store, config: TrainConfig, hardware: Hardware, device: torch.device, steps: int, warmup: int
) -> float:
    """``LitClassifier.training_step`` itself (augmentation, mixing, forward, loss), then backward and an optimiser
    step, on a batch that never leaves the device."""
    model = create_model(config.model, pretrained="none", dropout=config.dropout, image_size=config.image_size)
    module = LitClassifier(
        config, model, channels_last=hardware.channels_last, depthwise_fp32=hardware.depthwise_fp32
    ).to(device)
    if hardware.channels_last:
        module.to(memory_format=torch.channels_last)  # what on_fit_start does under a Trainer
    module.train()
    rows = np.arange(min(len(store), config.batch_size))
    batch = (
        torch.from_numpy(store.read(rows)).to(device),
        torch.from_numpy(store.labels[rows].astype(np.float32)).to(device),
        torch.from_numpy(rows),
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, fused=device.type == "cuda")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(hardware.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    warnings.filterwarnings("ignore", message=".*self.log\\(\\)` but the `self.trainer` reference.*")  # no Trainer here
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/histodetect-gpu-bench"))
    parser.add_argument("--n", type=int, default=220_025)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50, help="timed steps of the device-resident ceiling")
    args = parser.parse_args()

    started = time.perf_counter()
    store = synthetic_store(args.out / "store", args.n)
    build_s = time.perf_counter() - started
    config = build_config(
        preset="gpu",
        model=args.model,
        pretrained="none",
        epochs=1,
        batch_size=args.batch_size,
        val_fraction=0.02,
        patience=0,
        compile=args.compile,
        num_workers=args.workers,
        mixup=0.0,
    )
    hardware = hardware_for(config)
    device = torch.device("cuda" if hardware.accelerator == "cuda" else hardware.accelerator)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train() has Lightning do
    loader_rate = loader_images_per_s(store, config, hardware, device)
    step_rate = step_images_per_s(store, config, hardware, device, args.steps, warmup=10 if args.compile else 5)
    run = args.out / "run"
    if run.exists():
        shutil.rmtree(run)
    sampler = GpuSampler()
    sampler.start()
    summary = train(store, run, config)
    sampler.stop.set()
    util = np.array(sampler.samples, dtype=float)  # empty where nvidia-smi is missing (a CPU check)
    train_rate = summary.get("train_images_per_s") or 0.0
    print(
        json.dumps(
            {
                "benchmark": "gpu_train_throughput",
                "model": args.model,
                "patches": args.n,
                "batch_size": args.batch_size,
                "compile": args.compile,
                "workers": hardware.num_workers,
                "store_build_s": round(build_s, 1),
                "loader_images_per_s": round(loader_rate, 1),
                "step_images_per_s": round(step_rate, 1),
                "train_images_per_s": train_rate,
                "train_vs_step": round(train_rate / step_rate, 3),
                "loader_vs_step": round(loader_rate / step_rate, 3),
                "target_images_per_s": 10_000,
                "gpu_util_mean": round(float(util.mean()), 1) if len(util) else None,
                "gpu_util_median": round(float(np.median(util)), 1) if len(util) else None,
                "device": summary.get("device"),
                "precision": summary.get("precision"),
                "channels_last": summary.get("channels_last"),
                "wall_time_s": summary.get("wall_time_s"),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
