"""``histodetect extract``: labelled 96x96 patches cut from annotated slides, by the rule PCam was cut from Camelyon16.

Windows are the ones ``slide`` scores (:mod:`histodetect.infer.slide`): the slide is brought to the model's microns
per pixel by the same :func:`choose_scale`, cut into the same 32 px cells, kept where the same tissue mask
(:func:`tissue_fraction`, :func:`window_share`, ``min_tissue``) finds tissue, and each window is the 96x96 around a
cell, read block by block by the same :class:`CellBlocks`. A patch extracted here is therefore exactly a question
``slide`` asks, and one a model trained on it will be asked. Only windows wholly inside the slide are taken (a
store's coordinates are whole level-0 pixels >= 0).

Labels follow PCam: a window is positive when its centre 32x32 (the cell) holds tumour, i.e. the cell's square
meets the annotated tumour area (the ``_2`` exclusions of ASAP XML already cut out) with an area > 0, and negative
otherwise: tumour in the margin alone does not make it positive. A normal slide (no annotation file, or ``Normal``
in the ``--reference`` CSV) gives negatives only; one the reference calls ``Tumor`` must have its outlines.

Per slide, ``round(per_slide * positive_share)`` positives and the rest negatives are drawn without replacement
(as many as there are, when fewer), by a numpy Generator seeded with the seed and the slide's name, from candidates
in row-major order: the same seed gives the same store, byte for byte.

Hard negatives (``hard_negatives=RUN``): the slide's tissue cells whose centre lies outside the tumour by more than
``HARD_MARGIN`` model pixels (so neither the cell nor the window touches an outline) and that were not sampled are
scored with RUN by :func:`score_cells` (``slide``'s path), and the ``hard_count`` highest are added as negatives with
``source`` ``hard_negative``: a second training round sees the first one's false alarms.

Resumable: each finished slide's windows go to ``.<STORE>.extract-work/<slide>.npz`` beside the store (atomic),
with the settings in ``settings.json``; a re-run with the same settings reuses them (a slide whose file, outlines or
reference type changed is extracted again), one with other settings is refused, naming them. The store is written
at the end through :class:`StoreWriter` (hidden folder, renamed into place) and the work folder removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from histodetect.data.annotations import inside, read_polygons
from histodetect.data.ids import group_problem
from histodetect.data.reference import read_reference
from histodetect.data.store import PATCH_SHAPE, Place, Store, StoreWriter, why_not_replaceable
from histodetect.data.tissue import tissue_fraction, window_share
from histodetect.data.wsi import SlideReader, open_slide
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor, progress_bar
from histodetect.infer.slide import CELL, MARGIN, CellBlocks, Scale, check_options, choose_scale, score_cells
from histodetect.infer.slide_batch import companion, find_slides
from histodetect.io import atomic_path, atomic_write_json, check_output_dir
from histodetect.runs.config import TrainConfig

EXTRACT_VERSION = 1  # of the work files and the manifest's ``extract`` record
SAMPLED, HARD_NEGATIVE = "sampled", "hard_negative"  # the store's ``source`` column
SPLIT = "train"
HARD_MARGIN = 96  # model pixels: a hard negative's centre lies farther than this from any tumour outline
SETTINGS = "settings.json"
AREAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


@dataclass(frozen=True)
class Settings:
    """Everything that decides which windows a slide gives; a resumed extract must be run with the same."""

    mpp: float | None = None  # the model's microns per pixel; None: the hard-negative run's, else PCam's 0.972
    per_slide: int = 500
    positive_share: float = 0.5
    seed: int = 0
    min_tissue: float = 0.1
    slide_mpp: float | None = None
    hard_negatives: str | None = None  # the run, resolved
    hard_count: int = 0
    hard_margin: int = HARD_MARGIN
    version: int = EXTRACT_VERSION

    @property
    def model_mpp(self) -> float:
        return self.mpp if self.mpp is not None else TrainConfig.mpp

    def check(self) -> None:
        """One line for the first number that cannot be used."""
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise InferError(f"--mpp {self.mpp}: must be a positive number of microns a pixel")
        if self.per_slide < 1:
            raise InferError(f"--per-slide {self.per_slide}: must be at least 1")
        if not 0.0 <= self.positive_share <= 1.0:
            raise InferError(f"--positive-share {self.positive_share}: must be within [0, 1]")
        if self.seed < 0:
            raise InferError(f"--seed {self.seed}: must be 0 or more")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InferError(f"--min-tissue {self.min_tissue}: must be within [0, 1]")
        if self.slide_mpp is not None and not (math.isfinite(self.slide_mpp) and self.slide_mpp > 0):
            raise InferError(f"--slide-mpp {self.slide_mpp}: must be a positive number of microns a pixel")
        if self.hard_count < 0:
            raise InferError(f"--hard-count {self.hard_count}: must be 0 or more")


@dataclass
class SlideJob:
    """A slide to extract, checked: its file, outlines (None: normal) and what decided that it is tumour."""

    path: Path
    annotations: Path | None
    tumour_area: shapely.Geometry | None
    reference: bool | None  # what the reference CSV says (True: Tumor), None when it does not list the slide

    @property
    def name(self) -> str:
        return self.path.stem

    def inputs(self) -> dict[str, Any]:
        """What a finished slide's windows depend on besides the settings: reused only when these are the same."""
        digest = hashlib.sha256(self.annotations.read_bytes()).hexdigest() if self.annotations else None
        return {
            "slide": str(self.path.resolve()),
            "slide_bytes": self.path.stat().st_size,
            "annotations_sha256": digest if self.tumour_area is not None else None,
            "tumour": self.tumour_area is not None,
        }


