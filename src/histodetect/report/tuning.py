"""``report.html`` of a tuning study: how the search went, which settings mattered, and every trial.

Rewritten after every trial (``tune`` calls it through its ``after_trial`` hook, since the training layer does not
import reports), so the page shows a study in progress as well as a finished one. The figures are Optuna's own
matplotlib visualisations; a figure that needs more finished trials than there are yet is replaced by a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
from optuna.visualization import matplotlib as ovm

from histodetect.report.html import Card, Page, Section
from histodetect.train.tune_results import trials_table


def _importances(study: optuna.Study) -> Any:
    """fANOVA with 16 trees instead of Optuna's 64 (4x faster): the page is redrawn after every trial."""
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=16, seed=0)
    return ovm.plot_param_importances(study, evaluator=evaluator)


FIGURES: list[tuple[str, Callable[[optuna.Study], Any], str]] = [
    ("tuning-history", ovm.plot_optimization_history, "Best validation ROC AUC so far, trial by trial."),
    ("tuning-importance", _importances, "How much each setting explains the AUC (fANOVA)."),
    ("tuning-parallel", ovm.plot_parallel_coordinate, "Each complete trial's settings, coloured by its AUC."),
    ("tuning-slice", ovm.plot_slice, "AUC against each setting, one point per complete trial."),
]


def write_tuning_report(study: optuna.Study, out: Path) -> Path:
    """Write ``out/report.html`` (and its figures as PNGs beside it); returns the page's path."""
    table = trials_table(study)
    page = Page(out, "Tuning", f"study {study.study_name!r}: {len(table)} trial(s)")
    states = table["state"].value_counts().to_dict() if len(table) else {}
    failed = states.get("FAIL", 0)
    complete = table[table["state"] == "COMPLETE"] if len(table) else table
    best = complete.loc[complete["best_val_auc"].idxmax()] if len(complete) else None
    page.cards(
        [
            Card(
                "best val ROC AUC",
                f"{best['best_val_auc']:.4f}" if best is not None else "-",
                f"trial {int(best['number'])}" if best is not None else "no complete trial yet",
                "good",
            ),
            Card("complete", str(states.get("COMPLETE", 0))),
            Card("pruned", str(states.get("PRUNED", 0)), "stopped early by the pruner"),
            Card("failed", str(failed), "a dead worker's, an interrupted or a surplus trial", "warn" if failed else ""),
            Card("running", str(states.get("RUNNING", 0) + states.get("WAITING", 0)), "or waiting to run again"),
        ]
    )
    _figures(page.section("The search"), study)
    shown = table.drop(columns=["sampler_seed"], errors="ignore").round({"best_val_auc": 4})
    page.section(
        "Every trial",
        "State, parameters, the best validation AUC each trial reached and the epochs it ran (a pruned trial stops "
        "early); retry_of names the trial a retried one replaces. Run folders: trial-NNNN beside this page.",
    ).table(shown, highlight=_best_row(table))
    return page.write("report.html")


def _figures(section: Section, study: optuna.Study) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for name, plot, caption in FIGURES:
        if name != "tuning-history" and len(complete) < 2:
            section.note(f"{caption} Drawn once two trials are complete.")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these experimental
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            section.note(f"{caption} Not drawn yet: {exc}", "warn")
            continue
        figure = np.asarray(axes).flat[0].figure
        figure.set_size_inches(*(9, 4.5) if name != "tuning-slice" else (12, 3.6))
        section.figure(figure, name, caption, wide=name in {"tuning-history", "tuning-slice"})
        plt.close(figure)


def _best_row(table: Any) -> list[int]:
    complete = table[table["state"] == "COMPLETE"] if len(table) else table
    if not len(complete):
        return []
    return [int(complete["best_val_auc"].idxmax())]
