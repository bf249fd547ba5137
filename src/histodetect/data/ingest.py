"""``histodetect ingest``: check raw patches and pack them into a store; ``histodetect info`` describes one.

Ingest is the one place where raw files are trusted or not, so it checks everything and drops nothing
silently: :func:`histodetect.data.sources.discover` lists what SOURCE promises (and what is wrong with its
names and CSVs), then every image is decoded, in a process pool for large folders, and checked for size, mode,
truncation, a name that is not the SHA-1 of its pixels, and pixels already stored under another id.

Any error refuses the ingest (exit code 2, a JSON report beside the store, no store folder), unless
``skip_bad`` is set: then every item with an error is left out and listed in the report, which is saved inside
the store too. Warnings never stop anything. The store is written through :class:`StoreWriter`, so an
interrupted ingest leaves nothing that looks like a store.

Problem kinds in the report (``{kind, severity, split, id, file, detail}``) and what each means, how grave it is
and whether it is spoken: the one table in :mod:`histodetect.data.problems`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import multiprocessing
import os
import re
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from histodetect.data.decode import decode_patch
from histodetect.data.groups import Placer, pcam_places_by_sha1, read_groups_file, read_pcam_meta
from histodetect.data.ids import looks_like_sha1, shown
from histodetect.data.problems import ERROR, FATAL_KINDS, SPOKEN_KINDS, WARNING
from histodetect.data.sources import (
    H5Part,
    IngestError,
    Item,
    Plan,
    Problem,
    discover,
    relative,
    split_rank,
)
from histodetect.data.store import PATCH_BYTES, PATCH_SHAPE, REPORT, Place, Store, StoreWriter, why_not_replaceable
from histodetect.errors import UserError
from histodetect.io import atomic_write_json, check_output_dir, check_output_file, remove_dead_leftovers

__all__ = ["IngestError", "IngestResult", "describe_store", "ingest"]

POOL_MIN_FILES = 500  # below this, starting worker processes costs more than it saves
CHUNK = 64  # files per worker task: amortises inter-process messages without starving the other workers
WINDOW = 4096  # patches decoded ahead of the store writer (a ~113 MB scratch file, reused)
WINDOW_DIR = re.compile(r"histodetect-ingest-(?P<pid>\d+)-[a-z0-9_]+")  # the window's temporary folder
H5_CHUNK = 2048  # PCam patches read at once (~57 MB): the 220k-patch files are never loaded whole
SHOWN_OFFENDERS = 10  # errors named on the terminal; the report holds all of them
ChunkResult = list[tuple[str | None, list[tuple[str, str]]]]  # per file of a chunk: SHA-1 and problems
Record = tuple[Item, np.ndarray | None, str | None, list[Problem]]


@dataclass
class IngestResult:
    """What :func:`ingest` did: ``exit_code`` 0 (store written) or 2 (refused), and the full report."""

    exit_code: int
    store: Store | None
    report: dict[str, Any]
    report_path: Path | None


def ingest(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    class_dirs: str | None = None,
    pcam_meta: str | os.PathLike[str] | None = None,
    groups: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    report_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> IngestResult:
    """Check every patch of ``source`` and write the good ones to the store ``out``.

    ``source`` is a competition folder (``train/`` + ``train_labels.csv``, ``test/`` +
    ``sample_submission.csv``), a PCam ``*_x.h5`` file or folder, a folder per class (``0/``, ``1/`` or
    ``class_dirs="NEG,POS"``), or a bare folder of images: split ``train`` when ``labels`` (a CSV of id,label)
    is given, else ``test``, since patches without labels are the ones to predict on (see
    :func:`histodetect.data.sources.discover`).

    Each labeled patch's slide (its group) and position are recorded from a PCam source's meta CSVs, from the PCam
    files in ``pcam_meta`` (matched by the SHA-1 of the pixels, the competition's ids) or from ``groups`` (a CSV
    of id,group); see :mod:`histodetect.data.groups`. No label is ever taken from them.

    Never raises for bad input: problems are printed on stderr and returned with exit code 2. On refusal the
    report is written to ``report_path`` (default ``<out>.report.json``) and no store is left; with
    ``skip_bad`` the store holds only items without errors and its ``report.json`` lists the rest.
    """
    console = Console(stderr=True)
    source, out = Path(source), Path(out)
    report_file = Path(report_path) if report_path else out.with_name(f"{out.name}.report.json")
    try:
        _check_options(source, out, report_file, overwrite=overwrite, workers=workers)
        plan = discover(source, labels=Path(labels) if labels else None, class_dirs=class_dirs)
        placer, places = _placer(plan, Path(pcam_meta) if pcam_meta else None, Path(groups) if groups else None)
    except IngestError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return IngestResult(2, None, {"status": "refused", "error": str(exc)}, None)

    problems = list(plan.problems)
    if plan.fatal:
        return _refuse(console, plan, problems, report_file, skip_bad, "its CSV cannot be read")
    todo = _decodable(plan.items, problems)
    total = len(todo) + sum(part.count for part in plan.h5)
    with (
        _sigterm_interrupts(),
        _decoder(workers or os.cpu_count() or 1, len(todo)) as decode,
        StoreWriter(out, capacity=total, patch_shape=PATCH_SHAPE, overwrite=overwrite) as writer,
        _progress(console, progress, total) as advance,
    ):
        read = itertools.chain(decode(todo), *(_h5_records(part, places.get(part.split)) for part in plan.h5))
        records = ((placer.place(item, sha1), pixels, sha1, found) for item, pixels, sha1, found in read)
        _fill(writer, records, problems, advance)
        problems.extend(placer.problems())
        why = _why_refuse(problems, skip_bad=skip_bad, stored=len(writer))
        if why:
            writer.abort()
            return _refuse(console, plan, problems, report_file, skip_bad, f"{why} in {source}")
        report = _report(plan, problems, status="written", skip_bad=skip_bad)
        store = writer.commit(
            source=str(source.resolve()),
            extra={"layout": plan.layout, "problems": report["summary"]},
            report=report,
        )
    if report_path:
        atomic_write_json(report_file, report)
    _print_written(console, store, report)
    return IngestResult(0, store, report, report_file if report_path else store.path / REPORT)


def _placer(plan: Plan, pcam_meta: Path | None, groups: Path | None) -> tuple[Placer, dict[str, list[Place | None]]]:
    """Read the metadata that gives patches their slide: a PCam source's meta CSVs (returned by split),
    ``--pcam-meta``'s PCam files or ``--groups``' CSV (held by the :class:`Placer`). Its problems go to the plan."""
    if pcam_meta is not None and groups is not None:
        raise IngestError("--pcam-meta and --groups both give each patch its group; give one of them")
    if pcam_meta is not None and plan.layout == "pcam":
        raise IngestError(
            f"--pcam-meta {pcam_meta}: a PCam source's slides are read from the _meta.csv files beside its HDF5 files"
        )
    places = {
        part.split: meta
        for part in plan.h5
        if part.meta is not None
        and (meta := read_pcam_meta(part.meta, plan.root, part.split, part.count, plan.problems)) is not None
    }
    placer = Placer(expected=bool(places) or pcam_meta is not None or groups is not None)
    if pcam_meta is not None:
        placer.by_sha1 = pcam_places_by_sha1(pcam_meta, plan.root, plan.problems, H5_CHUNK)
    if groups is not None:
        split_of = {item.id: item.split for item in plan.items}
        placer.by_id = read_groups_file(groups, plan.root, plan.problems, split_of)
        placer.groups_file = relative(groups, plan.root)
    return placer, places


def _check_options(source: Path, out: Path, report_file: Path, *, overwrite: bool, workers: int | None) -> None:
    """Refuse before any work when the options cannot succeed or would destroy what ingest did not make."""
    try:
        check_output_dir(out)
        check_output_file(report_file, "--report")
    except UserError as exc:
        raise IngestError(str(exc)) from None
    if out.exists() and not overwrite:
        raise IngestError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and (why := why_not_replaceable(out, source)):
        raise IngestError(f"--out {out}: {why}")
    if report_file.exists() and report_file.resolve().is_relative_to(source.resolve()):
        raise IngestError(f"--report {report_file}: a file of the source being ingested; choose another path")
    if workers is not None and not 1 <= workers <= 64:  # each is a process: more only exhausts memory
        raise IngestError(f"--workers {workers}: must be 1..64 decoding processes")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM (what ``timeout``, ``kill`` and container stops send) into KeyboardInterrupt, as Ctrl-C is,
    so that the partial store and the scratch window are removed on the way out. Only the main thread can set
    a handler; elsewhere (a thread of a server) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _why_refuse(problems: list[Problem], *, skip_bad: bool, stored: int) -> str | None:
    """Why the store must not be committed: errors without --skip-bad, or nothing good to store."""
    errors = sum(p.severity == ERROR for p in problems)
    if errors and not skip_bad:
        return f"{errors} error(s)"
    return None if stored else "no good patch"


@contextlib.contextmanager
def _decoder(workers: int, n_files: int) -> Iterator[Callable[[list[Item]], Iterator[Record]]]:
    """Yield a function that decodes image files into records, in order, in a process pool for big folders.

    Workers write pixels into a memory-mapped scratch window rather than sending them back through a pipe,
    which on 2 cores made the pool slower than one process; the window is reused ``WINDOW`` patches at a time,
    so it stays small whatever the number of files. Leaving the block (by an exception or Ctrl-C too)
    terminates the workers and deletes the window.
    """
    scratch = Path(tempfile.gettempdir())
    remove_dead_leftovers(scratch, WINDOW_DIR)  # windows of killed ingests
    with tempfile.TemporaryDirectory(prefix=f"histodetect-ingest-{os.getpid()}-", dir=scratch) as tmp:
        window = Path(tmp) / "window.u8"
        with open(window, "wb") as fh:
            fh.truncate(max(1, min(n_files, WINDOW)) * PATCH_BYTES)
        if workers <= 1 or n_files < POOL_MIN_FILES:
            yield functools.partial(_decode_files, window=window, map_=map)
            return
        with multiprocessing.Pool(workers, initializer=_default_sigterm) as pool:
            yield functools.partial(_decode_files, window=window, map_=pool.imap)
            pool.close()  # done without an error: the workers exit by themselves rather than by SIGTERM
            pool.join()


def _default_sigterm() -> None:
    """Workers die on SIGTERM (how the pool stops them) rather than run the parent's handler, inherited by fork."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_files(
    items: list[Item], *, window: Path, map_: Callable[..., Iterable[ChunkResult | Exception]]
) -> Iterator[Record]:
    """Records for image files, a window at a time: a window is refilled only once all of it was consumed."""
    pixels = np.memmap(window, dtype=np.uint8, mode="r").reshape(-1, *PATCH_SHAPE)
    for start in range(0, len(items), len(pixels)):
        batch = items[start : start + len(pixels)]
        tasks = [
            (str(window), first, [str(item.path) for item in batch[first : first + CHUNK]])
            for first in range(0, len(batch), CHUNK)
        ]
        results = map_(decode_chunk, tasks)
        slot = 0
        for chunk in results:
            if isinstance(chunk, Exception):
                # Let the pool finish the window before raising: tearing down a multiprocessing.Pool whose task
                # thread is still feeding workers can deadlock in Pool.terminate (seen once in this suite).
                for _ in results:
                    pass
                raise chunk
            for sha1, found in chunk:
                yield _file_record(batch[slot], pixels[slot] if sha1 is not None else None, sha1, found)
                slot += 1
        if slot != len(batch):
            raise RuntimeError(f"decoding returned {slot} results for {len(batch)} files")


