"""What ``tune`` varies: named search spaces, and spaces read from YAML, checked before any trial starts.

A space maps ``TrainConfig`` option names to Optuna distributions; every other option comes from the base
configuration. ``seed`` is the seed notebook's own grid (54 combinations), ``default`` the continuous space tune
has always searched, and a YAML file names any training option::

    lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    dropout: {type: float, low: 0.0, high: 0.5}
    epochs: {type: int, low: 2, high: 6}
    optimizer: {type: categorical, choices: [adam, rmsprop]}

A file is refused, naming the key, when it names an unknown option, gives a bad range, or holds a value that
``TrainConfig`` itself refuses (each end of a range and every choice is tried on the base configuration), so a
mistake costs nothing instead of failing trial after trial on a cluster.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from histodetect.errors import ConfigError
from histodetect.runs.config import TrainConfig, safe_yaml

Space = dict[str, BaseDistribution]

SEED_SPACE: Space = {
    "lr": CategoricalDistribution([1e-3, 1e-4, 1e-5]),
    "dropout": CategoricalDistribution([0.3, 0.4, 0.5]),
    "optimizer": CategoricalDistribution(["adam", "rmsprop"]),
    "batch_size": CategoricalDistribution([16, 32, 64]),
}
DEFAULT_SPACE: Space = {
    "lr": FloatDistribution(1e-4, 3e-3, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
    "optimizer": CategoricalDistribution(["adam", "adamw", "rmsprop", "sgd"]),
    "batch_size": CategoricalDistribution([32, 64, 128]),
}
NAMED = {"seed": SEED_SPACE, "default": DEFAULT_SPACE}
# Bookkeeping fields, not training options: a space may not vary them.
NOT_SEARCHABLE = {"version", "notes", "extra", "preset"}
_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def load_space(spec: str, base: TrainConfig) -> Space:
    """``seed``, ``default`` or a YAML file, checked against ``base`` (raises ConfigError naming the key)."""
    if spec in NAMED:
        space = NAMED[spec]
        source = f"--space {spec}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--space {spec}: neither seed, default nor a YAML file")
        data = safe_yaml(path, "search space")
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{path}: expected a mapping of option: {{type: float|int|categorical, ...}}")
        source = str(path)
        space = {str(key): _distribution(source, str(key), value) for key, value in data.items()}
    check_space(space, base, source)
    return space


def _distribution(source: str, key: str, spec: Any) -> BaseDistribution:
    where = f"{source}: {key}"
    if not isinstance(spec, dict) or spec.get("type") not in _KEYS:
        raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
    kind = spec["type"]
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for a {kind} range")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{where}: choices must be plain values (text, numbers, true/false, null)")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices repeat a value")
        return CategoricalDistribution(choices)
    low, high = _number(where, kind, spec.get("low")), _number(where, kind, spec.get("high"))
    step = None if spec.get("step") is None else _number(where, kind, spec["step"])
    log = bool(spec.get("log", False))
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: low must be below high, got low={low} high={high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low={low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be positive and cannot be combined with log")
    if kind == "float":
        return FloatDistribution(low, high, log=log, step=step)
    return IntDistribution(low, high, log=log, step=step or 1)


def _number(where: str, kind: str, value: Any) -> Any:
    """A range bound: an int for int ranges; for float ranges any number, or text such as 1e-5 (YAML reads an
    exponent without a dot as text)."""
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{where}: low, high and step of a {kind} range must be {kind} numbers, got {value!r}")


def check_space(space: Space, base: TrainConfig, source: str) -> None:
    """Every key a searchable option, every end of every range and every choice a value TrainConfig accepts."""
    options = {f.name for f in fields(TrainConfig)} - NOT_SEARCHABLE
    for key, distribution in space.items():
        if key not in options:
            raise ConfigError(f"{source}: {key} is not a training option; choose from {sorted(options)}")
        for value in _probe_values(distribution):
            try:
                base.replace(**{key: value})
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: {key}={value!r} is refused by the training config ({exc})") from exc


def _probe_values(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    assert isinstance(distribution, (FloatDistribution, IntDistribution))
    return [distribution.low, distribution.high]


def grid(space: Space, source: str) -> dict[str, list[Any]]:
    """The space as a grid for Optuna's GridSampler: choices, and int or stepped float ranges enumerated."""
    values: dict[str, list[Any]] = {}
    for key, distribution in space.items():
        if isinstance(distribution, CategoricalDistribution):
            values[key] = list(distribution.choices)
        elif isinstance(distribution, IntDistribution) and not distribution.log:
            values[key] = list(range(distribution.low, distribution.high + 1, distribution.step))
        elif isinstance(distribution, FloatDistribution) and distribution.step is not None:
            count = round((distribution.high - distribution.low) / distribution.step) + 1
            values[key] = [round(distribution.low + i * distribution.step, 12) for i in range(count)]
        else:
            raise ConfigError(
                f"{source}: {key} is a continuous range; the grid sampler needs choices, an int range or a step"
            )
    return values


def grid_size(values: dict[str, list[Any]]) -> int:
    return math.prod(len(v) for v in values.values())


def describe(space: Space) -> str:
    """One line per option, for the report and the start-up message."""
    return "; ".join(f"{key} {_describe(d)}" for key, d in space.items())


def _describe(distribution: BaseDistribution) -> str:
    if isinstance(distribution, CategoricalDistribution):
        return "{" + ", ".join(map(str, distribution.choices)) + "}"
    assert isinstance(distribution, (FloatDistribution, IntDistribution))
    scale = " (log)" if distribution.log else ""
    return f"{distribution.low}..{distribution.high}{scale}"
