"""The run folder's layout (DEVELOPERS.md): its file names, defined once, and the readers and writers of its small
files (``split.csv``, ``store.json``, ``stain.json``, ``summary.json``, ``evaluation/<split>/metrics.json``).

``train`` writes a run; every later command (evaluate, predict, explain, export, slide, serve, compare,
cross-validation) finds its files through these names. Loading the network is :mod:`histodetect.runs.loading`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histodetect.data.stain import (
    STAIN_FILE,
    StainFit,
    fit_stains,
    read_reference,
    reference_patches,
    spread,
    write_reference,
)
from histodetect.data.store import Store
from histodetect.errors import InferError, StoreError
from histodetect.io import atomic_write_json
from histodetect.runs.config import TrainConfig
from histodetect.runs.names import (  # noqa: F401 (re-exported: layout is where readers look for a run's files)
    CHECKPOINTS,
    CONFIG,
    EVALUATED,
    EVALUATION,
    METRICS,
    SPLIT,
    STORE,
    SUMMARY,
    WEIGHTS,
)

STAIN = STAIN_FILE  # the stain reference the run normalises to (data.stain names it: it reads and writes the file)
STORE_SPLIT = "store:"  # prefix naming a store split, for a store whose split is called val or test
PARTS = ("train", "val", "test")  # the parts of split.csv
SHOWN_IDS = 5  # ids quoted in an error message


def record_store(run: Path, store: Store) -> Path:
    """Write ``store.json``: where the run's patches came from and their fingerprint (see :func:`check_store`)."""
    return atomic_write_json(run / STORE, {"path": str(store.path.resolve()), "fingerprint": store.fingerprint})


def record_stain(run: Path, store: Store, rows: np.ndarray, config: TrainConfig) -> StainFit:
    """Write ``stain.json``: the stain reference the run normalises to, and its source. ``--stain-reference`` when
    given; else fitted on up to 512 of the run's training patches (``rows``), so that any command can normalise to
    this run's own training data without a flag, whichever ``--stain-norm`` it chooses. A resumed run keeps its
    file."""
    path = run / STAIN
    if path.is_file():
        return read_reference(path)
    if config.stain_reference is not None:
        reference, source = read_reference(config.stain_reference), str(config.stain_reference)
    else:
        patches = reference_patches(store.read(rows[spread(len(rows))]))
        reference, source = fit_stains(patches), f"{len(patches)} training patches of {store.path}"
    write_reference(path, reference, source=source)
    return reference


def run_stain(run: Path) -> StainFit | None:
    """The stain reference ``run`` recorded (``stain.json``), or None for a run from before references were
    recorded."""
    path = Path(run) / STAIN
    return read_reference(path) if path.is_file() else None


def check_store(run: Path, store: Store, *, strict: bool = True) -> None:
    """Refuse a store that differs from the one ``run`` was trained on, naming both.

    ``strict`` (resume; evaluate on the run's own val/test ids): any other store is refused. Otherwise (predict,
    evaluate on a store split) another store is fine, but the store at the run's recorded path must still hold
    what it held. Runs from before ``store.json`` existed are not checked.
    """
    path = run / STORE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not readable JSON ({str(exc)[:80]}); the run folder is damaged") from None
    if not isinstance(recorded, dict):
        raise StoreError(f"{path}: a JSON {type(recorded).__name__}, not a run's store record; the run is damaged")
    now = store.fingerprint
    if now == recorded.get("fingerprint"):
        return
    if not strict and Path(recorded.get("path", "")) != store.path.resolve():
        return
    raise StoreError(
        f"{store.path} ({now[:19]}) is not the store {run} was trained on: {recorded.get('path')} "
        f"({str(recorded.get('fingerprint'))[:19]}); use that store, or train a new run on this one"
    )


def read_split(run: Path, store: Store, parts: tuple[str, ...] = PARTS) -> dict[str, np.ndarray]:
    """Sorted store rows of each of ``parts`` of the run's ``split.csv`` (empty when the run has none of a part).

    An id the store lacks means it is not the store the run was trained on: a StoreError naming a few.
    """
    path = run / SPLIT
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {SPLIT}, so its held-out patches are unknown; pass --split all or a split")
    try:
        table = pd.read_csv(path, dtype={"id": str, "part": str}, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not a readable CSV ({str(exc)[:80]}); the run folder is damaged") from None
    if not {"id", "part"} <= set(table.columns):
        raise StoreError(f"{path}: no id and part columns; the run folder is damaged")
    row_of = pd.Series(np.arange(len(store)), index=store.ids)
    rows: dict[str, np.ndarray] = {}
    for part in parts:
        ids = table.loc[table["part"] == part, "id"].to_numpy()
        missing = [i for i in ids if i not in row_of.index]
        if missing:
            shown = ", ".join(missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
            raise StoreError(
                f"{store.path}: lacks {len(missing)} of the {len(ids)} {part} ids of {run} ({shown}); "
                "use the store the run was trained on"
            )
        rows[part] = np.sort(row_of.loc[ids].to_numpy()).astype(np.int64)
    return rows


def held_out_rows(run: Path, store: Store, part: str = "val") -> np.ndarray:
    """Rows of the run's held-out ``part`` (val or test), every one labeled."""
    rows = read_split(run, store, (part,))[part]
    if len(rows) == 0:
        how = "--val-fraction 0?" if part == "val" else "train with --test-fraction F to have one"
        raise InferError(f"{run / SPLIT}: the run held out no {part} patches ({how}); pass --split all or a split")
    if (store.labels[rows] < 0).any():
        raise InferError(f"{store.path}: some {part} ids of {run} are unlabeled in this store")
    return rows


def read_summary(run: Path) -> dict[str, Any]:
    """The run's ``summary.json`` (written when training ends)."""
    return json.loads((run / SUMMARY).read_text(encoding="utf-8"))


def evaluation_file(run: Path, split: str) -> Path:
    """Where evaluate keeps its metrics for ``split`` inside the run folder: ``evaluation/<split>/metrics.json``
    (a store split ``store:NAME`` as ``store-NAME``, any character outside ``[A-Za-z0-9_.-]`` as ``_``)."""
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", split.replace(STORE_SPLIT, "store-", 1))
    return run / EVALUATION / folder / EVALUATED