def decode_chunk(task: tuple[str, int, list[str]]) -> ChunkResult | Exception:
    """Worker task: decode files into consecutive rows of the scratch window from ``first`` on; return their
    SHA-1s (None when unusable) and problems. An unexpected failure is returned, not raised, so that the parent
    raises it only once the pool has finished the window (see ``_decode_files``)."""
    window_path, first, paths = task
    try:
        window = np.memmap(window_path, dtype=np.uint8, mode="r+").reshape(-1, *PATCH_SHAPE)
        results = []
        for slot, path in enumerate(paths, first):
            pixels, sha1, found = decode_patch(path)
            if pixels is not None:
                window[slot] = pixels
            results.append((sha1, found))
        return results
    except Exception as exc:
        return exc


def _file_record(item: Item, pixels: np.ndarray | None, sha1: str | None, found: list[tuple[str, str]]) -> Record:
    problems = [Problem.about(item, kind, ERROR, detail) for kind, detail in found]
    if sha1 is not None and looks_like_sha1(item.id) and sha1 != item.id:
        detail = f"the pixels hash to {sha1}: the file was renamed, re-encoded or altered"
        problems.append(Problem.about(item, "id_not_sha1", WARNING, detail))
    return item, pixels, sha1, problems


def _decodable(items: list[Item], problems: list[Problem]) -> list[Item]:
    """Items not already known to be bad: decoding those would only add noise to the report."""
    bad = {(p.split, p.id) for p in problems if p.severity == ERROR}
    return [item for item in items if (item.split, item.id) not in bad]


