"""Stain robustness: a run's held-out patches untouched and re-stained as other labs', scored without and with
each stain normalisation, and what normalising costs beside scoring.

    python benchmarks/stain_robustness.py RUN [RUN...] --store STORE [--split test] [--limit N] [--threads T]
        [--shifts bench,heldout,evaluate]

For each run: ROC AUC on its ``--split`` patches (``split.csv``) untouched and under each re-staining of the
``--shifts`` sets (:data:`SHIFT_SETS`: this benchmark's own, a held-out set never used to choose anything, and
``evaluate --stain-shifts``'s), for each option of :data:`OPTIONS`:

- ``none``: the patches as they are (what the run does today, if it was trained without normalisation);
- ``macenko`` / ``reinhard``: each patch normalised on its own (``predict --stain-norm``);
- ``macenko-lab`` / ``reinhard-lab``: one fit per lab (up to 256 of its patches, as ``slide`` fits once per slide;
  ``--stain-fit set``).

Each option's ``delta`` is a lab's AUC minus the run's untouched AUC without normalisation; the first run is the
baseline the others' untouched AUC is compared with (``untouched_vs_first_run``).

The reference is the run's ``stain.json`` or, for a run trained before runs recorded one, fitted here the same way
(from up to 512 of its training patches). Scoring runs as ``predict`` does by default (no TTA, ``auto``
engine and precision: onnxruntime fp32 on a CPU). Then the time per patch of each normalisation beside the time per
patch of scoring, measured alternately on one batch in this process (median of ``--repeats``): a ratio, since a
shared machine's absolute times drift. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodetect.data.augment import STAIN_SHIFTS, StainShift, to_float, to_uint8
from histodetect.data.stain import StainFit, fit_stains, reference_patches, spread
from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.infer.evaluate import Restained
from histodetect.metrics import roc_auc
from histodetect.runs.layout import read_split, run_stain

# Six other labs: four H&E balances and two casts outside H&E (none of them evaluate's STAIN_SHIFTS).
BENCH_SHIFTS: dict[str, StainShift] = {
    "faded": StainShift(h=0.70, e=0.60),
    "overstained": StainShift(h=1.35, e=1.45),
    "pink": StainShift(h=0.90, e=1.45),
    "blue": StainShift(h=1.55, e=0.75),
    "aged-yellow": StainShift(e=0.85, yellow=0.15),
    "warm-scanner": StainShift(white=(1.05, 0.97, 0.88)),
}


@dataclass(frozen=True)
class ColourMatrix:
    """A re-staining outside :class:`StainShift`'s family: ``rgb' = M rgb`` on intensities, ``M`` a hue rotation
    by ``hue_degrees`` about the grey axis (YIQ), then each channel raised to ``gamma`` (a scanner's tone curve)."""

    hue_degrees: float = 0.0
    gamma: float = 1.0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        angle = torch.tensor(self.hue_degrees).deg2rad()
        rotate = torch.eye(3)
        rotate[1:, 1:] = torch.tensor([[angle.cos(), -angle.sin()], [angle.sin(), angle.cos()]])
        matrix = torch.linalg.inv(yiq) @ rotate @ yiq
        x = to_float(torch.from_numpy(np.ascontiguousarray(pixels)))
        out = torch.einsum("ij,bjhw->bihw", matrix, x).clamp(0, 1) ** self.gamma
        return to_uint8(out)


# Held out: made up before any run trained with --stain-aug was scored, and never used to choose a strength, a
# probability or an option, so its deltas estimate what unseen re-stainings do. H&E balances at the corners of
# x0.6..x1.6, casts combined with them, and three transforms no augmentation here makes (a hue turn, two gammas).
HELDOUT_SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "washed-out": StainShift(h=0.62, e=0.62),
    "dark-blue": StainShift(h=1.60, e=1.15),
    "pale-h-pink": StainShift(h=0.65, e=1.40),
    "faded-yellow": StainShift(h=0.80, e=0.90, yellow=0.20),
    "green-scanner": StainShift(white=(0.94, 1.04, 0.95)),
    "cold-pale": StainShift(h=0.75, e=0.75, white=(0.93, 0.98, 1.06)),
    "hue+8": ColourMatrix(hue_degrees=8.0),
    "gamma-0.8": ColourMatrix(gamma=0.8),
    "gamma-1.25": ColourMatrix(gamma=1.25),
}
SHIFT_SETS: dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]] = {
    "bench": dict(BENCH_SHIFTS),
    "heldout": HELDOUT_SHIFTS,
    "evaluate": dict(STAIN_SHIFTS),
}
OPTIONS = ("none", "macenko", "reinhard", "macenko-lab", "reinhard-lab")
TIMING_BATCH = 64  # the Predictor's CPU batch


