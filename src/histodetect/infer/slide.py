"""``histodetect slide``: a whole slide (or an image region) -> a tumour heatmap, cells, GeoJSON and a slide score.

A PCam/Kaggle label speaks for a patch's centre 32x32 pixels; the rest of the 96x96 patch is context. So the slide
is cut into cells of 32 pixels *at the model's scale* and each cell is scored by the 96x96 window centred on it:
every cell once, by the question the model was trained on. ``cell`` 48 or 96 cuts coarser cells (still scored by
the 96 px window centred on each; at 96, one window per 96x96 area), and the cascade (:func:`cascade_cells`) scores
96 px cells first and the fine cells only near coarse windows that may hold tumour.

Scale: a run records the microns per pixel it was trained at (``TrainConfig.mpp``). The slide's own resolution
comes from the file (OpenSlide's ``openslide.mpp-x/y``) or ``slide_mpp``. The level read is the coarsest one at
least as fine as the model's scale, give or take ``SCALE_TOLERANCE``, and windows are averaged down from it to the
model's scale; a factor within that tolerance of a whole number is rounded to it, so a level at the model's scale
is read as it is (a slide at the model's scale is scored on its exact pixels) and one at twice the resolution is
averaged 2x2 on its own pixel grid. A level coarser than the model's scale is refused: upsampling invents no detail.
A slide file without a resolution is refused unless ``slide_mpp`` is given; a plain image (PNG, JPEG, untiled TIFF:
a region exported from a viewer) without one is taken to be at the model's scale, and ``summary.json`` says so
(``mpp_source``).

Streaming: the tissue mask comes from a low-resolution view (:mod:`histodetect.data.tissue`); then blocks of
``BLOCK`` x ``BLOCK`` cells that hold tissue are read, one region each with the 32 px margin the windows need, by
``DataLoader`` worker processes, so decoding overlaps inference; batches go through :class:`Predictor` (its TTA,
precision and ensemble). Memory holds the cell grid and a few blocks, whatever the slide's size.

Outputs go into a hidden folder renamed to ``out`` at the end (:mod:`histodetect.infer.slide_outputs` writes
them), so a failed or killed slide leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from scipy.ndimage import binary_dilation
from torch.utils.data import DataLoader, Dataset

from histodetect.data.annotations import check_fits, inside, read_polygons
from histodetect.data.stain import StainError, StainFit, spread
from histodetect.data.store import PATCH_SHAPE
from histodetect.data.tissue import region_mask, tissue_fraction, window_share
from histodetect.data.wsi import SlideReader, open_slide
from histodetect.errors import InferError, UserError
from histodetect.infer import slide_outputs
from histodetect.infer.engine import Predictor, progress_bar
from histodetect.io import remove_dead_leftovers
from histodetect.runs.config import MAX_MPP, MIN_MPP

WINDOW = PATCH_SHAPE[0]  # 96: what every model was trained on
CELL = 32  # the labelled centre of a window: the default cell
MARGIN = (WINDOW - CELL) // 2  # context on each side of a default cell (Scale.margin for every cell size)
CELLS = (32, 48, 96)  # cell sizes (model pixels) a slide can be scored at; 96: one window per 96x96 area, no overlap
BLOCK_PIXELS = 512  # model pixels of cells a side read as one region (16 cells of 32 px: margins cost ~27% extra)
# Scale factors within 8% of a whole number are rounded to it: within 8% of 1, a level is read as it is (no
# resampling). The training data already span that much: Camelyon16's two scanners work at 0.243 and 0.226 um/px,
# so PCam's 0.972 um/px patches are really 0.90-0.97; and a slide's recorded mpp is rarely better than a few percent.
SCALE_TOLERANCE = 0.08
REFINE_ABOVE = 0.25  # --cascade: the highest that kept >= 99% of the full pass's cells >= 0.5 (docs/slides.md)
TOP_K = 10  # the slide score is the mean of the k most suspicious cells (and their max)
PARTIAL = ".partial-"
STAIN_WINDOWS = 256  # tissue windows a slide's stains are fitted on (torchstain's fit of 2.4 M pixels)


@dataclass(frozen=True)
class Scale:
    """How the model's pixels map onto the slide: ``factor`` level pixels per model pixel at ``level``."""

    slide_mpp: float
    mpp_source: str
    model_mpp: float
    level: int
    downsample: float
    factor: float
    cell_px: int = CELL  # a cell's side in model pixels (one of CELLS)

    @property
    def level0_per_pixel(self) -> float:
        """Level-0 pixels per model pixel."""
        return self.factor * self.downsample

    @property
    def model_mpp_read(self) -> float:
        """Microns per model pixel as read: the model's scale, up to the ``SCALE_TOLERANCE`` left unresampled."""
        return self.slide_mpp * self.level0_per_pixel

    @property
    def cell(self) -> float:
        """A cell's side in level-0 pixels."""
        return self.cell_px * self.level0_per_pixel

    @property
    def margin(self) -> int:
        """Model pixels of context on each side of a cell inside its window."""
        return (WINDOW - self.cell_px) // 2


