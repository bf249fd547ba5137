"""Prediction throughput on the CPU: our engine over a store vs the starter notebook's per-image PIL pipeline.

    python benchmarks/predict_throughput.py [--n 2000]

Both sides run ``tf_efficientnet_lite0`` (ImageNet weights, ``pretrained="auto"``) at 96 px without TTA, on the
same patches, in the same process, alternating ``--repeats`` times (the best pass of each counts, which damps the
noise of a shared machine):

- engine: :class:`histodetect.infer.engine.Predictor` over a store (uint8 memory map, batches of 256, bf16
  autocast + channels_last where the CPU has native bf16), as ``histodetect predict STORE`` runs it;
- baseline: fp32 eager PyTorch over a ``Dataset`` that opens each TIFF with PIL and applies torchvision's
  ``ToTensor`` + ``Normalize``, ``DataLoader(batch_size=64, num_workers=0)``.

Two variants of the engine are reported too: reading the TIFF folder directly (decoding on the fly), which
separates what the store buys from what precision and batching buy, and running the model's ONNX export (what
``histodetect export`` writes; ``predict model.onnx STORE``) on onnxruntime. Patches come from
``../shared/data/hcd-subset/train`` when present (the first ``--n``), else the embedded sample. Prints one JSON
object; the target ratio (engine / baseline) is 2.5.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from histodetect.data.store import StoreWriter
from histodetect.infer.engine import Predictor
from histodetect.infer.onnx_graph import to_onnx
from histodetect.infer.sources import ImageFiles, open_source
from histodetect.models import Classifier, create_model
from histodetect.sample import sample_dir

SHARED_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "hcd-subset" / "train"
MODEL = "tf_efficientnet_lite0"
TARGET = 2.5


class PilPatches(Dataset[torch.Tensor]):
    """The starter notebook's dataset: one file, one PIL decode, one transform per item."""

    def __init__(self, paths: list[Path], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.paths = paths
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def baseline(model: Classifier, paths: list[Path]) -> np.ndarray:
    """fp32 eager over the PIL loader. The transforms normalise, so the network runs without the Classifier's
    own normalisation (backbone + head): the same function as ``model``, fed the way the notebook feeds it."""
    config = model.data_config
    loader = DataLoader(PilPatches(paths, config["mean"], config["std"]), batch_size=64, num_workers=0)
    out = []
    with torch.no_grad():
        for x in loader:
            out.append(torch.sigmoid(model.head(model.backbone(x))[:, 0]))
    return torch.cat(out).numpy()


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    folder = SHARED_TRAIN if SHARED_TRAIN.is_dir() else sample_dir() / "train"
    paths = sorted(folder.glob("*.tif"))[: args.n]
    torch.manual_seed(0)
    model = create_model(MODEL, pretrained="auto", image_size=96).eval()
    engine = Predictor([copy.deepcopy(model)], progress=False)  # the engine may convert its copy to channels_last
    with tempfile.TemporaryDirectory() as tmp:
        pixels = ImageFiles(paths)[:]
        with StoreWriter(Path(tmp) / "store", capacity=len(paths)) as writer:
            ids = [p.stem for p in paths]
            writer.add_many(pixels, ids, [None] * len(ids), "test", [str(p) for p in paths], [""] * len(ids))
            store = writer.commit(source=str(folder))
        onnx_file = Path(tmp) / "model.onnx"
        onnx_file.write_bytes(to_onnx(model))
        onnx_engine = Predictor([onnx_file], progress=False)
        source = open_source(store.path)  # what `histodetect predict STORE` reads
        passes = {
            "engine": lambda: engine.predict(source.patches),
            "baseline": lambda: baseline(model, paths),
            "engine_folder": lambda: engine.predict(ImageFiles(paths)),
            "engine_onnx": lambda: onnx_engine.predict(source.patches),
        }
        engine.predict(source.patches[:256])  # warm-up: first-call allocations and kernel selection
        onnx_engine.predict(source.patches[:256])
        baseline(model, paths[:64])
        best = dict.fromkeys(passes, np.inf)
        outputs: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, run in passes.items():
                seconds, outputs[name] = timed(run)
                best[name] = min(best[name], seconds)
    rate = {name: len(paths) / seconds for name, seconds in best.items()}
    p_engine, p_base = outputs["engine"], outputs["baseline"]
    print(
        json.dumps(
            {
                "model": MODEL,
                "image_size": 96,
                "n_images": len(paths),
                "source": str(folder),
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews everything
                "engine": {
                    "precision": engine.precision,
                    "batch_size": engine.batch_size,
                    "images_per_s": round(rate["engine"], 1),
                },
                "engine_from_tiff_folder_images_per_s": round(rate["engine_folder"], 1),
                "engine_onnx_fp32_images_per_s": round(rate["engine_onnx"], 1),
                "baseline": {
                    "precision": "fp32",
                    "batch_size": 64,
                    "loader": "PIL + ToTensor + Normalize",
                    "images_per_s": round(rate["baseline"], 1),
                },
                "ratio": round(rate["engine"] / rate["baseline"], 2),
                "target_ratio": TARGET,
                "onnx_ratio": round(rate["engine_onnx"] / rate["baseline"], 2),
                "max_abs_diff_vs_baseline": {
                    "engine": float(np.abs(p_engine - p_base).max()),
                    "engine_onnx": float(np.abs(outputs["engine_onnx"] - p_base).max()),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
