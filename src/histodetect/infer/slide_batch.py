"""Many slides in one command: ``histodetect slide RUN... SLIDE_OR_FOLDER... --out DIR``.

Each slide is scored into ``DIR/<slide name>/`` (:func:`histodetect.infer.slide.score_slide`, atomic), so a killed
command resumes by skipping the folders that exist. ``shard=(i, n)`` takes every n-th slide from the i-th (0-based)
of the sorted list, so the machines or array-job tasks of a cluster split a cohort without talking to each other.
After each slide ``DIR/slides.csv`` is rewritten from every finished folder's ``summary.json`` (whichever shard wrote
it) plus the slides that failed in this command, with their error: one bad file does not stop a cohort, and it is
never dropped silently.

With ``--annotations`` (or a ``--reference`` CSV), the cohort is judged as Camelyon16 judged one: ``DIR/cohort.json``
(slide ROC AUC, lesion FROC: :mod:`histodetect.infer.cohort`) and ``DIR/report.html`` are rewritten after each
slide from every finished folder too. A slide without an outline file in an ``--annotations`` folder is a normal
slide: its detections are judged (all false positives).

``--mask`` and ``--annotations`` name one file (for one slide) or a folder holding ``<slide name>.xml``,
``.geojson``, ``.json`` or ``.png`` per slide (Camelyon16's annotations come as ``tumor_001.xml`` ...); a slide
without one is scored without.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import shapely

from histodetect.data.ids import shown, text_problem
from histodetect.data.reference import read_reference
from histodetect.errors import InferError, UserError
from histodetect.infer.engine import ONNX_SUFFIX, Predictor
from histodetect.infer.slide import score_slide
from histodetect.infer.slide_outputs import read_summaries
from histodetect.io import atomic_path
from histodetect.runs.layout import CONFIG

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".btf", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".png", ".jpg"}
    | {".jpeg"}
)
COMPANION_SUFFIXES = (".xml", ".geojson", ".json", ".png")
TABLE = "slides.csv"
COLUMNS = (
    "name", "slide", "error", "width", "height", "mpp", "mpp_source", "level", "scale_factor", "cells_scored",
    "tissue_mm2", "area_above_threshold_mm2", "slide_score", "slide_positive", "max_probability", "cell_roc_auc",
    "slide_tumour", "slide_decision_correct", "seconds", "cells_per_second",
)  # fmt: skip


def split_runs_and_slides(inputs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``RUN... SLIDE_OR_FOLDER...``: the leading run folders (with a config.yaml) and .onnx files, then the rest."""
    k = 0
    while k < len(inputs) and (inputs[k].suffix.lower() == ONNX_SUFFIX or (inputs[k] / CONFIG).is_file()):
        k += 1
    if k == 0:
        raise InferError(f"{inputs[0] if inputs else 'slide'}: not a run folder; give RUN... then SLIDE_OR_FOLDER...")
    if k == len(inputs):
        raise InferError("slide needs at least one slide file or folder of slides after the runs")
    return list(inputs[:k]), list(inputs[k:])


