"""Ingest throughput on the real 5,000 + 43 patch subset (target: 3,000 patches/s end to end on 2 cores).

    python benchmarks/ingest_throughput.py [--source ../shared/data/hcd-subset] [--repeat 3] [--workers N]

End to end means what ``histodetect ingest`` does: list the folders, read the CSVs, decode and check every
patch, write and commit the store. The baseline, timed in the same run over the same files, is the naive loop
a notebook would write: ``np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])`` in one
process, with no checks and no store. Both are timed after one untimed read of every file, so neither pays for
a cold disk cache, and the best of ``--repeat`` runs is reported because the machines are shared. Prints one
JSON object; prints a JSON ``skipped`` message when the subset is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from histodetect.data.ingest import ingest

TARGET = 3000
DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared/data/hcd-subset"


def image_files(source: Path) -> list[Path]:
    return sorted(p for split in ("train", "test") for p in (source / split).glob("*.tif"))


def naive_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    seconds = time.perf_counter() - start
    assert pixels.shape == (len(files), 96, 96, 3)
    return seconds


def ingest_seconds(source: Path, workers: int | None) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        start = time.perf_counter()
        result = ingest(source, Path(tmp) / "store", workers=workers, progress=False)
        seconds = time.perf_counter() - start
        if result.store is None:
            raise SystemExit(f"ingest refused {source}: {result.report.get('summary') or result.report}")
        return len(result.store), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    args = parser.parse_args()
    if not args.source.is_dir():
        print(json.dumps({"skipped": f"{args.source} not present"}))
        return

    files = image_files(args.source)
    for f in files:  # warm the page cache for both contenders
        f.read_bytes()
    baseline = min(naive_seconds(files) for _ in range(args.repeat))
    patches, seconds = min((ingest_seconds(args.source, args.workers) for _ in range(args.repeat)), key=lambda r: r[1])
    rate, baseline_rate = patches / seconds, len(files) / baseline
    print(
        json.dumps(
            {
                "patches": patches,
                "seconds": round(seconds, 3),
                "patches_per_s": round(rate),
                "target": TARGET,
                "meets_target": rate >= TARGET,
                "baseline": {
                    "what": "single-process PIL open/convert/np.asarray loop + np.stack, no checks, no store",
                    "patches": len(files),
                    "seconds": round(baseline, 3),
                    "patches_per_s": round(baseline_rate),
                },
                "ratio": round(rate / baseline_rate, 2),
                "workers": args.workers or os.cpu_count(),
                "repeat": args.repeat,
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
