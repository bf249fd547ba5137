"""Training throughput (images/s) of histodetect against the starter-notebook pipeline, same model, same run.

Baseline: a per-image PIL ``Dataset`` over the TIFF files (torchvision flips + ToTensor + Normalize), a
``DataLoader``, and a plain fp32 PyTorch loop. histodetect: ``train()`` on a packed store (memory-mapped batches,
tensor augmentation, bf16 autocast and channels_last where the CPU has native bf16), as a user runs it.
Both train every layer at 96 px with batch 64. Prints one JSON object; the target is a ratio of at least 2.

    python benchmarks/train_throughput.py [--models baseline-cnn resnet50 tf_efficientnet_lite0] [--images 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from histodetect.data.ingest import ingest
from histodetect.data.store import Store
from histodetect.models import create_model
from histodetect.runs.config import TrainConfig
from histodetect.sample import sample_dir
from histodetect.train.run import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hcd-subset"
BATCH = 64


class PilPatches(Dataset):
    """The starter-notebook dataset: open, decode and transform one TIFF per item."""

    def __init__(self, folder: Path, labels: pd.DataFrame):
        self.files = [folder / "train" / f"{i}.tif" for i in labels["id"]]
        self.labels = labels["label"].to_numpy()
        self.transform = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(),
                transforms.RandomVerticalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(self.files[i]).convert("RGB")
        return self.transform(image), torch.tensor(float(self.labels[i]))


def baseline_images_per_s(model_name: str, folder: Path, labels: pd.DataFrame) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, pretrained="none").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(PilPatches(folder, labels), batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    seen, started = 0, None
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:  # the first step pays one-off allocation costs in both pipelines
            started = time.perf_counter()
        else:
            seen += len(x)
    return seen / (time.perf_counter() - started)


def histodetect_images_per_s(model_name: str, store: Store, n: int, work: Path) -> float:
    """Steady state, like the baseline: the second epoch's training images/s (the first pays one-off costs)."""
    config = TrainConfig(
        model=model_name,
        pretrained="none",
        freeze="none",
        epochs=2,
        batch_size=BATCH,
        limit_train=n,
        val_fraction=0.05,
        patience=0,
        image_size=96,
    )
    run = work / f"run-{model_name}"
    train(store, run, config)
    return float(pd.read_csv(run / "metrics.csv")["train_images_per_s"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline-cnn", "resnet50", "tf_efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=1024, help="training images per measurement")
    args = parser.parse_args()
    folder = SHARED if SHARED.exists() else sample_dir()
    labels = pd.read_csv(folder / "train_labels.csv").iloc[: args.images]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ingest(folder, work / "store", progress=False)
        store = Store(work / "store")
        for name in args.models:
            ours = histodetect_images_per_s(name, store, len(labels), work)
            base = baseline_images_per_s(name, folder, labels)
            results.append(
                {
                    "model": name,
                    "histodetect_images_per_s": round(ours, 1),
                    "baseline_images_per_s": round(base, 1),
                    "ratio": round(ours / base, 2),
                }
            )
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "image_size": 96,
                "batch_size": BATCH,
                "images": len(labels),
                "data": str(folder),
                "threads": torch.get_num_threads(),
                "target_ratio": 2.0,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