def find_slides(inputs: Sequence[Path]) -> list[Path]:
    """Slide files: those given, and those with a slide suffix directly inside given folders; sorted by name."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            # Not only regular files: a FIFO or a broken link named like a slide gets its error row, never skipped.
            found += [
                p
                for p in path.iterdir()
                if not p.is_dir() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")
            ]
        elif path.is_file() or path.is_symlink() or path.exists():
            found.append(path)  # open_slide names what is wrong with a FIFO or a link that leads nowhere
        else:
            raise InferError(f"{path}: no such slide file or folder")
    by_name: dict[str, Path] = {}
    for path in found:
        if problem := text_problem(path.stem):  # its folder, and every table and figure, carry the slide's name
            raise InferError(f"{shown(str(path))}: {problem} in the slide's name; rename the file")
        if path.stem == TABLE:
            raise InferError(f"{path}: a slide named {TABLE} would take the place of the table; rename it")
        if path.stem in by_name and by_name[path.stem] != path:
            raise InferError(f"{path} and {by_name[path.stem]}: two slides named {path.stem!r} would share a folder")
        by_name[path.stem] = path
    return [by_name[name] for name in sorted(by_name)]


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N) -> (I, N)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise InferError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4 for the first of four")
    return i, n


def companion(source: Path | None, slide: Path, many: bool, option: str) -> Path | None:
    """The file of ``source`` that belongs to ``slide``: ``source`` itself, or ``source/<slide name>.<suffix>``."""
    if source is None:
        return None
    if source.is_dir():
        return next((p for s in COMPANION_SUFFIXES if (p := source / f"{slide.stem}{s}").is_file()), None)
    if many:
        raise InferError(f"{option} {source}: with several slides, give a folder of files named after the slides")
    if not source.is_file():
        raise InferError(f"{option} {source}: no such file")
    return source


def score_slides(
    predictor: Predictor,
    slides: Sequence[Path],
    out: str | os.PathLike[str],
    *,
    shard: tuple[int, int] = (0, 1),
    mask: Path | None = None,
    annotations: Path | None = None,
    reference: Path | None = None,
    report: Callable[[str, dict[str, Any]], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Score this shard's slides into ``out/<name>/``, skipping finished ones; returns a row per slide of the shard
    (its summary, ``{"skipped": True}`` added when done earlier, or its ``error``). ``options`` go to
    :func:`score_slide`; ``report(name, row)`` is called after each slide."""
    out = Path(out)
    paths = find_slides(slides)
    many = len(paths) > 1
    truth = read_reference(reference) if reference is not None else None
    judged = annotations is not None or truth is not None
    rows: list[dict[str, Any]] = []
    for path in paths[shard[0] :: shard[1]]:
        folder = out / path.stem
        if (folder / "summary.json").is_file():
            row: dict[str, Any] = {"name": path.stem, "slide": str(path), "skipped": True}
        else:
            try:
                summary = score_slide(
                    predictor,
                    path,
                    folder,
                    mask=companion(mask, path, many, "--mask"),
                    annotations=_outlines(annotations, path, many),
                    **options,
                )
                row = {"name": path.stem, **summary}
            except UserError as exc:
                row = {"name": path.stem, "slide": str(path), "error": str(exc)}
        rows.append(row)
        write_table(out, [r for r in rows if "error" in r])
        if judged:
            write_cohort_outputs(out, truth, threshold=options.get("threshold", 0.5))
        if report is not None:
            report(path.stem, row)
    return rows


def _outlines(annotations: Path | None, slide: Path, many: bool) -> Path | shapely.Geometry | None:
    """The slide's outline file; an empty geometry (a normal slide) when a folder of them has none for it."""
    found = companion(annotations, slide, many, "--annotations")
    return shapely.Polygon() if found is None and annotations is not None and annotations.is_dir() else found


def write_cohort_outputs(out: Path, truth: dict[str, bool] | None, *, threshold: float) -> None:
    """``out/cohort.json`` and ``out/report.html`` from every finished slide folder."""
    from histodetect.infer.cohort import write_cohort, write_report  # the report's figures: only for a cohort

    metrics, results = write_cohort(out, truth, threshold=threshold)
    write_report(out, metrics, results)


def write_table(out: Path, failed: Sequence[dict[str, Any]]) -> Path:
    """``out/slides.csv``: a row per finished slide folder under ``out`` and per slide in ``failed``."""
    finished = [{"name": name, **summary} for name, summary in read_summaries(out)]
    frame = pd.DataFrame([*finished, *failed]).reindex(columns=list(COLUMNS))
    with atomic_path(out / TABLE) as tmp:
        frame.sort_values("name").to_csv(tmp, index=False)
    return out / TABLE
