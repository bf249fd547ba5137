"""Tuning: trials are ordinary runs, the grid runs each point once, the study resumes, the best config is the
recorded base plus the best parameters, and a dead worker's trial is failed and retried.

Every trial here is a baseline CNN on 32 patches an epoch from the embedded sample, so a trial takes seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from histodetect.data.store import Store
from histodetect.errors import ConfigError
from histodetect.runs.config import TrainConfig
from histodetect.train.search_space import SEED_SPACE
from histodetect.train.tune import HOLD_ENV, Heartbeat, make_sampler, storage_url, tune

pytestmark = pytest.mark.slow  # tuning workers train runs in other processes

BASE = TrainConfig(
    model="baseline-cnn",
    pretrained="none",
    epochs=1,
    epoch_patches=32,
    val_patches=32,
    patience=0,
    accelerator="cpu",
    num_workers=0,
)
FAST = Heartbeat(interval=1, grace=3)
REPO = Path(__file__).resolve().parents[2]


def _params(frame: pd.DataFrame) -> list[tuple]:
    return list(frame.filter(like="param_").itertuples(index=False, name=None))


def test_grid_runs_each_point_once_resumes_and_writes_the_best_config(sample_store: Store, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    reports: list[int] = []
    study = tune(
        sample_store, out, BASE, SEED_SPACE, trials=2, sampler="grid", heartbeat=FAST,
        after_trial=lambda s, o: reports.append(len(s.trials)),
    )  # fmt: skip
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert reports == [1, 2, 2]  # after each trial, and once at the end
    assert (out / "trial-0000" / "summary.json").exists() and (out / "trial-0001" / "summary.json").exists()

    again = tune(sample_store, out, BASE, SEED_SPACE, trials=3, sampler="grid", heartbeat=FAST)  # continues
    assert len(again.trials) == 3
    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == ["COMPLETE"] * 3 and list(table["epochs"]) == [1, 1, 1]
    assert len(set(_params(table))) == 3  # three different grid points
    best = TrainConfig.load(out / "best.yaml")
    winner = again.best_trial
    assert (best.lr, best.dropout, best.optimizer, best.batch_size) == tuple(
        winner.params[k] for k in ("lr", "dropout", "optimizer", "batch_size")
    )
    assert best.replace(**{k: getattr(BASE, k) for k in SEED_SPACE}, notes="") == BASE
    assert len(tune(sample_store, out, BASE, SEED_SPACE, trials=3, sampler="grid", heartbeat=FAST).trials) == 3

    with pytest.raises(ConfigError, match="started with epochs=1, not 2"):  # another recipe in the same study
        tune(sample_store, out, BASE.replace(epochs=2), SEED_SPACE, trials=4, sampler="grid", heartbeat=FAST)


def test_an_interrupted_trial_runs_again_with_its_parameters(
    sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import histodetect.train.tune as tuning

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "tune"
    with monkeypatch.context() as patch:
        patch.setattr(tuning, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tune(sample_store, out, BASE, SEED_SPACE, trials=1, sampler="grid", heartbeat=FAST)
    assert list(pd.read_csv(out / "trials.csv")["state"]) == ["FAIL", "WAITING"]
    tune(sample_store, out, BASE, SEED_SPACE, trials=1, sampler="grid", heartbeat=FAST)
    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == ["FAIL", "COMPLETE"] and table["retry_of"].iloc[1] == 0
    assert len(set(_params(table))) == 1  # the same grid point


def test_each_worker_seeds_its_sampler_afresh_but_the_grid_alike() -> None:
    seeds = {make_sampler("tpe", SEED_SPACE, BASE, "seed")[1] for _ in range(5)}
    assert len(seeds) == 5  # parallel workers, and a resumed study, draw different points
    assert make_sampler("grid", SEED_SPACE, BASE, "seed")[1] == BASE.seed  # workers agree which index is which


def test_a_plain_postgresql_url_goes_to_psycopg(tmp_path: Path) -> None:
    assert storage_url("postgresql://me@db:5432/hd", tmp_path) == "postgresql+psycopg://me@db:5432/hd"
    assert storage_url("postgres://me@db/hd", tmp_path) == "postgresql+psycopg://me@db/hd"
    assert storage_url("postgresql+psycopg2://me@db/hd", tmp_path) == "postgresql+psycopg2://me@db/hd"
    assert storage_url(None, tmp_path) == f"sqlite:///{(tmp_path / 'study.db').resolve()}"


def tune_command(store: Store, out: Path, base: Path, *extra: str) -> list[str]:
    """``histodetect tune`` as a user starts it, on the seed grid with fast heartbeats."""
    return [
        sys.executable, "-m", "histodetect", "tune", str(store.path), "--out", str(out), "--space", "seed",
        "--base-config", str(base), "--heartbeat", "1", "--grace", "3", *extra,
    ]  # fmt: skip


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def test_a_killed_worker_leaves_its_trial_failed_and_it_is_retried(sample_store: Store, tmp_path: Path) -> None:
    base = BASE.replace(epochs=2).save(tmp_path / "base.yaml")
    out = tmp_path / "tune"
    command = tune_command(sample_store, out, base, "--trials", "2")
    held = tmp_path / "held"  # the worker writes it after trial 0's first epoch, then waits there to be killed
    worker = subprocess.Popen(command, env={**worker_env(), HOLD_ENV: str(held)}, stderr=subprocess.DEVNULL)
    try:
        while not held.exists():  # no race: once there, the worker cannot move on
            assert worker.poll() is None, "the worker ended before its first trial's first epoch"
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert held.read_text() == "0"
    assert (out / "trial-0000" / "config.yaml").exists() and not (out / "trial-0000" / "summary.json").exists()

    subprocess.run(command, env=worker_env(), check=True, timeout=600, capture_output=True)
    table = pd.read_csv(out / "trials.csv").set_index("number")
    assert (table["state"].isin(["COMPLETE", "PRUNED"])).sum() == 2
    assert table.loc[0, "state"] == "FAIL"
    retry = table[table["retry_of"] == 0]
    assert len(retry) == 1 and retry["state"].iloc[0] in {"COMPLETE", "PRUNED"}
    assert _params(retry) == _params(table.loc[[0]])  # the retry trains the killed trial's grid point


def test_two_workers_share_one_postgresql_study(sample_store: Store, tmp_path: Path, postgres_url: str) -> None:
    base = BASE.save(tmp_path / "base.yaml")
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]  # as if on two machines: nothing shared but the study
    workers = [
        subprocess.Popen(
            tune_command(sample_store, out, base, "--trials", "4", "--storage", postgres_url),
            env=worker_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    tables = [pd.read_csv(out / "trials.csv") for out in outs]
    for table in tables:
        finished = table[table["state"].isin(["COMPLETE", "PRUNED"])]
        assert len(finished) == 4
        assert len(set(_params(finished))) == 4  # the grid hands each point out once
        assert set(table["state"]) <= {"COMPLETE", "PRUNED", "FAIL", "WAITING"}
        assert table.loc[table["state"] == "FAIL", "surplus"].all()  # only a trial that gave itself back fails
    assert TrainConfig.load(outs[0] / "best.yaml") == TrainConfig.load(outs[1] / "best.yaml")


def test_a_wrong_space_is_refused_before_any_trial(sample_store: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    space = tmp_path / "space.yaml"
    space.write_text("dropout: {type: float, low: 0.2, high: 1.5}\n")
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune", str(sample_store.path), "--out", str(out), "--space", str(space)])
    assert result.exit_code == 2 and "dropout=1.5 is refused" in result.output
    result = CliRunner().invoke(
        app, ["tune", str(sample_store.path), "--out", str(out), "--space", "default", "--sampler", "grid"]
    )
    assert result.exit_code == 2 and "lr is a continuous range" in result.output
    assert not out.exists()


def test_tuning_without_validation_is_refused_before_any_trial(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val_fraction 0"):
        tune(None, tmp_path / "tune", BASE.replace(val_fraction=0.0), SEED_SPACE, trials=1)  # type: ignore[arg-type]
    assert not (tmp_path / "tune").exists()