def _h5_records(part: H5Part, places: list[Place | None] | None) -> Iterator[Record]:
    """Stream a PCam split in chunks of ``H5_CHUNK`` patches; ids are the SHA-1 of the pixels, places (slide and
    position) those of its meta CSV, row for row, when it has one."""
    with h5py.File(part.x, "r") as fx, h5py.File(part.y, "r") if part.y else contextlib.nullcontext() as fy:
        for start in range(0, part.count, H5_CHUNK):
            block = fx["x"][start : start + H5_CHUNK]
            labels = fy["y"][start : start + len(block)].reshape(len(block)) if fy is not None else None
            for offset, pixels in enumerate(block):
                sha1 = hashlib.sha1(pixels).hexdigest()
                label = None if labels is None else int(labels[offset])
                place = None if places is None else places[start + offset]
                item = Item(sha1, part.split, label, f"{part.x.name}[{start + offset}]", place=place)
                yield item, pixels, sha1, _label_problems(item)


def _label_problems(item: Item) -> list[Problem]:
    if item.label is None or item.label in (0, 1):
        return []
    return [Problem.about(item, "bad_label", ERROR, f"label {item.label} is not 0 or 1")]


def _fill(writer: StoreWriter, records: Iterable[Record], problems: list[Problem], advance: Callable[[], None]) -> None:
    """Add every record without an error to the store; pixels already stored under another id are an error.

    Of several copies of the same pixels, the one whose id is the SHA-1 of those pixels is kept (the competition
    names every patch so, so any other name is a renamed or altered copy); when none is, the first: image files
    come sorted by split then id, PCam patches in file order. Each dropped copy's report entry names the one
    kept and why.
    """
    kept: dict[str, tuple[int, Item]] = {}
    for item, pixels, sha1, found in records:
        advance()
        problems.extend(found)
        if pixels is None or sha1 is None or any(p.severity == ERROR for p in found):
            continue
        if sha1 not in kept:
            kept[sha1] = (writer.add(pixels, item.id, item.label, item.split, item.source, sha1, item.place), item)
            continue
        row, held = kept[sha1]
        if item.id == sha1 != held.id:  # the patch under its own name arrived after a copy: it takes the row
            writer.replace_record(row, item.id, item.label, item.split, item.source, item.place)
            kept[sha1] = (row, item)
            held, item = item, held
        why = "its id is the SHA-1 of the pixels" if held.id == sha1 != item.id else "the first one read"
        detail = f"same pixels as {shown(held.id)} ({held.source}), which is kept: {why}"
        problems.append(Problem.about(item, "duplicate_pixels", ERROR, detail))


