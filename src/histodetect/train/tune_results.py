"""What a tuning study leaves behind, readable by any worker: ``trials.csv``, ``best.yaml`` and the progress line.

Everything here is computed from the study database alone (the base configuration is recorded in the study by
``tune``), so a machine that ran none of the trials writes the same files as the one that ran the best.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from histodetect.io import atomic_path
from histodetect.runs.config import TrainConfig

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
RECORD = "histodetect_tune"  # the study's user attribute holding the base configuration and the space


def recorded_base(study: optuna.Study) -> TrainConfig:
    return TrainConfig.from_dict(study.user_attrs[RECORD]["base"], source=f"study {study.study_name!r}")


def best_config(study: optuna.Study) -> TrainConfig | None:
    """The recorded base with the best complete trial's parameters: a config ``train --config`` takes."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
    notes = f"best of tune study {study.study_name!r}: trial {best.number}, val AUC {best.value:.4f}"
    return recorded_base(study).replace(**best.params, notes=notes)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, parameters, best validation AUC so far, epochs reported, time, worker."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seen = list(t.intermediate_values.values())
        ran = t.datetime_start is not None and t.datetime_complete is not None
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if ran else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "best_val_auc": max(seen) if seen else t.value,
                "epochs": len(seen),
                "time_s": round(duration, 1) if duration is not None else None,
                **{f"param_{k}": v for k, v in t.params.items()},
                "retry_of": t.system_attrs.get("failed_trial"),
                "surplus": bool(t.user_attrs.get("surplus", False)),
                "worker": t.user_attrs.get("worker"),
                "sampler_seed": t.user_attrs.get("sampler_seed"),
                "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
            }
        )
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["number", "state", "best_val_auc", "epochs"])


def write_results(study: optuna.Study, out: Path) -> None:
    """``trials.csv`` (every trial) and, once one has completed, ``best.yaml``; both atomically."""
    with atomic_path(out / "trials.csv") as tmp:
        trials_table(study).to_csv(tmp, index=False)
    best = best_config(study)
    if best is not None:
        best.save(out / "best.yaml")


def progress_line(study: optuna.Study, trial: FrozenTrial, budget: int) -> str:
    """``trial 7 of 54 (number 9): PRUNED at epoch 2, val AUC 0.81 | best 0.86 (trial 3) | 2 pruned, 0 failed``."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in DONE for t in trials)
    seen = list(trial.intermediate_values.values())
    auc = trial.value if trial.value is not None else (max(seen) if seen else None)
    what = f"{trial.state.name}{f' at epoch {len(seen)}' if trial.state == TrialState.PRUNED else ''}"
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = max(complete, key=lambda t: t.value, default=None)
    return (
        f"trial {finished} of {budget} (number {trial.number}): {what}"
        f"{f', val AUC {auc:.4f}' if auc is not None else ''}"
        f" | best {f'{best.value:.4f} (trial {best.number})' if best else '-'}"
        f" | {sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
        f"{sum(t.state == TrialState.FAIL for t in trials)} failed"
    )