@dataclass
class SlideSamples:
    """One slide's windows, in store order (sampled ones, then hard negatives; each by cell)."""

    pixels: np.ndarray  # uint8 (n, 96, 96, 3)
    coords: np.ndarray  # int64 (n, 2): level-0 x, y of each window's top-left
    labels: np.ndarray  # int8 (n,)
    hard: np.ndarray  # bool (n,): a hard negative
    meta: dict[str, Any] = field(default_factory=dict)


def extract(
    slides: Sequence[Path],
    out: str | os.PathLike[str],
    settings: Settings,
    *,
    annotations: Path | None = None,
    reference: Path | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
    report: Callable[[str, dict[str, Any], bool], None] | None = None,
) -> Store:
    """Extract labelled windows from ``slides`` into the store ``out``; returns it. ``report(name, meta, reused)``
    is called after each slide. Everything is checked (settings, output, reference, outlines, every slide's scale)
    before the first window is read."""
    out = Path(out)
    settings.check()
    check_options(workers=workers)  # slide's bound on reader processes
    if settings.hard_negatives is None:
        settings = replace(settings, hard_count=0)  # a count without a run means nothing: not a setting to match
    _check_out(out, overwrite)
    predictor = None
    if settings.hard_negatives is not None:
        predictor = Predictor([settings.hard_negatives], progress=progress)
        if settings.mpp is not None and abs(predictor.mpp - settings.mpp) > 1e-9:
            raise InferError(
                f"--mpp {settings.mpp}: the run {settings.hard_negatives} was trained at {predictor.mpp} microns a "
                "pixel; leave --mpp out to extract at the run's scale"
            )
    if settings.mpp is None:
        settings = replace(settings, mpp=predictor.mpp if predictor is not None else TrainConfig.mpp)
    if settings.hard_count == 0:
        predictor = None  # its scale was all it was needed for
    jobs = _jobs(find_slides(slides), annotations, read_reference(reference) if reference is not None else None)
    for job in jobs:  # a slide without a scale is refused before any work
        with open_slide(job.path) as reader:
            choose_scale(reader, settings.model_mpp, settings.slide_mpp)
    work = out.parent / f".{out.name}.extract-work"
    _start_work(work, settings)
    finished: list[Path] = []
    for job in jobs:
        inputs, saved = job.inputs(), work / f"{job.name}.npz"
        meta = _saved_meta(saved, inputs)
        reused = meta is not None
        if meta is None:
            samples = extract_slide(job, settings, predictor, workers=workers, progress=progress)
            meta = samples.meta
            meta["inputs"] = inputs
            _save_work(saved, samples)
            del samples  # a slide's windows are on disk now; memory holds one slide's at a time
        finished.append(saved)
        if report is not None:
            report(job.name, meta, reused)
    store = _assemble(out, finished, settings, overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return store


def extract_slide(
    job: SlideJob,
    settings: Settings,
    predictor: Predictor | None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> SlideSamples:
    """The sampled windows (and hard negatives, with ``predictor``) of one slide."""
    started = time.perf_counter()
    with open_slide(job.path) as reader:
        scale = choose_scale(reader, settings.model_mpp, settings.slide_mpp)
        width, height = reader.dimensions
        grid = (math.ceil(height / scale.cell), math.ceil(width / scale.cell))
        fraction, _ = tissue_fraction(reader, scale.cell, grid)
        selected = window_share(fraction) >= settings.min_tissue if settings.min_tissue > 0 else np.ones(grid, bool)
        selected &= _whole_windows(grid, scale, width, height)
        cells = np.argwhere(selected)  # row-major: the candidates' fixed order
        labels = np.zeros(len(cells), dtype=np.int8)
        if job.tumour_area is not None:
            labels[_holds_tumour(job.tumour_area, cells, scale.cell)] = 1
        rng = np.random.default_rng([settings.seed, _name_seed(job.name)])
        n_positive = round(settings.per_slide * settings.positive_share) if job.tumour_area is not None else 0
        positives = _draw(rng, np.flatnonzero(labels == 1), n_positive)
        negatives = _draw(rng, np.flatnonzero(labels == 0), settings.per_slide - n_positive)
        sampled = np.sort(np.concatenate([positives, negatives]))
        hard, hard_probability, scored = np.zeros(0, dtype=np.int64), None, 0
        if predictor is not None:
            eligible = labels == 0
            eligible[sampled] = False
            if job.tumour_area is not None:
                centres = (cells[:, ::-1] + 0.5) * scale.cell
                near = job.tumour_area.buffer(settings.hard_margin * scale.level0_per_pixel)
                eligible &= ~inside(near, centres[:, 0], centres[:, 1])
            candidates = np.flatnonzero(eligible)
            scored = len(candidates)
            scores = score_cells(predictor, reader, scale, cells[candidates], workers=workers, progress=progress)
            top = np.argsort(-scores, kind="stable")[: settings.hard_count]
            hard = np.sort(candidates[top])
            if len(top):
                hard_probability = [round(float(scores[top].min()), 6), round(float(scores[top].max()), 6)]
        chosen = np.concatenate([sampled, hard])
        pixels = _read_windows(reader, scale, cells[chosen], progress=progress)
        top_left = (cells[chosen][:, ::-1] * CELL - MARGIN) * scale.level0_per_pixel
        meta = {
            "name": job.name,
            "path": str(job.path),
            "tumour": job.tumour_area is not None,
            "reference": None if job.reference is None else ("Tumor" if job.reference else "Normal"),
            "annotations": str(job.annotations) if job.tumour_area is not None else None,
            "width": width,
            "height": height,
            "mpp": scale.slide_mpp,
            "mpp_source": scale.mpp_source,
            "level": scale.level,
            "level_downsample": scale.downsample,
            "scale_factor": scale.factor,
            "level0_per_pixel": scale.level0_per_pixel,
            "grid": list(grid),
            "tissue_cells": len(cells),
            "candidates": {"positive": int(labels.sum()), "negative": int((labels == 0).sum())},
            "sampled": {"positive": len(positives), "negative": len(negatives)},
            "hard_scored": scored,
            "hard_negatives": len(hard),
            "hard_negative_probability": hard_probability,
            "seconds": round(time.perf_counter() - started, 2),
        }
    return SlideSamples(
        pixels=pixels,
        coords=np.rint(top_left).astype(np.int64),
        labels=labels[chosen],
        hard=np.arange(len(chosen)) >= len(sampled),
        meta=meta,
    )


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be new, an empty folder, or (with ``--overwrite``) a store: never anything else."""
    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        if why := why_not_replaceable(out):
            raise InferError(f"--out {out}: {why}")
        if not overwrite:
            raise InferError(f"--out {out}: already holds a store; pass --overwrite to replace it")


def _jobs(paths: list[Path], annotations: Path | None, reference: dict[str, bool] | None) -> list[SlideJob]:
    """Each slide with its outlines, read now; a slide the reference calls tumour must have them."""
    jobs = []
    for path in paths:
        if why := group_problem(path.stem):
            raise InferError(f"{path}: its name is the store's group for its patches, and cannot be one ({why})")
        ann = companion(annotations, path, len(paths) > 1, "--annotations")
        listed = reference.get(path.stem) if reference is not None else None
        if listed and ann is None:
            raise InferError(
                f"{path.name}: the reference calls it Tumor but --annotations has no outlines for it "
                f"({path.stem}.xml or .geojson)"
            )
        tumour = ann is not None and listed is not False
        jobs.append(SlideJob(path, ann, read_polygons(ann) if tumour and ann is not None else None, listed))
    return jobs


def _whole_windows(grid: tuple[int, int], scale: Scale, width: int, height: int) -> np.ndarray:
    """bool ``grid``: the cells whose whole 96 px window lies on the slide (its level-0 top-left at 0 or beyond)."""
    rows, cols = np.arange(grid[0]), np.arange(grid[1])
    reach = (CELL + MARGIN) / CELL  # a window ends this many cells past its cell's start

    def fits(index: np.ndarray, size: int) -> np.ndarray:
        return (index * CELL >= MARGIN) & ((index + reach) * scale.cell <= size + 1e-6)

    return fits(rows, height)[:, None] & fits(cols, width)[None, :]


def _holds_tumour(area: shapely.Geometry, cells: np.ndarray, cell: float) -> np.ndarray:
    """bool per cell: its square (level-0 pixels) shares an area > 0 with ``area``, i.e. their interiors meet
    (touching along an edge is not enough). The squares go into an R-tree that each polygon of ``area`` queries,
    so a cell is tested only against the polygons near it (and squares are made only within their bounds):
    testing every square against the whole area took 9 minutes for 18,600 cells and 805 outlines; this, 0.1 s."""
    hit = np.zeros(len(cells), dtype=bool)
    parts = shapely.get_parts(area)
    parts = parts[np.isin(shapely.get_type_id(parts), AREAL)]  # make_valid may leave lines: they hold no area
    if not len(parts):
        return hit
    x0, y0 = cells[:, 1] * cell, cells[:, 0] * cell
    left, top, right, bottom = shapely.total_bounds(parts)
    near = np.flatnonzero((x0 <= right) & (x0 + cell >= left) & (y0 <= bottom) & (y0 + cell >= top))
    boxes = shapely.box(x0[near], y0[near], x0[near] + cell, y0[near] + cell)  # only those near the outlines
    polygon, box = shapely.STRtree(boxes).query(parts, predicate="intersects")
    hit[near[box[shapely.relate_pattern(parts[polygon], boxes[box], "T********")]]] = True
    return hit


def _name_seed(name: str) -> int:
    """A slide's share of the seed: from its name, so adding a slide changes no other slide's draw."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``pool`` (all of it when it is smaller) without replacement."""
    return rng.choice(pool, size=min(max(n, 0), len(pool)), replace=False) if len(pool) else pool


def _read_windows(reader: SlideReader, scale: Scale, cells: np.ndarray, *, progress: bool) -> np.ndarray:
    """uint8 windows of ``cells``, in their order, read a block of cells at a time (never a level whole)."""
    pixels = np.empty((len(cells), *PATCH_SHAPE), dtype=np.uint8)
    if not len(cells):
        return pixels
    blocks = CellBlocks(reader, scale, cells)
    with progress_bar(progress, len(cells), reader.name, unit="windows") as advance:
        for k in range(len(blocks)):
            positions, windows, error = blocks[k]
            if error is not None or windows is None:
                raise InferError(error or f"{reader.name}: cannot read its windows")
            pixels[positions] = windows
            advance(len(positions))
    return pixels


# ------------------------------------------------------------------------------------------------ the work folder
def _start_work(work: Path, settings: Settings) -> None:
    """Make the work folder, or check that the one there was made with the same settings."""
    wanted = asdict(settings)
    if (work / SETTINGS).is_file():
        try:
            held = json.loads((work / SETTINGS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = {}
        changed = [key for key in wanted if held.get(key) != wanted[key]]
        if changed:
            said = ", ".join(f"{key} {held.get(key)} -> {wanted[key]}" for key in changed)
            raise InferError(
                f"{work}: an unfinished extract into this store was made with other settings ({said}); re-run it as "
                "it was, or delete that folder to start again"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / SETTINGS, wanted)


def _save_work(path: Path, samples: SlideSamples) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            pixels=samples.pixels,
            coords=samples.coords,
            labels=samples.labels,
            hard=samples.hard,
            meta=np.array(json.dumps(samples.meta)),
        )


def _saved_meta(path: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """A finished slide's record, when its windows were made from these inputs; None otherwise (made again)."""
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
        if isinstance(meta, dict) and meta.get("inputs") == inputs:
            return meta
    return None


def _load_work(path: Path) -> SlideSamples:
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        return SlideSamples(saved["pixels"], saved["coords"], saved["labels"], saved["hard"], meta)


# ------------------------------------------------------------------------------------------------ the store
def _assemble(out: Path, finished: list[Path], settings: Settings, *, overwrite: bool) -> Store:
    """Every slide's windows (read back one slide at a time) into the store, duplicates of pixels kept once (the
    first, in slide order) and listed in the store's ``report.json``."""
    total = 0
    for saved in finished:
        with np.load(saved, allow_pickle=False) as held:
            total += len(held["labels"])
    kept: dict[str, tuple[str, int, int]] = {}
    duplicates: list[dict[str, Any]] = []
    slides: list[dict[str, Any]] = []
    with StoreWriter(out, capacity=total, overwrite=overwrite or out.exists()) as writer:
        for saved in finished:
            samples = _load_work(saved)
            name = samples.meta["name"]
            before = len(duplicates)
            for pixels, (x, y), label, hard in _rows(samples):
                sha1 = hashlib.sha1(pixels).hexdigest()
                if sha1 in kept:
                    slide, kx, ky = kept[sha1]
                    duplicates.append({"slide": name, "coord_x": x, "coord_y": y, "label": label, "id": sha1,
                                       "kept": {"slide": slide, "coord_x": kx, "coord_y": ky}})  # fmt: skip
                    continue
                kept[sha1] = (name, x, y)
                source = HARD_NEGATIVE if hard else SAMPLED
                writer.add(pixels, sha1, label, SPLIT, source, sha1, Place(name, x, y))
            meta = {k: v for k, v in samples.meta.items() if k != "inputs"}
            slides.append({**meta, "duplicates": len(duplicates) - before})
        record = {
            "settings": asdict(settings),
            "coordinates": "level-0 pixels of each window's top-left",
            "slides": slides,
            "duplicates": len(duplicates),
        }
        return writer.commit(
            source="histodetect extract",
            extra={
                "layout": "slides (histodetect extract)",
                "problems": {  # in ingest's form, for ``histodetect info``
                    "kinds": {"duplicate_pixels": {"warning": len(duplicates)}} if duplicates else {},
                    "skipped": len(duplicates),
                },
                "extract": record,
            },
            report={"duplicate_pixels": duplicates},
        )


def _rows(samples: SlideSamples) -> Iterator[tuple[np.ndarray, tuple[int, int], int, bool]]:
    for k in range(len(samples.labels)):
        x, y = samples.coords[k]
        yield samples.pixels[k], (int(x), int(y)), int(samples.labels[k]), bool(samples.hard[k])


def describe(meta: dict[str, Any]) -> str:
    """One line about a slide's windows, for the terminal."""
    kind = "tumour" if meta["tumour"] else "normal"
    hard = f" + {meta['hard_negatives']} hard negatives" if meta["hard_negatives"] else ""
    return (
        f"{meta['name']} ({kind}): {meta['sampled']['positive']} positive + {meta['sampled']['negative']} negative"
        f"{hard} of {meta['tissue_cells']:,} tissue windows"
    )