def choose_scale(
    reader: SlideReader,
    model_mpp: float,
    slide_mpp: float | None = None,
    level: int | None = None,
    cell: int = CELL,
) -> Scale:
    """The level to read and the resampling factor that bring ``reader`` to ``model_mpp``; cells of ``cell`` model
    pixels."""
    if not MIN_MPP <= model_mpp <= MAX_MPP:  # NaN fails too
        raise InferError(
            f"the model's scale is {model_mpp} microns a pixel; it must be {MIN_MPP}..{MAX_MPP} (train --mpp)"
        )
    if slide_mpp is not None:
        check_slide_mpp(slide_mpp)
        source = "--slide-mpp"
    elif reader.mpp is not None:
        if not MIN_MPP <= reader.mpp <= MAX_MPP:
            raise InferError(
                f"{reader.name}: the file records {reader.mpp:g} microns a pixel, outside {MIN_MPP}..{MAX_MPP}; "
                "its header is not credible (give the real scale with --slide-mpp)"
            )
        slide_mpp, source = reader.mpp, "file"
    elif reader.in_memory:
        slide_mpp, source = model_mpp, "assumed: a plain image at the model's scale"
    else:
        raise InferError(
            f"{reader.path}: the file does not record its microns per pixel; pass --slide-mpp "
            "(about 0.25 for a 40x scan, 0.5 for 20x)"
        )
    wanted = model_mpp / slide_mpp  # level-0 pixels per model pixel
    if level is None:
        level = reader.best_level(wanted * (1 + SCALE_TOLERANCE))
    elif not 0 <= level < len(reader.level_downsamples):
        raise InferError(
            f"{reader.name}: --level {level} does not exist; it has levels 0..{len(reader.level_downsamples) - 1}"
        )
    downsample = reader.level_downsamples[level]
    factor = wanted / downsample
    if factor < 1 - SCALE_TOLERANCE:
        raise InferError(
            f"{reader.name}: level {level} is at {slide_mpp * downsample:.3g} microns a pixel, coarser than the "
            f"model's {model_mpp:.3g}; pass a finer --level or check --slide-mpp"
        )
    if round(factor) >= 1 and abs(factor - round(factor)) <= SCALE_TOLERANCE * factor:
        factor = float(round(factor))
    return Scale(slide_mpp, source, model_mpp, level, downsample, factor, cell)


def check_slide_mpp(slide_mpp: float) -> None:
    if not MIN_MPP <= slide_mpp <= MAX_MPP:  # NaN fails too
        raise InferError(f"--slide-mpp {slide_mpp}: must be {MIN_MPP}..{MAX_MPP} microns a pixel")