@contextlib.contextmanager
def _progress(console: Console, enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar on an interactive stderr; a no-op in tests, pipes and CI logs."""
    if not (enabled and console.is_terminal):
        yield lambda: None
        return
    columns = (TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("ingest", total=total)
        yield functools.partial(bar.advance, task)


# ------------------------------------------------------------------------------------------------ report
def _report(plan: Plan, problems: list[Problem], *, status: str, skip_bad: bool) -> dict[str, Any]:
    """The JSON report: every problem, every item with an error (left out of the store), and their counts."""
    bad_items = _bad_items(problems)
    kinds: dict[str, Counter[str]] = {}
    for p in problems:
        kinds.setdefault(p.kind, Counter())[p.severity] += 1
    summary = {
        "errors": sum(p.severity == ERROR for p in problems),
        "warnings": sum(p.severity == WARNING for p in problems),
        "kinds": {kind: dict(counts) for kind, counts in sorted(kinds.items())},
        "bad_items": len(bad_items),
        "skipped": len(bad_items) if status == "written" else 0,
    }
    return {
        "source": str(plan.root),
        "layout": plan.layout,
        "status": status,
        "skip_bad": skip_bad,
        "summary": summary,
        "bad_items": bad_items,
        "problems": [p.to_dict() for p in problems],
    }


def _bad_items(problems: list[Problem]) -> list[dict[str, Any]]:
    """One entry per item with an error (by id, or by file when a whole file is bad), with all its kinds."""
    items: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for p in problems:
        if p.severity != ERROR:
            continue
        key = (p.split, p.id if p.id is not None else p.file)
        entry = items.setdefault(key, {"split": p.split, "id": p.id, "file": p.file, "kinds": []})
        entry["file"] = entry["file"] or p.file
        if p.kind not in entry["kinds"]:
            entry["kinds"].append(p.kind)
    return list(items.values())


def _refuse(
    console: Console, plan: Plan, problems: list[Problem], report_file: Path, skip_bad: bool, why: str
) -> IngestResult:
    """Write the report, name the first offenders and the count per kind on stderr, and return exit code 2."""
    report = _report(plan, problems, status="refused", skip_bad=skip_bad)
    atomic_write_json(report_file, report)
    console.print(f"[bold red]error:[/] ingest refused: {escape(why)}; no store was written", soft_wrap=True)
    _print_counts(console, report["summary"]["kinds"])
    errors = [p for p in problems if p.severity == ERROR]
    if plan.fatal:  # the one thing to fix: not followed by what it caused
        errors = [p for p in errors if p.kind in FATAL_KINDS]
    console.print("first errors (kind, id, file: detail):")
    for p in errors[:SHOWN_OFFENDERS]:
        line = f"  {p.kind}  {_shown_or_dash(p.id)}  {_shown_or_dash(p.file)}: {_printable(p.detail)}"
        console.print(escape(line), soft_wrap=True, highlight=False)
    if len(errors) > SHOWN_OFFENDERS:
        console.print(f"  ... and {len(errors) - SHOWN_OFFENDERS} more", highlight=False)
    console.print(f"full report: {escape(str(report_file))}", soft_wrap=True, highlight=False)
    if not plan.fatal and not skip_bad:
        console.print(
            "Fix these, or pass --skip-bad to store the good patches (every bad one is listed in the report)."
        )
    return IngestResult(2, None, report, report_file)


def _shown_or_dash(text: str | None) -> str:
    return "-" if text is None else shown(text)


def _printable(text: str) -> str:
    """``text`` with every non-printable character escaped (a detail may quote a CSV cell or a file name)."""
    return "".join(char if char.isprintable() else shown(char)[1:-1] for char in text)


def _print_written(console: Console, store: Store, report: dict[str, Any]) -> None:
    splits = ", ".join(f"{name} {s['count']} ({s['labeled']} labeled)" for name, s in _ordered_splits(store.manifest))
    console.print(
        f"stored {len(store)} patches in {escape(str(store.path))}: {splits}", soft_wrap=True, highlight=False
    )
    if grouped := _describe_groups(store):
        console.print(f"slide groups: {grouped}", highlight=False)
    for p in report["problems"]:
        if p["kind"] in SPOKEN_KINDS:
            line = f"[bold yellow]warning:[/] {escape(_printable(p['detail']))}"
            console.print(line, soft_wrap=True, highlight=False)
    summary = report["summary"]
    if summary["warnings"] or summary["skipped"]:
        _print_counts(console, summary["kinds"])
        console.print(
            f"{summary['skipped']} bad item(s) left out; details in {escape(str(store.path / REPORT))}",
            soft_wrap=True,
            highlight=False,
        )


def _print_counts(console: Console, kinds: dict[str, dict[str, int]]) -> None:
    console.print("problems by kind:")
    for kind, counts in kinds.items():
        text = ", ".join(f"{n} {severity}(s)" for severity, n in sorted(counts.items()))
        console.print(f"  {kind}: {text}", highlight=False)


# ------------------------------------------------------------------------------------------------ info
def describe_store(store: Store) -> RenderableType:
    """A panel for ``histodetect info``: counts and balance per split, provenance, problems at ingest."""
    manifest = store.manifest
    splits = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("split", "patches", "labeled", "unlabeled", "positive"):
        splits.add_column(name, justify="left" if name == "split" else "right")
    for name, s in _ordered_splits(manifest):
        positive = f"{100 * s['positive'] / s['labeled']:.1f}%" if s["labeled"] else "-"
        splits.add_row(name, f"{s['count']:,}", f"{s['labeled']:,}", f"{s['unlabeled']:,}", positive)

    about = Table.grid(padding=(0, 2))
    about.add_column(style="bold")
    about.add_column(overflow="fold")  # a long path folds onto the next line, never loses its end
    about.add_row("store", escape(str(store.path)))
    about.add_row("source", escape(str(manifest.get("source", "?"))))
    about.add_row("layout", str(manifest.get("layout", "?")))
    about.add_row("created", str(manifest.get("created", "?")))
    about.add_row("patch shape", " x ".join(map(str, store.patch_shape)) + " uint8")
    about.add_row("slide groups", _describe_groups(store) or "none recorded")
    about.add_row("problems", _describe_problems(manifest.get("problems")))
    return Panel(
        Group(splits, "", about),
        title=f"store: {len(store):,} patches",  # the path is a row: a title too long for the panel is cut
        title_align="left",
    )


def _ordered_splits(manifest: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """Splits in their natural order (train, valid, test, others), not the manifest's alphabetical one."""
    return sorted(manifest.get("splits", {}).items(), key=lambda entry: split_rank(entry[0]))


def _describe_groups(store: Store) -> str:
    """How many slides (groups) the store knows and how many patches are placed on one; "" when none."""
    groups = store.groups[store.groups != ""]
    return f"{len(set(groups)):,} over {len(groups):,} patches" if len(groups) else ""


def _describe_problems(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "not recorded"
    if not summary["kinds"]:
        return "none"
    lines = [
        f"{kind}: " + ", ".join(f"{n} {severity}(s)" for severity, n in sorted(counts.items()))
        for kind, counts in summary["kinds"].items()
    ]
    return "\n".join([*lines, f"{summary['skipped']} bad item(s) left out"])
