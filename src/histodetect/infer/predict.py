"""``histodetect predict``: runs + patches -> a submission CSV (``id,label``).

The competition scores the label column as a probability with ROC AUC, so probabilities are written by
default; ``threshold`` turns them into 0/1 decisions for uses that need them. Given the sample submission, the
output has exactly its ids in its order: Kaggle rejects a file with a missing or extra row, and a missing
image is a problem in the data that must be seen, not papered over with a default value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from histodetect.data.ids import shown
from histodetect.infer.engine import InferError, Predictor
from histodetect.infer.sources import PatchSet, StoreRows, open_source
from histodetect.io import atomic_path, check_output_file
from histodetect.runs.layout import check_store

SHOWN_IDS = 5  # ids quoted in an error message


def predict(
    runs: Sequence[str | os.PathLike[str]],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sample_submission: str | os.PathLike[str] | None = None,
    tta: str = "none",
    threshold: float | None = None,
    batch_size: int | None = None,
    split: str | None = None,
    precision: str = "auto",
    engine: str = "auto",
    stain_norm: str | None = None,
    stain_reference: str | os.PathLike[str] | None = None,
    stain_fit: str = "patch",
) -> pd.DataFrame:
    """Predict every patch of ``source`` with the mean of ``runs`` and write ``out`` atomically.

    ``source``: a store, a folder of images (e.g. the competition's ``test/``) or one image file, see
    :func:`histodetect.infer.sources.open_source`. Without ``sample_submission`` there is one row per patch,
    sorted by id. Returns the frame written.
    """
    check_output_file(out)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InferError(f"--threshold {threshold}: must be within [0, 1]")
    patch_set = open_source(source, split=split)
    if isinstance(patch_set.patches, StoreRows):  # the store a run was trained on must not have changed since
        for run in (Path(r) for r in runs if Path(r).is_dir()):
            check_store(run, patch_set.patches.store, strict=False)
    if sample_submission is not None:
        ids, order = _match_sample(patch_set, Path(sample_submission))
    else:
        order = np.argsort(patch_set.ids, kind="stable")
        ids = patch_set.ids[order]
    # Read in source order (sequential on a store's memory map), then put the rows in the output's order.
    rows = np.sort(order)
    predictor = Predictor(
        runs,
        tta=tta,
        batch_size=batch_size,
        precision=precision,
        engine=engine,
        stain_norm=stain_norm,
        stain_reference=stain_reference,
    )
    patches = patch_set.take(rows).patches
    stain = predictor.fit_stain_set(patches, stain_fit)
    probabilities = check_finite(predictor.predict(patches, stain=stain), predictor.sources)
    p = probabilities[np.searchsorted(rows, order)]
    label = p if threshold is None else (p >= threshold).astype(np.int64)
    frame = pd.DataFrame({"id": ids, "label": label})
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def check_finite(probabilities: np.ndarray, sources: Any) -> np.ndarray:
    """``probabilities``, or a one-line error when the model gave NaN or infinity (weights that diverged): never a
    submission of empty labels nor a metric computed on them."""
    bad = int(np.count_nonzero(~np.isfinite(probabilities)))
    if bad:
        raise InferError(
            f"{', '.join(map(str, sources))}: the model gives NaN for {bad:,} of {len(probabilities):,} patches; its "
            "weights are not finite (a diverged run?)"
        )
    return probabilities


def _match_sample(patch_set: PatchSet, sample: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample submission's ids and, for each, its position in ``patch_set``.

    An id without a patch is an error (first few named, with the count); patches the sample does not list are
    left out with a note on stderr.
    """
    if not sample.is_file():
        raise FileNotFoundError(f"{sample}: no such sample submission")
    try:
        frame = pd.read_csv(sample, dtype={"id": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InferError(f"{sample}: not a readable CSV ({exc})") from exc
    if "id" not in frame.columns:
        raise InferError(f"{sample}: no 'id' column (header: {','.join(map(str, frame.columns))})")
    if frame.empty:
        raise InferError(f"{sample}: lists no ids (a header only); a submission needs at least one row")
    others = [str(c) for c in frame.columns if c not in ("id", "label")]
    if others:  # only the ids are read: other columns are not carried into the submission
        Console(stderr=True).print(
            f"note: column(s) {', '.join(map(shown, others[:5]))} of {sample.name} are not read; the submission "
            "has id,label only",
            highlight=False,
            soft_wrap=True,
        )
    ids = frame["id"].str.strip().to_numpy()
    repeated = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
    if repeated:
        raise InferError(f"{sample}: {len(repeated)} id(s) listed more than once: {_some(repeated)}")
    position = pd.Series(np.arange(len(patch_set)), index=patch_set.ids)
    missing = [i for i in ids if i not in position.index]
    if missing:
        raise InferError(f"{len(missing)} id(s) of {sample} have no image in {patch_set.description}: {_some(missing)}")
    extra = len(patch_set) - len(ids)
    if extra:
        Console(stderr=True).print(
            f"note: {extra} patch(es) of {patch_set.description} are not in {sample.name}: not written",
            highlight=False,
            soft_wrap=True,
        )
    return ids, position.loc[ids].to_numpy()


def _some(ids: Sequence[str]) -> str:
    return ", ".join(map(shown, ids[:SHOWN_IDS])) + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN_IDS else "")
