"""Epoch time of a frozen-backbone run with the embedding cache against without it, same model, same run.

Both train the head of a frozen ``tf_efficientnet_lite0`` (its ImageNet weights) at 192 px on the same split.
Without the cache (the baseline) every epoch runs the backbone over every training and validation patch; with
``--cache-embeddings`` the backbone runs once per patch and view (8 dihedral views) into the cache, and an epoch
reads embeddings. Reported: the median epoch time of each (training + validation, from ``metrics.csv``), their
ratio, the one-off cost of building the cache and the number of epochs after which it has paid for itself.
Prints one JSON object.

    python benchmarks/embedding_cache.py [--patches 400] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from histodetect.data.ingest import ingest
from histodetect.data.store import Store
from histodetect.runs.config import TrainConfig
from histodetect.sample import sample_dir
from histodetect.train.run import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hcd-subset"


def timed_run(store: Store, run: Path, config: TrainConfig) -> tuple[float, float]:
    """(median epoch seconds, whole train() call in seconds)."""
    started = time.perf_counter()
    train(store, run, config)
    wall = time.perf_counter() - started
    return float(pd.read_csv(run / "metrics.csv")["epoch_seconds"].median()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=400, help="labeled patches in the store (train + val)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    folder = SHARED if SHARED.exists() else sample_dir()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        labels = pd.read_csv(folder / "train_labels.csv").iloc[: args.patches]
        (work / "subset" / "train").mkdir(parents=True)  # the first N patches, in the competition's layout
        labels.to_csv(work / "subset" / "train_labels.csv", index=False)
        for patch_id in labels["id"]:
            (work / "subset" / "train" / f"{patch_id}.tif").symlink_to(folder / "train" / f"{patch_id}.tif")
        ingest(work / "subset", work / "store", progress=False)
        store = Store(work / "store")
        base = TrainConfig(
            model="tf_efficientnet_lite0",
            pretrained="auto",
            freeze="frozen",
            image_size=192,
            epochs=args.epochs,
            batch_size=64,
            val_fraction=0.2,
            patience=0,
            cache_dir=str(work / "cache"),
        )
        plain_epoch, plain_wall = timed_run(store, work / "plain", base)
        cached = base.replace(cache_embeddings=True)
        cached_epoch, cached_wall = timed_run(store, work / "cached", cached)
        (cache,) = (work / "cache").iterdir()
        build = json.loads((cache / "meta.json").read_text())["seconds"]
        _, reused_wall = timed_run(store, work / "reused", cached.replace(seed=1))
    print(
        json.dumps(
            {
                "benchmark": "embedding_cache",
                "model": "tf_efficientnet_lite0 (frozen, ImageNet weights)",
                "image_size": 192,
                "patches": len(store.rows(labeled=True)),
                "views_cached": 8,
                "epochs": args.epochs,
                "data": str(folder),
                "threads": torch.get_num_threads(),
                "epoch_s_without_cache": round(plain_epoch, 2),
                "epoch_s_with_cache": round(cached_epoch, 3),
                "ratio": round(plain_epoch / cached_epoch, 1),
                "cache_build_s": build,
                "break_even_epochs": round(build / max(plain_epoch - cached_epoch, 1e-9), 1),
                "train_call_s": {
                    "without_cache": round(plain_wall, 1),
                    "with_cache_first_run": round(cached_wall, 1),
                    "with_cache_reused": round(reused_wall, 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