def check_options(
    *,
    min_tissue: float = 0.1,
    threshold: float = 0.5,
    top_k: int = TOP_K,
    slide_mpp: float | None = None,
    level: int | None = None,
    workers: int | None = None,
    cell: int = CELL,
    cascade: bool = False,
    refine_above: float = REFINE_ABOVE,
) -> None:
    """Refuse bad slide options in one line, before a model is loaded or any folder made (the command checks them
    first; ``score_slide`` again, for callers of the library)."""
    if not 0.0 <= min_tissue <= 1.0:
        raise InferError(f"--min-tissue {min_tissue}: must be within [0, 1]")
    if not 0.0 <= threshold <= 1.0:
        raise InferError(f"--threshold {threshold}: must be within [0, 1]")
    if top_k < 1:
        raise InferError(f"--top-k {top_k}: must be at least 1")
    if slide_mpp is not None:
        check_slide_mpp(slide_mpp)
    if level is not None and level < 0:
        raise InferError(f"--level {level}: must be 0 or more")
    if workers is not None and not 0 <= workers <= 64:
        raise InferError(f"--workers {workers}: must be 0..64 reader processes")
    if cell not in CELLS:
        raise InferError(f"--cell {cell}: choose from {', '.join(map(str, CELLS))} (model pixels)")
    if cascade and cell == WINDOW:
        raise InferError(
            f"--cascade refines 96 px cells to --cell 32 or 48; with --cell {cell} there is nothing to refine"
        )
    if not 0.0 <= refine_above <= 1.0:
        raise InferError(f"--refine-above {refine_above}: must be within [0, 1]")