def reference_of(run: Path, store: Store) -> tuple[StainFit, str]:
    recorded = run_stain(run)
    if recorded is not None:
        return recorded, "stain.json"
    train_rows = read_split(run, store, ("train",))["train"]
    patches = reference_patches(store.read(train_rows[spread(len(train_rows))]))
    return fit_stains(patches), f"fitted here on {len(patches)} training patches"


def score(
    run: Path,
    patches: np.ndarray,
    y: np.ndarray,
    reference: StainFit,
    options: list[str],
    shifts: dict[str, Callable[[np.ndarray], np.ndarray]],
) -> dict[str, dict[str, float]]:
    """ROC AUC per option and per lab (``untouched`` first)."""
    restained = {"untouched": patches}  # 1,000 patches: ~28 MB each
    restained.update({name: Restained(patches, shift)[:] for name, shift in shifts.items()})
    result: dict[str, dict[str, float]] = {}
    for option in options:
        method = option.removesuffix("-lab")
        predictor = Predictor([run], progress=False, stain_norm=method, stain_reference=reference)
        result[option] = {}
        for name, pixels in restained.items():
            fit = predictor.fit_stain_set(pixels, "set" if option.endswith("-lab") else "patch")
            result[option][name] = roc_auc(y, predictor.predict(pixels, stain=fit))
        if predictor.stain is not None:
            result[option]["fallbacks"] = predictor.stain.fallbacks
        print(json.dumps({"run": run.name, option: result[option]}), flush=True)
    return result


def timing(run: Path, patches: np.ndarray, reference: StainFit, repeats: int) -> dict[str, Any]:
    """Milliseconds per patch: scoring (no normalisation) and each normalisation alone, alternately."""
    batch = np.ascontiguousarray(patches[:TIMING_BATCH])
    pixels = torch.from_numpy(batch)
    scorer = Predictor([run], progress=False, stain_norm="none")
    macenko = Predictor([run], progress=False, stain_norm="macenko", stain_reference=reference).stain
    reinhard = Predictor([run], progress=False, stain_norm="reinhard", stain_reference=reference).stain
    lab = fit_stains(batch)
    steps = {
        "scoring": lambda: scorer.predict_batch(batch),
        "macenko": lambda: macenko(pixels),
        "reinhard": lambda: reinhard(pixels),
        "macenko-lab": lambda: macenko(pixels, lab),
        "reinhard-lab": lambda: reinhard(pixels, lab),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        for step in steps.values():
            step()  # warm-up
        for _ in range(repeats):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - started) / len(batch) * 1000)
    ms = {name: statistics.median(values) for name, values in times.items()}
    return {
        "ms_per_patch": {name: round(value, 4) for name, value in ms.items()},
        "share_of_scoring": {name: round(ms[name] / ms["scoring"], 4) for name in steps if name != "scoring"},
        "scoring_engine": scorer.engine,
        "scoring_precision": scorer.precision,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out patches")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {', '.join(OPTIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--shifts", default="bench,heldout", help=f"comma list of {', '.join(SHIFT_SETS)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.store)
    sets = {name: SHIFT_SETS[name] for name in args.shifts.split(",")}
    shifts = {f"{set_name}/{lab}": shift for set_name, labs in sets.items() for lab, shift in labs.items()}
    report: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "shifts": {name: asdict(shift) if is_dataclass(shift) else repr(shift) for name, shift in shifts.items()},
        "runs": {},
    }
    first_untouched: float | None = None
    for run in args.runs:
        rows = read_split(run, store, (args.split,))[args.split][: args.limit]
        patches, y = store.read(rows), store.labels[rows].astype(np.int64)
        reference, source = reference_of(run, store)
        options = ["none", *(o for o in args.options.split(",") if o != "none")]  # none: today's, the baseline
        auc = score(run, patches, y, reference, options, shifts)
        today = auc["none"]["untouched"]
        first_untouched = today if first_untouched is None else first_untouched
        summary = {
            option: {
                "untouched_change": auc[option]["untouched"] - today,
                "untouched_vs_first_run": auc[option]["untouched"] - first_untouched,
                "delta": {lab: round(auc[option][lab] - today, 4) for lab in shifts},
                **{
                    f"worst_{set_name}": {
                        "lab": min(labs, key=lambda lab, o=option, n=set_name: auc[o][f"{n}/{lab}"]),
                        "loss_vs_untouched": max(today - auc[option][f"{set_name}/{lab}"] for lab in labs),
                    }
                    for set_name, labs in sets.items()
                },
            }
            for option in options
        }
        report["runs"][str(run)] = {
            "patches": len(rows),
            "reference": source,
            "auc": auc,
            "summary": summary,
            "timing": timing(run, patches, reference, args.repeats),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
