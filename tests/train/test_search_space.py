"""Search spaces: the seed's 54-point grid, and YAML files refused before any trial starts when they are wrong."""

from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from histodetect.errors import ConfigError
from histodetect.runs.config import TrainConfig
from histodetect.train.search_space import grid, grid_size, load_space

BASE = TrainConfig(model="baseline-cnn")


def test_seed_space_is_the_notebooks_54_point_grid() -> None:
    values = grid(load_space("seed", BASE), "seed")
    assert values == {
        "lr": [1e-3, 1e-4, 1e-5],
        "dropout": [0.3, 0.4, 0.5],
        "optimizer": ["adam", "rmsprop"],
        "batch_size": [16, 32, 64],
    }
    assert grid_size(values) == 54


def test_a_yaml_space_takes_float_log_int_and_categorical_ranges(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "lr: {type: float, low: 1e-5, high: 1e-2, log: true}\n"  # YAML reads 1e-5 as text; taken as a number
        "epochs: {type: int, low: 1, high: 3}\n"
        "aug_hed: {type: float, low: 0.0, high: 0.1, step: 0.05}\n"
        "scheduler: {type: categorical, choices: [cosine, none]}\n"
    )
    space = load_space(str(path), BASE)
    assert space["lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["epochs"] == IntDistribution(1, 3)
    assert space["scheduler"] == CategoricalDistribution(["cosine", "none"])
    discrete = {key: d for key, d in space.items() if key != "lr"}  # lr is continuous: see the next test
    assert grid(discrete, str(path)) == {
        "epochs": [1, 2, 3],
        "aug_hed": [0.0, 0.05, 0.1],
        "scheduler": ["cosine", "none"],
    }


def test_the_grid_sampler_refuses_a_continuous_range() -> None:
    with pytest.raises(ConfigError, match="lr is a continuous range"):
        grid(load_space("default", BASE), "default")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("learning_rate: {type: float, low: 0.1, high: 0.2}", "learning_rate is not a training option"),
        ("notes: {type: categorical, choices: [a, b]}", "notes is not a training option"),
        ("lr: {type: float, low: 0.1, high: 0.01}", "lr: low must be below high"),
        ("lr: {type: float, low: 0.0, high: 0.1, log: true}", "lr: a log range needs low > 0"),
        ("epochs: {type: int, low: 1.5, high: 3}", "epochs: low, high and step of a int range"),
        ("lr: {type: float, low: 0.1}", "lr: low, high and step"),
        ("lr: {type: uniform, low: 0.1, high: 0.2}", "lr: expected"),
        ("lr: {type: float, low: 0.1, high: 0.2, choices: [1]}", "lr: unknown field"),
        ("optimizer: {type: categorical, choices: []}", "optimizer: choices must be a non-empty list"),
        ("dropout: {type: float, low: 0.1, high: 1.0}", "dropout=1.0 is refused by the training config"),
        ("optimizer: {type: categorical, choices: [adam, lbfgs]}", "optimizer='lbfgs' is refused"),
        ("batch_size: {type: int, low: 0, high: 64}", "batch_size=0 is refused"),
    ],
)
def test_a_wrong_space_file_is_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key) as error:
        load_space(str(path), BASE)
    assert str(path) in str(error.value)


def test_a_space_that_is_neither_a_name_nor_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither seed, default nor a YAML file"):
        load_space(str(tmp_path / "missing.yaml"), BASE)
    (tmp_path / "list.yaml").write_text("- lr\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_space(str(tmp_path / "list.yaml"), BASE)
