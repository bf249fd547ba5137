"""``histodetect slide`` beside WSInfer 0.6.1 on the same slide, the same trained network and the same CPU, in one run.

    python benchmarks/slide_vs_wsinfer.py RUN [--patches 60] [--venv DIR] [--work DIR] [--precision fp32]

1. A slide of the run's held-out real patches (``real_slides.py``: a disc ``--patches`` across, mostly normal, a
   few tumour lesions, offset from the 96 px grid), as an Aperio SVS at the model's 0.972 um/px.
2. WSInfer in its own virtual environment (``--venv``, made on first use with ``pip install wsinfer==0.6.1
   openslide-python openslide-bin "zarr<3" "tiffslide<2.5"``; never a project dependency), offline: ``HOME`` is a
   folder holding ``.wsinfer-zoo/wsinfer-zoo-registry.json`` = ``{"models": {}}``, ``HF_HUB_OFFLINE=1``,
   ``WSINFER_FORCE_CPU=1``. Its model is the run's network traced to TorchScript, taking what its ``ToTensor``
   transform gives (float RGB in [0, 1]; the network normalises itself) and returning two-class logits ``[0, z]``,
   whose softmax is ``sigmoid(z)``, the probability histodetect computes; ``config.json`` (spec 1.0) gives
   ``spacing_um_px`` 0.972 and ``patch_size_pixels`` 96. WSInfer runs with its defaults (batch 32, loader workers
   min(cores, 8), no ``--speedup``).
3. ``histodetect slide`` at ``--cell 96``, ``--cell 32`` and ``--cascade``, each a fresh process, with
   ``--precision`` (fp32 by default: the same arithmetic as WSInfer's TorchScript, so probabilities can be compared;
   on a CPU without bf16 it is what ``auto`` gives). Default reader workers.
Each command's wall time (process start to exit: imports, model loading, tissue detection, reading, inference and
outputs), its windows (WSInfer: rows of its CSV; histodetect: ``windows_scored``), windows per second over that wall
time, and the peak proportional set size of its process tree (sampled every 0.1 s: loader workers included, pages
shared by forks counted once). Agreement: the largest |p - p_wsinfer| where the windows coincide (WSInfer's tile at
(x, y) is the window of the 96 px cell at (x, y) and of the 32 px cell at (x + 32, y + 32)). Targets (issue 17):
``--cell 96`` >= 3x WSInfer's windows/s at no more peak memory; the cascade's 32 px answer in <= 1.5x WSInfer's
wall time; probabilities within 0.002. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from histodetect.infer.engine import Predictor
from histodetect.models import Classifier
from histodetect.runs import load_model
from real_slides import MPP, PATCH, held_out, make_slide
from slide_throughput import tree_pss_mb

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["wsinfer==0.6.1", "openslide-python", "openslide-bin", "zarr<3", "tiffslide<2.5"]


class TwoClassLogits(nn.Module):
    """float ``(B, 3, H, W)`` in [0, 1] (torchvision's ``ToTensor``) -> logits ``(B, 2)`` = ``[0, z]``."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def export_for_wsinfer(run: Path, folder: Path, check: np.ndarray) -> dict[str, Any]:
    """``model.pt`` (TorchScript) and ``config.json`` for ``wsinfer run -p -c``; checked against the Predictor."""
    folder.mkdir(parents=True, exist_ok=True)
    model = load_model(run)[0].eval()
    with torch.inference_mode():
        traced = torch.jit.trace(TwoClassLogits(model), torch.rand(2, 3, PATCH, PATCH))
    traced.save(str(folder / "model.pt"))
    config = {
        "spec_version": "1.0", "architecture": model.name, "num_classes": 2, "class_names": ["normal", "tumour"],
        "patch_size_pixels": PATCH, "spacing_um_px": MPP, "transform": [{"name": "ToTensor"}],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded = torch.jit.load(str(folder / "model.pt"))
    with torch.inference_mode():
        x = torch.from_numpy(check).permute(0, 3, 1, 2).float() / 255
        p = torch.softmax(loaded(x), dim=1)[:, 1].numpy()
    expected = Predictor([run], precision="fp32", engine="torch", progress=False).predict(check)
    return {"torchscript_vs_histodetect_max_abs_dp": float(np.abs(p - expected).max())}


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "wsinfer").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    return venv / "bin" / "wsinfer"


def measure(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Wall time and the peak PSS of the process tree of ``command``."""
    peak = [0.0]
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], tree_pss_mb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    if code:
        raise RuntimeError(f"{command[:3]} exited {code}; see {log}")
    return {"wall_s": round(wall, 2), "peak_tree_pss_mb": round(peak[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--patches", type=int, default=60, help="the tissue disc's diameter, in patches")
    parser.add_argument("--lesions", type=int, default=4)
    parser.add_argument("--venv", type=Path, default=Path("benchmarks-output/wsinfer-venv"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks-output/vs-wsinfer"))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--refine-above", type=float, help="the cascade's (default: slide's)")
    args = parser.parse_args()
    work = args.work
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work}: not empty; give a new --work")
    (work / "slides").mkdir(parents=True)
    normal, tumour = held_out(args.run)
    slide = make_slide(
        work / "slides" / "slide.svs", normal, tumour, patches=args.patches, lesions=args.lesions, max_radius=3,
        offset=40, seed=7,
    )  # fmt: skip
    export = export_for_wsinfer(args.run, work / "wsinfer-model", normal[:32])
    wsinfer = ensure_venv(args.venv)
    home = work / "home"
    (home / ".wsinfer-zoo").mkdir(parents=True)
    (home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json").write_text('{"models": {}}')
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "WSINFER_FORCE_CPU": "1"}
    env.pop("PYTHONPATH", None)
    results: dict[str, Any] = {}
    command = [
        str(wsinfer), "run", "-i", str(work / "slides"), "-o", str(work / "wsinfer"),
        "-c", str(work / "wsinfer-model" / "config.json"), "-p", str(work / "wsinfer-model" / "model.pt"),
    ]  # fmt: skip
    results["wsinfer"] = measure(command, env, work / "wsinfer.log")
    table = pd.read_csv(work / "wsinfer" / "model-outputs-csv" / "slide.csv")
    results["wsinfer"]["windows"] = len(table)
    ours_env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    runs = {"cell96": ["--cell", "96"], "cell32": ["--cell", "32"], "cascade": ["--cascade"]}
    if args.refine_above is not None:
        runs["cascade"] += ["--refine-above", str(args.refine_above)]
    tiles = table.set_index(["minx", "miny"])["prob_tumour"]
    for name, extra in runs.items():
        out = work / name
        command = [
            sys.executable, "-m", "histodetect", "slide", str(args.run), str(slide.path), "--out", str(out),
            "--precision", args.precision, *extra,
        ]  # fmt: skip
        results[name] = measure(command, ours_env, work / f"{name}.log")
        summary = json.loads((out / "slide" / "summary.json").read_text())
        cells = pd.read_csv(out / "slide" / "cells.csv")
        shift = 0 if name == "cell96" else 32
        mine = cells.assign(minx=cells["x"].round().astype(int) - shift, miny=cells["y"].round().astype(int) - shift)
        both = mine.join(tiles, on=["minx", "miny"], how="inner")
        if name == "cascade":
            both = both[both["refined"] == 1]  # where the cascade scored the 32 px cell's own window
        results[name].update(
            windows=summary["windows_scored"], cells=summary["cells_scored"], engine=summary.get("engine"),
            precision=summary["precision"], scoring_windows_per_s=summary["windows_per_second"],
            seconds_split=summary["seconds_split"], slide_score=summary["slide_score"],
            cascade=summary.get("cascade"), coinciding_windows=len(both),
            max_abs_dp_vs_wsinfer=float(np.abs(both["probability"] - both["prob_tumour"]).max()) if len(both) else None,
        )  # fmt: skip
    for result in results.values():
        result["windows_per_s"] = round(result["windows"] / result["wall_s"], 1)
    base = results["wsinfer"]
    print(
        json.dumps(
            {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "slide": {
                    "size_px": list(slide.image_shape),
                    "tumour_patches": slide.tumour_patches,
                    "normal_patches": slide.normal_patches,
                },
                **export,
                "results": results,
                "cell96_windows_per_s_ratio": round(results["cell96"]["windows_per_s"] / base["windows_per_s"], 2),
                "cell96_peak_memory_ratio": round(results["cell96"]["peak_tree_pss_mb"] / base["peak_tree_pss_mb"], 2),
                "cascade_wall_ratio": round(results["cascade"]["wall_s"] / base["wall_s"], 2),
                "cell32_wall_ratio": round(results["cell32"]["wall_s"] / base["wall_s"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
