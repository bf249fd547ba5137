"""The tuning report: Optuna's figures and a row per trial with its state, rewritten as a study goes on."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from histodetect.report.tuning import write_tuning_report

SPACE = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "optimizer": CategoricalDistribution(["adam", "rmsprop"])}


def _trial(state: TrialState, lr: float, optimizer: str, aucs: list[float]) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=state,
        value=aucs[-1] if state == TrialState.COMPLETE else None,
        params={"lr": lr, "optimizer": optimizer},
        distributions=SPACE,
        intermediate_values=dict(enumerate(aucs)),
    )


def test_report_shows_the_search_and_every_trial(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize", study_name="demo")
    assert "no complete trial yet" in write_tuning_report(study, tmp_path).read_text()  # e.g. Ctrl-C in trial 0
    study.add_trial(_trial(TrialState.COMPLETE, 1e-3, "adam", [0.71, 0.82]))
    page = write_tuning_report(study, tmp_path)  # one trial: the history only, the rest waits for a second
    assert "Drawn once two trials are complete" in page.read_text()

    study.add_trial(_trial(TrialState.PRUNED, 1e-2, "rmsprop", [0.55]))
    study.add_trial(_trial(TrialState.COMPLETE, 3e-4, "rmsprop", [0.75, 0.88]))
    study.add_trial(_trial(TrialState.FAIL, 2e-3, "adam", []))
    page = write_tuning_report(study, tmp_path)
    text = page.read_text()
    assert page == tmp_path / "report.html"
    for name in ("history", "importance", "parallel", "slice"):
        assert (tmp_path / f"tuning-{name}.png").stat().st_size > 1000
    assert text.count("data:image/png;base64,") == 4 and "Drawn once" not in text
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        assert f"<td>{state}</td>" in text
    assert '<tr class=highlight><td class="num">2</td>' in text  # the best trial (0.88) is marked
    assert "param_optimizer" in text and "rmsprop" in text
