"""Whole-slide scoring: peak memory on a very large slide, and cells/s against ``predict`` on the same patches.

    python benchmarks/slide_throughput.py [--size 60000] [--islands 2] [--island 1920] [--small 2000]

1. Builds a ``--size`` x ``--size`` JPEG-compressed tiled pyramidal TIFF at 0.972 um/px (the model's scale), tile by
   tile (never in memory): glass, with ``--islands`` square islands of ``--island`` px covered in real patches
   (``../shared/data/hcd-subset`` when present, else the embedded sample); levels halve down to < 1,000 px.
2. Scores it with ``histodetect.infer.slide.score_slide`` in a child process (default workers) and reports the
   child's peak RSS, its largest reader worker's, and the peak PSS of the child and its workers together (sampled;
   forked workers share pages with the parent, which their RSS counts again): target under 2.5 GB. Also the
   tissue cells scored and their rate (reading, decoding and inference overlapped; mask and outputs excluded).
3. Speed, in this process, alternating ``--repeats`` times (the best pass of each counts): the streaming path
   (``score_cells``: reader workers, JPEG decoding, windows, inference) on ``--speed-cells`` tissue cells of the
   big slide, and ``Predictor.predict`` over as many of the same patches from a store (as ``histodetect predict
   STORE`` runs). The target ratio slide / predict is at least 0.8.
4. A ``--small`` slide, from opening the file to the last probability, alternating: the old in-memory path (the
   whole image decoded, windows cut from it, the same tissue cells, the same predictor) and the streaming one.

The model is ``tf_efficientnet_lite0`` (ImageNet weights) at 96 px, precision auto (bf16 where the CPU has it).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SHARED_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "hcd-subset" / "train"
MODEL = "tf_efficientnet_lite0"
MPP = 0.972
TILE = 512
PATCH = 96
TARGET = 0.8


def load_patches(limit: int = 2000) -> np.ndarray:
    """Real patches: the shared subset's first ``limit`` when present, else the embedded sample's."""
    from PIL import Image

    from histodetect.sample import sample_dir

    folder = SHARED_TRAIN if SHARED_TRAIN.is_dir() else sample_dir() / "train"
    paths = sorted(folder.glob("*.tif"))[:limit]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def islands(size: int, count: int, island: int) -> list[tuple[int, int]]:
    """Top-left corners (multiples of 96) of ``count`` islands spread over the slide's diagonal band."""
    step = size // (count + 1)
    return [((k + 1) * step // PATCH * PATCH, ((k * 7) % count + 1) * step // PATCH * PATCH) for k in range(count)]


def render(x0: int, y0: int, w: int, h: int, scale: int, patches: np.ndarray, corners, island: int) -> np.ndarray:
    """The slide's pixels in level-0 box (x0, y0, w*scale, h*scale) at 1/``scale``: white, patches on the islands."""
    from PIL import Image

    out = np.full((h, w, 3), 255, dtype=np.uint8)
    small = PATCH // scale if scale <= PATCH else 0
    for ix, iy in corners:
        if ix >= x0 + w * scale or iy >= y0 + h * scale or ix + island <= x0 or iy + island <= y0:
            continue
        for py in range(max(iy, (y0 - iy) // PATCH * PATCH + iy), min(iy + island, y0 + h * scale), PATCH):
            for px in range(max(ix, (x0 - ix) // PATCH * PATCH + ix), min(ix + island, x0 + w * scale), PATCH):
                k = ((py - iy) // PATCH * 997 + (px - ix) // PATCH) % len(patches)
                patch = patches[k]
                if scale > 1:
                    if not small:
                        continue
                    patch = np.asarray(Image.fromarray(patch).reduce(scale))
                ty, tx = (py - y0) // scale, (px - x0) // scale
                sy, sx = max(0, -ty), max(0, -tx)
                ey, ex = min(patch.shape[0], h - ty), min(patch.shape[1], w - tx)
                if ey > sy and ex > sx:
                    out[ty + sy : ty + ey, tx + sx : tx + ex] = patch[sy:ey, sx:ex]
    return out


def write_slide(path: Path, size: int, patches: np.ndarray, corners, island: int) -> dict[str, Any]:
    """The pyramid, tile by tile; glass tiles share one encoding."""
    import imagecodecs
    import tifffile

    started = time.perf_counter()
    white = imagecodecs.jpeg8_encode(np.full((TILE, TILE, 3), 255, dtype=np.uint8), level=90)
    levels = []
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        scale = 1
        while True:
            side = math.ceil(size / scale)
            levels.append(side)

            def tiles(scale: int = scale, side: int = side) -> Iterator[bytes]:
                for ty in range(0, side, TILE):
                    for tx in range(0, side, TILE):
                        pixels = render(tx * scale, ty * scale, TILE, TILE, scale, patches, corners, island)
                        yield white if pixels.min() == 255 else imagecodecs.jpeg8_encode(pixels, level=90)

            tif.write(
                tiles(),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if scale > 1 else 0,
                resolution=(1e4 / MPP / scale, 1e4 / MPP / scale),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            if side < 1000:
                break
            scale *= 2
    return {"levels": levels, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - started, 1)}


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` and its descendants (Linux): forked reader workers share most of their
    pages with the parent, which RSS would count twice."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # a worker that has just exited
    return total


def child(slide: str, out: str) -> None:
    """Score ``slide`` and print the summary with this process's peak RSS, its largest worker's, and the peak PSS of
    the whole process tree (sampled every 0.2 s)."""
    import os
    import threading

    from histodetect.infer.engine import Predictor
    from histodetect.infer.slide import score_slide
    from histodetect.models import create_model

    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_pss_mb(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    predictor = Predictor([create_model(MODEL, pretrained="auto")], progress=False)
    summary = score_slide(predictor, slide, out, progress=False)
    done.set()
    sampler.join()
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary["peak_tree_pss_mb"] = peak[0]
    print(json.dumps(summary, default=str))


def score_in_child(slide: Path, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(slide), str(out)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rate(count: int, fn: Any) -> float:
    """Items/s of one call of ``fn``."""
    started = time.perf_counter()
    fn()
    return count / (time.perf_counter() - started)


def speed(slide: Path, patches: np.ndarray, root: Path, n: int, repeats: int) -> dict[str, float]:
    """In this process, alternating: the streaming path on ``n`` tissue cells of ``slide`` (reader workers, JPEG
    decoding, windows, inference) and ``predict`` over ``n`` of the same patches from a store."""
    from histodetect.data.store import Store, StoreWriter
    from histodetect.data.tissue import tissue_fraction
    from histodetect.data.wsi import open_slide
    from histodetect.infer.engine import Predictor
    from histodetect.infer.slide import choose_scale, score_cells
    from histodetect.models import create_model

    predictor = Predictor([create_model(MODEL, pretrained="auto")], progress=False)
    with StoreWriter(root / "store", capacity=n) as writer:
        ids = [f"p{k}" for k in range(n)]
        writer.add_many(patches[np.arange(n) % len(patches)], ids, [None] * n, "test", ids, [""] * n)
        store: Store = writer.commit(source="benchmark")
    reader = open_slide(slide)
    scale = choose_scale(reader, predictor.mpp)
    width, height = reader.dimensions
    grid = (math.ceil(height / scale.cell), math.ceil(width / scale.cell))
    cells = np.argwhere(tissue_fraction(reader, scale.cell, grid)[0] >= 0.1)[:n]
    slide_rates, predict_rates = [], []
    for _ in range(repeats):
        slide_rates.append(rate(len(cells), lambda: score_cells(predictor, reader, scale, cells, progress=False)))
        predict_rates.append(rate(n, lambda: predictor.predict(store.patches)))
    return {"cells": len(cells), "slide": max(slide_rates), "predict": max(predict_rates)}


def small_slide_rates(slide: Path, repeats: int) -> dict[str, float]:
    """Tissue cells/s from opening the file to the last probability, alternating: the old in-memory path (the whole
    image decoded, each tissue cell's window cut from it, predict) and the streaming one (OpenSlide, tissue mask
    from a low level, reader workers)."""
    import tifffile

    from histodetect.data.tissue import tissue_fraction
    from histodetect.data.wsi import ArrayReader, open_slide
    from histodetect.infer.engine import Predictor
    from histodetect.infer.slide import choose_scale, score_cells
    from histodetect.models import create_model

    predictor = Predictor([create_model(MODEL, pretrained="auto")], progress=False)

    def in_memory() -> int:
        image = tifffile.imread(slide, level=0)
        grid = (-(-image.shape[0] // 32), -(-image.shape[1] // 32))
        cells = np.argwhere(tissue_fraction(ArrayReader(image), 32, grid)[0] >= 0.1)
        padded = np.pad(image, ((32, 64), (32, 64), (0, 0)), constant_values=255)
        predictor.predict(np.stack([padded[r * 32 : r * 32 + 96, c * 32 : c * 32 + 96] for r, c in cells]))
        return len(cells)

    def streaming() -> int:
        with open_slide(slide) as reader:
            scale = choose_scale(reader, predictor.mpp)
            width, height = reader.dimensions
            grid = (math.ceil(height / scale.cell), math.ceil(width / scale.cell))
            cells = np.argwhere(tissue_fraction(reader, scale.cell, grid)[0] >= 0.1)
            score_cells(predictor, reader, scale, cells, progress=False)
        return len(cells)

    rates: dict[str, list[float]] = {"in_memory": [], "streaming": []}
    for _ in range(repeats):
        for name, fn in (("in_memory", in_memory), ("streaming", streaming)):
            started = time.perf_counter()
            rates[name].append(fn() / (time.perf_counter() - started))
    return {name: max(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=60_000)
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--island", type=int, default=1920, help="side of an island of patches, in pixels")
    parser.add_argument("--small", type=int, default=2000, help="side of the slide for the in-memory comparison")
    parser.add_argument("--speed-cells", type=int, default=1000, help="tissue cells (and patches) per speed pass")
    parser.add_argument("--repeats", type=int, default=2, help="alternating speed passes; the best of each counts")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    patches = load_patches()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corners = islands(args.size, args.islands, args.island)
        built = write_slide(root / "big.tif", args.size, patches, corners, args.island)
        big = score_in_child(root / "big.tif", root / "big")
        rates = speed(root / "big.tif", patches, root, args.speed_cells, args.repeats)
        small_corners = [(PATCH * 5, PATCH * 5)]
        small_island = (args.small - PATCH * 10) // PATCH * PATCH
        write_slide(root / "small.tif", args.small, patches, small_corners, small_island)
        small = small_slide_rates(root / "small.tif", args.repeats)
    result = {
        "model": MODEL,
        "patches_from": str(SHARED_TRAIN) if SHARED_TRAIN.is_dir() else "embedded sample",
        "slide": {"size": args.size, "islands": args.islands, "island": args.island, **built},
        "peak_rss_mb": round(big["peak_rss_mb"]),
        "worker_peak_rss_mb": round(big["worker_peak_rss_mb"]),
        "peak_pss_all_processes_mb": round(big["peak_tree_pss_mb"]),
        "memory_target_mb": 2500,
        "cells": big["cells"],
        "cells_scored": big["cells_scored"],
        "slide_seconds": big["seconds"],
        "slide_cells_per_second_whole_run": big["cells_per_second"],
        "speed_cells": rates["cells"],
        "slide_cells_per_second": round(rates["slide"], 1),
        "predict_patches_per_second": round(rates["predict"], 1),
        "ratio_slide_vs_predict": round(rates["slide"] / rates["predict"], 3),
        "target_ratio": TARGET,
        "precision": big["precision"],
        "small_slide": {
            "size": args.small,
            "streaming_cells_per_second": round(small["streaming"], 1),
            "old_in_memory_cells_per_second": round(small["in_memory"], 1),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
