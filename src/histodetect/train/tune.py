"""``tune``: store -> many runs, chosen by Optuna, and the best configuration.

Each trial is an ordinary run folder (``<out>/trial-0007``), trained by :func:`histodetect.train.run.train` from the
base configuration with the sampled values (``search_space``) put in. The study lives in a database (SQLite in
``<out>/study.db`` by default), so running the same command again continues it, and any number of workers given
the same ``--storage`` URL share one study. What keeps that honest:

- ``--trials N`` means N *finished* trials (complete or pruned). A worker starts a trial only while finished plus
  running trials are fewer than N, and a trial that finds N others ahead of it (two workers that checked at the
  same instant) gives itself back: it ends FAIL, marked ``surplus``, and its parameters wait in the queue for
  the next run that asks for more trials. A worker returns once the study holds N finished trials, so it also
  waits for the others' last trials, and takes over any of them whose worker died.
- Dead workers: every running trial sends a heartbeat; one silent for the grace period is marked FAIL by the
  next worker that looks, and Optuna's retry callback queues its parameters again, so the grid loses no point.
- Every worker seeds its TPE or random sampler afresh (the seed is recorded on each of its trials), so parallel
  workers and a resumed study do not draw the same points; the grid sampler is seeded with the base seed on
  every worker, since workers must agree which grid index is which combination (trial k takes index k).
- The base configuration and the space are recorded in the study: a worker with a different recipe is refused,
  and ``best.yaml`` is the recorded base plus the best trial's parameters, so any machine can write it.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from histodetect.data.store import Store
from histodetect.errors import ConfigError
from histodetect.runs.config import TrainConfig
from histodetect.train.run import train
from histodetect.train.search_space import Space, describe, grid, grid_size
from histodetect.train.tune_results import DONE, RECORD, progress_line, write_results

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
# Settings that describe the machine rather than the recipe: workers on different hardware may differ in these.
MACHINE = {"accelerator", "devices", "num_nodes", "strategy", "precision", "channels_last", "compile", "num_workers"}
MACHINE |= {"logger", "notes"}
# For tests that kill a worker in the middle of a trial: set to a file path, the first validation of a trial writes
# the trial's number there and then waits for ever, so the test kills it at a point it chose, on any machine.
HOLD_ENV = "HISTODETECT_TUNE_HOLD"


@contextlib.contextmanager
def _experimental_ok() -> Iterator[None]:
    """Optuna marks heartbeats and the retry callback experimental; they are what makes workers safe here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@dataclass(frozen=True)
class Heartbeat:
    """Seconds between a running trial's heartbeats, and the silence after which it counts as dead."""

    interval: int = 60
    grace: int = 180

    def __post_init__(self) -> None:
        if self.interval < 1 or self.grace <= self.interval:
            raise ConfigError(f"heartbeat must be >= 1 s and grace above it, got {self.interval} and {self.grace}")


class SurplusTrial(Exception):
    """A trial that found the budget already filled by trials ahead of it; it ends FAIL and is queued again."""