class CellBlocks(Dataset[tuple[np.ndarray, np.ndarray | None, str | None]]):
    """The windows of the listed cells, a block of cells at a time: item ``i`` is (positions of its cells in
    ``cells``, their uint8 ``(n, 96, 96, 3)`` windows, None) or (positions, None, the error) when the slide cannot
    be read there (a worker's exception would reach the user as a traceback)."""

    def __init__(self, reader: SlideReader, scale: Scale, cells: np.ndarray) -> None:
        self.reader = reader
        self.scale = scale
        self.cells = cells
        block = max(1, BLOCK_PIXELS // scale.cell_px)
        block_id = (cells[:, 0] // block) * (cells[:, 1].max(initial=0) // block + 1) + cells[:, 1] // block
        order = np.argsort(block_id, kind="stable")
        bounds = np.flatnonzero(np.diff(block_id[order])) + 1
        self.groups = np.split(order, bounds) if len(order) else []

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        positions = self.groups[i]
        rows, cols = self.cells[positions, 0], self.cells[positions, 1]
        r0, c0 = rows.min(), cols.min()
        cell, margin = self.scale.cell_px, self.scale.margin
        height = (rows.max() - r0 + 1) * cell + 2 * margin
        width = (cols.max() - c0 + 1) * cell + 2 * margin
        x0, y0 = c0 * cell - margin, r0 * cell - margin  # model pixels
        s = self.scale.level0_per_pixel
        try:
            region = self.reader.read_scaled(
                (x0 * s, y0 * s, (x0 + width) * s, (y0 + height) * s), (width, height), level=self.scale.level
            )
        except UserError as exc:
            return positions, None, str(exc)
        views = np.lib.stride_tricks.sliding_window_view(region, (WINDOW, WINDOW, 3))[::cell, ::cell, 0]
        return positions, np.ascontiguousarray(views[rows - r0, cols - c0]), None


def _as_is(item: Any) -> Any:
    """No collation: blocks arrive as the numpy arrays the worker made."""
    return item


def die_with_parent(_: int = 0) -> None:
    """A reader worker's ``worker_init_fn``: on Linux, ask the kernel to end this process when its parent dies, so
    that ``kill -9`` on ``slide`` leaves no orphaned reader holding hundreds of MB (PyTorch's own watchdog only
    notices between items)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def default_workers() -> int:
    """Reader processes: one core is left to inference, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def fit_slide_stain(
    predictor: Predictor, reader: SlideReader, scale: Scale, cells: np.ndarray
) -> tuple[StainFit | None, dict[str, Any] | None]:
    """The predictor's stain normalisation fitted once on the slide's tissue (up to ``STAIN_WINDOWS`` of the
    ``cells`` windows, spread over it), so neighbouring windows are normalised alike, and what ``summary.json``
    records of it. (None, None) without normalisation; (None, record) when the tissue holds too little stain to
    fit, and each window is then fitted on its own."""
    if predictor.stain is None:
        return None, None
    picked = cells[spread(len(cells), STAIN_WINDOWS)]
    windows = [w for _, w, _ in CellBlocks(reader, scale, picked) if w is not None] if len(picked) else []
    record: dict[str, Any] = {
        "method": predictor.stain.method,
        "reference": predictor.stain.reference_source,
        "fitted_on_windows": sum(len(w) for w in windows),
    }
    try:
        fit = predictor.fit_stain(np.concatenate(windows)) if windows else None
    except StainError as exc:
        fit, record["not_fitted"] = None, str(exc)
    record["slide_stains"] = fit.to_dict() if fit is not None else None
    return fit, record


def score_cells(
    predictor: Predictor,
    reader: SlideReader,
    scale: Scale,
    cells: np.ndarray,
    *,
    workers: int | None = None,
    progress: bool = True,
    clock: dict[str, float] | None = None,
    stain: StainFit | None = None,
) -> np.ndarray:
    """float32 probability of each ``(row, col)`` in ``cells``, by the window centred on it. ``clock`` gains the
    seconds spent waiting for windows (``reading``: reading and decoding not hidden behind the model) and in the
    model (``model``); ``stain``: the slide's fit (:func:`fit_slide_stain`), or None for each window's own."""
    clock = {} if clock is None else clock
    clock.setdefault("reading", 0.0)
    clock.setdefault("model", 0.0)
    probabilities = np.full(len(cells), np.nan, dtype=np.float32)
    if not len(cells):
        return probabilities
    blocks = CellBlocks(reader, scale, cells)
    workers = 0 if reader.in_memory else (default_workers() if workers is None else workers)
    loader = DataLoader(
        blocks,
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=4 if workers else None,
        worker_init_fn=die_with_parent if workers else None,
    )
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    count = 0
    with progress_bar(progress, len(cells), reader.name, unit="cells") as advance:

        def flush(n: int) -> None:
            nonlocal pending, count
            if len(pending) > 1:  # one array; a block's windows are then batched as views, not copied again
                pending = [(np.concatenate([p for p, _ in pending]), np.concatenate([w for _, w in pending]))]
            positions, windows = pending[0]
            started = time.perf_counter()
            probabilities[positions[:n]] = predictor.predict_batch(windows[:n], stain)
            clock["model"] += time.perf_counter() - started
            pending = [(positions[n:], windows[n:])] if n < len(positions) else []
            count -= n
            advance(n)

        blocks_read = iter(loader)
        while True:
            started = time.perf_counter()
            item = next(blocks_read, None)
            clock["reading"] += time.perf_counter() - started
            if item is None:
                break
            positions, windows, error = item
            if error is not None:
                raise InferError(error)
            pending.append((positions, windows))
            count += len(positions)
            while count >= predictor.batch_size:
                flush(predictor.batch_size)
        if count:
            flush(count)
    return probabilities


@dataclass
class Cascade:
    """What :func:`cascade_cells` did: the cells it refined (scored at the fine cell size) and its counts."""

    refined: np.ndarray  # (n,) bool, per cell of the fine grid's selection
    refine_above: float
    coarse_windows: int
    fine_windows: int

    def summary(self) -> dict[str, Any]:
        return {
            "coarse_cell_px": WINDOW,
            "refine_above": self.refine_above,
            "coarse_windows": self.coarse_windows,
            "cells_refined": int(self.refined.sum()),
            "fine_windows": self.fine_windows,
        }


def cascade_cells(
    predictor: Predictor,
    reader: SlideReader,
    scale: Scale,
    selected: np.ndarray,
    refine_above: float,
    *,
    workers: int | None = None,
    progress: bool = True,
    clock: dict[str, float] | None = None,
    stain: StainFit | None = None,
) -> tuple[np.ndarray, Cascade]:
    """Probabilities of the cells of ``selected`` (the fine grid, ``scale.cell_px`` 32 or 48), coarse first: every
    96 px cell that holds a selected cell is scored by its own window (no overlap), then only the fine cells whose
    window overlaps a coarse window at or above ``refine_above`` (those of its area and one cell around it) are
    scored by their own window; the others keep the probability of the coarse cell they lie in.
    With 32 px cells a coarse window is exactly the window of the fine cell at its centre, which is not scored twice.
    """
    ratio = WINDOW // scale.cell_px
    rows, cols = selected.shape
    coarse_grid = (-(-rows // ratio), -(-cols // ratio))
    padded = np.zeros((coarse_grid[0] * ratio, coarse_grid[1] * ratio), dtype=bool)
    padded[:rows, :cols] = selected
    coarse_cells = np.argwhere(padded.reshape(coarse_grid[0], ratio, coarse_grid[1], ratio).any(axis=(1, 3)))
    coarse = np.full(coarse_grid, np.nan, dtype=np.float32)
    coarse[coarse_cells[:, 0], coarse_cells[:, 1]] = score_cells(
        predictor, reader, replace(scale, cell_px=WINDOW), coarse_cells, workers=workers, progress=progress,
        clock=clock, stain=stain,
    )  # fmt: skip
    spread = np.repeat(np.repeat(coarse, ratio, axis=0), ratio, axis=1)[:rows, :cols]
    reach = binary_dilation(spread >= refine_above, structure=np.ones((3, 3), dtype=bool))  # NaN compares False
    cells = np.argwhere(selected)
    probabilities = spread[cells[:, 0], cells[:, 1]]
    refined = reach[cells[:, 0], cells[:, 1]]
    todo = refined & ~(cells % ratio == ratio // 2).all(axis=1) if ratio % 2 else refined
    probabilities[todo] = score_cells(
        predictor, reader, scale, cells[todo], workers=workers, progress=progress, clock=clock, stain=stain
    )
    return probabilities, Cascade(refined, refine_above, len(coarse_cells), int(todo.sum()))


def score_slide(
    predictor: Predictor,
    slide: str | os.PathLike[str] | SlideReader,
    out: str | os.PathLike[str],
    *,
    min_tissue: float = 0.1,
    threshold: float = 0.5,
    slide_mpp: float | None = None,
    level: int | None = None,
    mask: str | os.PathLike[str] | None = None,
    annotations: str | os.PathLike[str] | shapely.Geometry | None = None,
    cell_features: bool = False,
    top_k: int = TOP_K,
    cell: int = CELL,
    cascade: bool = False,
    refine_above: float = REFINE_ABOVE,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every tissue cell of ``slide`` (a path, or a reader already open) with ``predictor`` and write the
    slide's folder ``out`` (which must not exist, or be empty): ``cells.csv``, ``heatmap.npy``, ``heatmap.png``,
    ``tumour.geojson`` (and ``cells.geojson`` with ``cell_features``) and ``summary.json``. Returns the summary.
    ``cell``: the cells' side in model pixels (each scored by the 96 px window centred on it); ``cascade``: score
    at 96 px first and at ``cell`` only near windows at or above ``refine_above`` (:func:`cascade_cells`)."""
    check_options(
        min_tissue=min_tissue, threshold=threshold, top_k=top_k, slide_mpp=slide_mpp, level=level, workers=workers,
        cell=cell, cascade=cascade, refine_above=refine_above,
    )  # fmt: skip
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        reader = slide if isinstance(slide, SlideReader) else stack.enter_context(open_slide(slide))
        scale = choose_scale(reader, predictor.mpp, slide_mpp, level, cell)
        width, height = reader.dimensions
        grid = (math.ceil(height / scale.cell), math.ceil(width / scale.cell))
        clock = {"tissue_mask": time.perf_counter()}
        fraction, saturation = tissue_fraction(reader, scale.cell, grid)
        window = window_share(fraction, scale.cell_px, WINDOW)
        clock["tissue_mask"] = time.perf_counter() - clock["tissue_mask"]
        selected = window >= min_tissue if min_tissue > 0 else np.ones(grid, dtype=bool)
        if mask is not None:
            selected &= region_mask(mask, reader, scale.cell, grid)
        truth_area = annotations if isinstance(annotations, shapely.Geometry) else None
        if annotations is not None and truth_area is None:
            truth_area = read_polygons(annotations)
            check_fits(truth_area, annotations, reader.name, width, height)
        cells = np.argwhere(selected)
        if not len(cells):  # an all-glass (or all-black) slide has no answer, not a negative one
            where = f" inside --mask {mask}" if mask is not None else ""
            raise InferError(
                f"{reader.name}: no tissue found{where} (no cell's window is {min_tissue:.0%} tissue); nothing to score"
            )
        with _folder(Path(out)) as folder:
            scoring = time.perf_counter()
            stain, stain_record = fit_slide_stain(predictor, reader, scale, cells)
            if cascade:
                probabilities, cascaded = cascade_cells(
                    predictor,
                    reader,
                    scale,
                    selected,
                    refine_above,
                    workers=workers,
                    progress=progress,
                    clock=clock,
                    stain=stain,
                )
                windows = cascaded.coarse_windows + cascaded.fine_windows
            else:
                probabilities = score_cells(predictor, reader, scale, cells, workers=workers, progress=progress,
                                            clock=clock, stain=stain)  # fmt: skip
                cascaded, windows = None, len(cells)
            scoring = time.perf_counter() - scoring
            truth = None
            if truth_area is not None:
                centres = (cells[:, ::-1] + 0.5) * scale.cell
                truth = inside(truth_area, centres[:, 0], centres[:, 1])
            cell_mm = scale.cell_px * scale.model_mpp_read / 1000
            scored = slide_outputs.ScoredSlide(
                reader,
                scale.cell,
                cell_mm**2,
                fraction,
                window,
                cells,
                probabilities,
                truth,
                scale.slide_mpp,
                truth_area,
                cascaded.refined if cascaded is not None else None,
            )
            scores = slide_outputs.summarise(scored, threshold=threshold, top_k=top_k)
            checked = {}
            if truth_area is not None:
                checked = slide_outputs.agreement(scored, truth_area.area > 0, scores["slide_positive"])
            summary = {
                "slide": str(reader.path) if reader.path is not None else reader.name,
                "reader": reader.kind,
                "vendor": getattr(reader, "vendor", None),
                "width": width,
                "height": height,
                "levels": len(reader.level_dimensions),
                "mpp": scale.slide_mpp,
                "mpp_source": scale.mpp_source,
                "model_mpp": scale.model_mpp,
                "level": scale.level,
                "level_downsample": scale.downsample,
                "scale_factor": scale.factor,
                "cell_size": round(scale.cell, 4),
                "cell_px": scale.cell_px,
                "cascade": cascaded.summary() if cascaded is not None else None,
                "grid": list(grid),
                "min_tissue": min_tissue,
                "saturation_threshold": round(saturation, 4),
                "mask": str(mask) if mask is not None else None,
                **scores,
                "annotations": _describe(annotations),
                **checked,
                "runs": predictor.sources,
                "tta": predictor.tta,
                "precision": predictor.precision,
                "engine": predictor.engine,
                "stain_norm": stain_record,
                "scoring_seconds": round(scoring, 2),
                "cells_per_second": round(len(cells) / scoring, 1) if scoring > 0 and len(cells) else None,
                "windows_scored": windows,
                "windows_per_second": round(windows / scoring, 1) if scoring > 0 and windows else None,
                "seconds_split": {key: round(value, 2) for key, value in clock.items()},
                "seconds": round(time.perf_counter() - started, 2),
            }
            slide_outputs.write_all(folder, scored, summary, threshold=threshold, cell_features=cell_features)
    return summary


def _describe(annotations: str | os.PathLike[str] | shapely.Geometry | None) -> str | None:
    """What ``summary.json`` says of the truth: the file, or that a cohort's slide without one is outlined as
    normal (a geometry given directly)."""
    if annotations is None:
        return None
    if isinstance(annotations, shapely.Geometry):
        return "no outline file: normal" if annotations.is_empty else "outlines given directly"
    return str(annotations)


@contextlib.contextmanager
def _folder(out: Path) -> Iterator[Path]:
    """A hidden sibling of ``out`` to write into, renamed to ``out`` when the block succeeds and removed when it
    fails. ``out`` may exist only as an empty folder: a finished slide is never overwritten."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InferError(f"{out}: already exists and is not empty; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}{PARTIAL}"
    # Left by a killed run of this slide; one of a process still scoring it (another shard's retry) is its own.
    remove_dead_leftovers(out.parent, re.compile(re.escape(prefix) + r"(?P<pid>\d+)"))
    building = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)  # this process's own, from a killed one that had its number
    building.mkdir()
    try:
        yield building
        if out.exists():
            out.rmdir()
        os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
