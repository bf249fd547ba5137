"""A run judged on Camelyon16-style cohorts built from its own held-out patches: slide decisions, slide ROC AUC,
lesion FROC, and time per slide.

    python benchmarks/cohort_metrics.py RUN STORE [--out DIR] [--tumour 12] [--normal 12] [--grid 12 16]
                                          [--settings default cascade cell96]

The run's ``split.csv`` names the patches no training saw (``test``, else ``val``); they are cut in two halves by
id, and each half makes a cohort (:func:`histodetect.data.mosaic.build_cohort`: normal tissue of real normal patches
with 1-3 lesions of real tumour patches on the tumour slides, ASAP XML outlines, a Camelyon16 reference CSV):
``tuning`` (to choose settings on) and ``held-out`` (to report). Each is scored by ``histodetect slide`` with
``--annotations`` and ``--reference`` under each of ``--settings`` (``default``, ``cascade``: ``--cascade``,
``cell96``: ``--cell 96``), and its ``cohort.json`` summarised. Prints one JSON object. Patches are reused across
slides (with random dihedral turns), so slides of one cohort share pixels.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from histodetect.data.mosaic import build_cohort
from histodetect.data.reference import read_reference
from histodetect.data.store import Store
from histodetect.infer.engine import Predictor
from histodetect.infer.slide_batch import score_slides

SETTINGS = {"default": {}, "cascade": {"cascade": True}, "cell96": {"cell": 96}}


def held_out(run: Path, store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, ids and labels of the store's patches the run never trained on."""
    split = pd.read_csv(run / "split.csv")
    part = "test" if (split["part"] == "test").any() else "val"
    ids = set(split.loc[split["part"] == part, "id"])
    rows = np.array([r for r, i in enumerate(store.ids) if i in ids])
    return rows, store.ids[rows], store.labels[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks-output/cohort"))
    parser.add_argument("--tumour", type=int, default=12)
    parser.add_argument("--normal", type=int, default=12)
    parser.add_argument("--grid", type=int, nargs=2, default=(12, 16))
    parser.add_argument("--cohorts", nargs="+", default=["tuning", "held-out"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--settings", nargs="+", default=["default"], choices=sorted(SETTINGS))
    args = parser.parse_args()

    store = Store(args.store)
    rows, ids, labels = held_out(args.run, store)
    half = np.array([int(i[:8], 16) % 2 for i in ids])
    predictor = Predictor([args.run], progress=False)
    result: dict = {"run": str(args.run), "cpu": platform.processor() or platform.machine(), "cohorts": {}}
    for k, name in enumerate(["tuning", "held-out"]):
        if name not in args.cohorts:
            continue
        chosen = half == k
        folder = args.out / name
        slides = build_cohort(
            folder / "data",
            store.read(rows[chosen]),
            labels[chosen],
            tumour_slides=args.tumour,
            normal_slides=args.normal,
            grid=tuple(args.grid),
            seed=k,
        )
        truth = read_reference(folder / "data" / "reference.csv")
        for setting in args.settings:
            started = time.perf_counter()
            score_slides(
                predictor,
                [s.path for s in slides],
                folder / setting,
                annotations=folder / "data" / "annotations",
                reference=folder / "data" / "reference.csv",
                workers=args.workers,
                progress=False,
                **SETTINGS[setting],
            )
            cohort = json.loads((folder / setting / "cohort.json").read_text())
            keys = ("roc_auc", "roc_auc_ci", "sensitivity", "specificity")
            result["cohorts"][f"{name}/{setting}"] = {
                "patches": int(chosen.sum()),
                "slides": len(slides),
                "tumour_slides": sum(truth.values()),
                "lesions_built": sum(len(s.lesions) for s in slides),
                "seconds_per_slide": round((time.perf_counter() - started) / len(slides), 1),
                "slide": {k: cohort["slide"].get(k) for k in keys},
                "decisions_right": cohort["slide"]["correct"] / max(cohort["slide"]["slides"], 1),
                "lesion": {k: v for k, v in cohort["lesion"].items() if k != "curve"},
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