class ReportAUC(L.Callback):
    """Reports each epoch's validation AUC to Optuna and stops a trial the pruner gives up on."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        auc = trainer.callback_metrics.get("val_auc")
        if auc is None or trainer.sanity_checking:
            return
        self.trial.report(float(auc), step=trainer.current_epoch)
        if hold := os.environ.get(HOLD_ENV):
            Path(hold).write_text(str(self.trial.number))
            threading.Event().wait()
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val AUC {float(auc):.4f} at epoch {trainer.current_epoch}")


def storage_url(storage: str | None, out: Path) -> str:
    """SQLite in ``out`` by default; ``postgresql://`` as users write it goes to psycopg (v3), the driver the
    ``postgres`` extra installs (SQLAlchemy alone would look for psycopg2)."""
    if storage is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    for scheme in ("postgresql://", "postgres://"):
        if storage.startswith(scheme):
            return "postgresql+psycopg://" + storage.removeprefix(scheme)
    return storage


def open_storage(url: str, heartbeat: Heartbeat) -> RDBStorage:
    import sqlalchemy.exc

    attempt = 0
    while True:
        attempt += 1
        try:
            with _experimental_ok():
                return RDBStorage(
                    url,
                    heartbeat_interval=heartbeat.interval,
                    grace_period=heartbeat.grace,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                )
        except sqlalchemy.exc.IntegrityError as exc:
            # Workers started together on an empty PostgreSQL database race to create Optuna's tables, and all
            # but one get a duplicate-key error; a moment later the tables are there.
            if attempt == 5:
                raise _unusable(url, exc) from exc
            time.sleep(attempt * random.uniform(0.5, 1.5))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            raise _unusable(url, exc) from exc


def _unusable(url: str, exc: Exception) -> ConfigError:
    reason = str(exc).splitlines()[0]
    return ConfigError(f"--storage {_without_password(url)}: cannot open the study database ({reason})")


def _without_password(url: str) -> str:
    import sqlalchemy.exc

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.rsplit("@", 1)[-1]


def make_sampler(kind: str, space: Space, base: TrainConfig, source: str) -> tuple[optuna.samplers.BaseSampler, int]:
    """The sampler and its seed. TPE and random get a fresh seed per worker; the grid the base seed on all."""
    if kind == "grid":
        return optuna.samplers.GridSampler(grid(space, source), seed=base.seed), base.seed
    seed = secrets.randbelow(2**31)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed), seed
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed), seed
    raise ConfigError(f"--sampler must be one of {SAMPLERS}, not {kind!r}")


def make_pruner(kind: str, base: TrainConfig) -> optuna.pruners.BasePruner:
    """Pruning acts on each epoch's validation AUC, never on the first epoch."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(base.epochs, 2), reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner must be one of {PRUNERS}, not {kind!r}")


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """The trial's values for the space (a retried trial gets back the values it had)."""
    values: dict[str, Any] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            values[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, FloatDistribution):
            values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return values


def tune(
    store: Store,
    out: str | os.PathLike[str],
    base: TrainConfig,
    space: Space,
    *,
    trials: int,
    space_source: str = "default",
    sampler: str = "tpe",
    pruner: str = "median",
    storage: str | None = None,
    study_name: str = "histodetect",
    timeout_minutes: float | None = None,
    heartbeat: Heartbeat | None = None,
    after_trial: Callable[[optuna.Study, Path], None] | None = None,
) -> optuna.Study:
    """Work on the study until it holds ``trials`` finished trials (or the time is up); returns the study.

    ``after_trial(study, out)`` runs after every trial this worker ends, after ``trials.csv`` and ``best.yaml``
    are rewritten (the CLI passes the HTML report writer, which lives in a higher layer).
    """
    if base.val_fraction == 0 and base.folds <= 1:
        raise ConfigError("tune chooses by validation ROC AUC; val_fraction 0 leaves no validation patches")
    heartbeat = heartbeat or Heartbeat()
    study, seed, budget = open_study(
        out, base, space, trials=trials, space_source=space_source, sampler=sampler, pruner=pruner,
        storage=storage, study_name=study_name, heartbeat=heartbeat,
    )  # fmt: skip
    out = Path(out)
    console = Console(stderr=True)
    console.print(
        f"tuning {describe(space)} with {sampler} (seed {seed}) and {pruner} pruning: {budget} finished trials "
        f"wanted{' (the whole grid)' if budget < trials else ''}; study {study_name!r}, runs in {out}",
        highlight=False,
    )
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("sampler_seed", seed)
        if _ahead(study, trial.number) >= budget:
            trial.set_user_attr("surplus", True)
            _requeue(study, trial.number)
            raise SurplusTrial(f"trial {trial.number}: {budget} trials were already finished or running")
        config = base.replace(**suggest(trial, space), notes=f"tune trial {trial.number}")
        try:
            summary = train(store, out / f"trial-{trial.number:04d}", config, callbacks=[ReportAUC(trial)])
        except optuna.TrialPruned:
            raise
        except BaseException:  # Ctrl-C or an error ends the trial FAIL; its parameters wait for the next run
            _requeue(study, trial.number)
            raise
        return float(summary["best_val_auc"])

    def ended(study: optuna.Study, trial: FrozenTrial) -> None:
        write_results(study, out)
        if after_trial is not None:
            after_trial(study, out)
        if not trial.user_attrs.get("surplus"):
            console.print(progress_line(study, trial, budget), highlight=False, soft_wrap=True)

    deadline = time.monotonic() + timeout_minutes * 60 if timeout_minutes else None
    try:
        while deadline is None or time.monotonic() < deadline:
            with _experimental_ok():
                fail_stale_trials(study)  # a dead worker's trial: FAIL, and queued again by the retry callback
            counts = _counts(study)
            if counts["finished"] >= budget:
                break
            if counts["finished"] + counts["running"] >= budget:  # wait for the others' last trials (or deaths)
                time.sleep(min(heartbeat.interval, 5))
                continue
            study.optimize(objective, n_trials=1, catch=(SurplusTrial,), callbacks=[ended])
    finally:  # also after Ctrl-C: the files show the interrupted trial as FAIL and its re-queued copy
        write_results(study, out)
        if after_trial is not None:
            after_trial(study, out)
    return study


