"""GPU training throughput: ResNet50 at 96 px, one epoch over a synthetic store of 220,025 patches.

Run on a machine with a GPU (target: 10,000 images/s on one H100):

    python benchmarks/gpu_train_throughput.py --out /tmp/gpu-bench

The store is built by tiling the embedded real sample (so BatchNorm sees realistic statistics) and is read through
the same memory-mapped loader as real training. GPU utilisation is sampled with ``nvidia-smi`` while the epoch
runs. Prints one JSON object. On a CPU-only machine, ``--n 512 --model baseline-cnn`` checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from histodetect.data.store import Store, StoreWriter
from histodetect.demo import sample_dir


def synthetic_store(path: Path, n: int) -> Store:
    from PIL import Image

    files = sorted((sample_dir() / "train").glob("*.tif"))
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    rng = np.random.default_rng(0)
    if path.exists():
        shutil.rmtree(path)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/histodetect-gpu-bench"))
    parser.add_argument("--n", type=int, default=220_025)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    from histodetect.train.config import build_config
    from histodetect.train.run import train

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
    run = args.out / "run"
    if run.exists():
        shutil.rmtree(run)
    sampler = GpuSampler()
    sampler.start()
    summary = train(store, run, config)
    sampler.stop.set()
    util = np.array(sampler.samples, dtype=float)  # empty where nvidia-smi is missing (a CPU check)
    print(
        json.dumps(
            {
                "benchmark": "gpu_train_throughput",
                "model": args.model,
                "patches": args.n,
                "batch_size": args.batch_size,
                "compile": args.compile,
                "store_build_s": round(build_s, 1),
                "train_images_per_s": summary.get("train_images_per_s"),
                "target_images_per_s": 10_000,
                "gpu_util_mean": round(float(util.mean()), 1) if len(util) else None,
                "gpu_util_median": round(float(np.median(util)), 1) if len(util) else None,
                "device": summary.get("device"),
                "precision": summary.get("precision"),
                "wall_time_s": summary.get("wall_time_s"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
