"""What ``slide --cascade`` keeps and saves against the full 32 px pass, on slides of real held-out patches.

    python benchmarks/slide_cascade.py RUN [--slides 3] [--patches 30] [--lesions 3] [--work DIR]

Builds ``--slides`` slides (``real_slides.py``: discs of the run's held-out ``test`` patches, mostly normal, with
``--lesions`` tumour lesions each) and scores each with ``score_slide`` three ways: the full 32 px pass, the 96 px
pass (``--cell 96``, every cell of the grid), and the cascade at the ``--refine-above`` it recommends. For a grid of
thresholds the cascade's answer is computed from the first two (refined cells take the full pass's probability,
which ``tests/infer/test_cascade.py`` checks is what the cascade gives; the rest their coarse cell's), giving per
threshold: the share of the full pass's cells at or above 0.5 that the cascade also puts at or above 0.5 (pooled
over the slides, and the worst slide), cells it adds there, the largest change of a slide score (top-10 mean) and the
windows scored as a share of the full pass's. The recommendation is the highest threshold that keeps at least 99% of
those cells on every slide; the real cascade is then run at it, timed against the full pass (scoring seconds, same
process, one after the other), and its probabilities compared with the computed ones. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import binary_dilation

from histodetect.infer.engine import Predictor
from histodetect.infer.slide import score_slide
from real_slides import held_out, make_slide

THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
POSITIVE = 0.5
KEEP = 0.99


def heat(folder: Path) -> np.ndarray:
    return np.load(folder / "heatmap.npy")


def coarse_cells(full: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """The 96 px heatmap where the cascade scores it: cells holding a scored 32 px cell; NaN elsewhere."""
    padded = np.zeros((coarse.shape[0] * 3, coarse.shape[1] * 3), dtype=bool)
    padded[: full.shape[0], : full.shape[1]] = np.isfinite(full)
    return np.where(padded.reshape(coarse.shape[0], 3, coarse.shape[1], 3).any(axis=(1, 3)), coarse, np.nan)


def simulate(full: np.ndarray, coarse: np.ndarray, above: float) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's fine heatmap at ``above`` from the full 32 px and the 96 px heatmaps; and its refined cells."""
    coarse = coarse_cells(full, coarse)
    spread = np.repeat(np.repeat(coarse, 3, axis=0), 3, axis=1)[: full.shape[0], : full.shape[1]]
    reach = binary_dilation(np.nan_to_num(spread, nan=0.0) >= above, structure=np.ones((3, 3), dtype=bool))
    scored = np.isfinite(full)
    return np.where(reach & scored, full, np.where(scored, spread, np.nan)), reach & scored


def top_mean(p: np.ndarray, k: int = 10) -> float:
    values = np.sort(p[np.isfinite(p)])[::-1][:k]
    return float(values.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--patches", type=int, default=30, help="the tissue disc's diameter, in patches")
    parser.add_argument("--lesions", type=int, default=3)
    parser.add_argument("--max-radius", type=float, default=2.5, help="largest lesion radius, in patches")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--work", type=Path, help="keep slides and outputs here (default: a temporary folder)")
    args = parser.parse_args()
    predictor = Predictor([args.run], precision=args.precision, engine=args.engine, progress=False)
    normal, tumour = held_out(args.run)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        slides, maps = [], []
        for k in range(args.slides):
            slide = make_slide(
                work / f"slide{k}.svs", normal, tumour, patches=args.patches, lesions=args.lesions,
                max_radius=args.max_radius, offset=40, seed=k,
            )  # fmt: skip
            full = score_slide(predictor, slide.path, work / f"full{k}", workers=args.workers, progress=False)
            coarse = score_slide(
                predictor, slide.path, work / f"coarse{k}", cell=96, min_tissue=0, workers=args.workers,
                progress=False,
            )  # fmt: skip
            maps.append((heat(work / f"full{k}"), heat(work / f"coarse{k}")))
            slides.append(
                {
                    "slide": slide.path.name, "size_px": list(slide.image_shape),
                    "tumour_patches": slide.tumour_patches, "normal_patches": slide.normal_patches,
                    "cells_scored": full["cells_scored"],
                    "cells_at_or_above_0.5": full["cells_at_or_above_threshold"], "slide_score": full["slide_score"],
                    "full_scoring_s": full["scoring_seconds"], "full_seconds_split": full["seconds_split"],
                    "coarse_96_scoring_s": coarse["scoring_seconds"], "coarse_96_windows": coarse["cells_scored"],
                }
            )  # fmt: skip
        sweep = []
        for above in THRESHOLDS:
            kept = positives = added = windows = cells = 0
            worst, score_change = 1.0, 0.0
            for full, coarse in maps:
                cascade, refined = simulate(full, coarse, above)
                hot = full >= POSITIVE
                share = (cascade[hot] >= POSITIVE).mean() if hot.any() else 1.0
                worst = min(worst, float(share))
                kept += int((cascade[hot] >= POSITIVE).sum())
                positives += int(hot.sum())
                added += int(((cascade >= POSITIVE) & ~hot).sum())
                score_change = max(score_change, abs(top_mean(cascade) - top_mean(full)))
                centres = np.zeros_like(refined)
                centres[1::3, 1::3] = True
                windows += int(np.isfinite(coarse_cells(full, coarse)).sum()) + int((refined & ~centres).sum())
                cells += int(np.isfinite(full).sum())
            sweep.append(
                {
                    "refine_above": above, "kept_share": round(kept / max(positives, 1), 5), "worst_slide_share":
                    round(worst, 5), "cells_added": added, "max_slide_score_change": round(score_change, 5),
                    "windows_share_of_full": round(windows / cells, 4),
                }
            )  # fmt: skip
        chosen = max((s["refine_above"] for s in sweep if s["worst_slide_share"] >= KEEP), default=THRESHOLDS[0])
        timed = []
        for k, slide in enumerate(slides):
            summary = score_slide(
                predictor, work / slide["slide"], work / f"cascade{k}", cascade=True, refine_above=chosen,
                workers=args.workers, progress=False,
            )  # fmt: skip
            cells = pd.read_csv(work / f"cascade{k}" / "cells.csv")
            expected, _ = simulate(*maps[k], chosen)
            dp = np.abs(cells["probability"].to_numpy() - expected[cells["row"], cells["col"]]).max()
            timed.append(
                {
                    "slide": slide["slide"], "cascade_scoring_s": summary["scoring_seconds"],
                    "full_scoring_s": slide["full_scoring_s"],
                    "speedup": round(slide["full_scoring_s"] / summary["scoring_seconds"], 2),
                    "cells_refined": summary["cascade"]["cells_refined"], "windows_scored": summary["windows_scored"],
                    "cells_scored": summary["cells_scored"], "max_abs_dp_vs_computed": float(f"{dp:.3g}"),
                    "slide_score": summary["slide_score"], "full_slide_score": slide["slide_score"],
                    "cascade_seconds_split": summary["seconds_split"],
                }
            )  # fmt: skip
    result: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "run": str(args.run),
        "engine": predictor.engine,
        "precision": predictor.precision,
        "slides": slides,
        "sweep": sweep,
        "recommended_refine_above": chosen,
        "cascade_at_recommended": timed,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