def open_study(
    out: str | os.PathLike[str],
    base: TrainConfig,
    space: Space,
    *,
    trials: int,
    space_source: str,
    sampler: str,
    pruner: str,
    storage: str | None,
    study_name: str,
    heartbeat: Heartbeat,
) -> tuple[optuna.Study, int, int]:
    """Create or load the study, after every setting has been checked; returns it, the sampler's seed, and the
    number of finished trials to reach (``trials``, or the grid's size when that is smaller)."""
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, not {trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune's progress line says what Optuna's INFO says
    chosen, seed = make_sampler(sampler, space, base, space_source)
    stopping = make_pruner(pruner, base)
    budget = trials
    if sampler == "grid":
        budget = min(trials, grid_size(grid(space, space_source)))
    out = Path(out)  # made once the settings (and a shared database) are known to be good
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)  # study.db goes there
    database = open_storage(storage_url(storage, out), heartbeat)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=study_name,
        storage=database,
        direction="maximize",
        load_if_exists=True,
        sampler=chosen,
        pruner=stopping,
    )
    _record_recipe(study, base, space)
    return study, seed, budget


def _requeue(study: optuna.Study, number: int) -> None:
    """Queue trial ``number``'s parameters (and grid point) again, as Optuna does for a dead worker's trial."""
    with _experimental_ok():
        RetryHeartbeatStaleTrialCallback()(study, study.trials[number])


def _ahead(study: optuna.Study, number: int) -> int:
    """Finished or running trials numbered before ``number``: the order every worker agrees on."""
    states = (*DONE, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if t.number < number)


def _counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {
        "finished": sum(t.state in DONE for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
    }


def _record_recipe(study: optuna.Study, base: TrainConfig, space: Space) -> None:
    """Record the base configuration and space in a new study; refuse a worker whose recipe differs."""
    mine = {
        "base": base.to_dict(),
        "space": {key: distribution_to_json(d) for key, d in space.items()},
    }
    recorded = study.user_attrs.get(RECORD)
    if recorded is None:
        study.set_user_attr(RECORD, mine)
        return
    if recorded["space"] != mine["space"]:
        raise ConfigError(
            f"study {study.study_name!r} searches {sorted(recorded['space'])} with other ranges; "
            "use the same --space, or another --study-name"
        )
    differ = [k for k, v in mine["base"].items() if k not in MACHINE and recorded["base"].get(k) != v]
    if differ:
        k = differ[0]
        raise ConfigError(
            f"study {study.study_name!r} was started with {k}={recorded['base'].get(k)!r}, not {mine['base'][k]!r}; "
            "use the same base settings, or another --study-name"
        )
