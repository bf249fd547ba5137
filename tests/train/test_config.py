from pathlib import Path

import pytest

from histodetect.train.config import PRESETS, ConfigError, TrainConfig, build_config, freeze_top_k


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    config = TrainConfig(model="resnet50", freeze="top:2", lr=3e-4, groups="slides.csv")
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config


def test_precedence_defaults_preset_file_flags(tmp_path: Path) -> None:
    assert build_config().model == "baseline-cnn"
    assert build_config(preset="cpu").model == PRESETS["cpu"]["model"]
    TrainConfig(model="convnext_tiny", lr=0.5).save(tmp_path / "c.yaml")
    from_file = build_config(preset="cpu", config_file=tmp_path / "c.yaml")
    assert (from_file.model, from_file.lr) == ("convnext_tiny", 0.5)
    flagged = build_config(preset="cpu", config_file=tmp_path / "c.yaml", lr=0.1, model=None)
    assert (flagged.model, flagged.lr) == ("convnext_tiny", 0.1)


@pytest.mark.parametrize(
    "change",
    [
        {"optimizer": "lbfgs"},
        {"scheduler": "step"},
        {"loss": "hinge"},
        {"freeze": "top:0"},
        {"freeze": "half"},
        {"val_fraction": 1.0},
        {"folds": 5, "fold": 5},
        {"lr": 0},
        {"dropout": 1.0},
        {"image_size": 0},
        {"image_size": "large"},
        {"epoch_patches": 0},
    ],
)
def test_bad_values_are_refused(change: dict) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**change)


def test_unknown_setting_in_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("model: resnet50\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.load(tmp_path / "c.yaml")


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="preset"):
        build_config(preset="tpu")


def test_freeze_policy_parsing() -> None:
    assert (freeze_top_k("none"), freeze_top_k("frozen"), freeze_top_k("top:3")) == (None, 0, 3)


def test_image_size_takes_pixels_or_auto(tmp_path: Path) -> None:
    assert TrainConfig(image_size="128").image_size == 128  # as the command line hands it over
    config = TrainConfig(image_size="auto")
    config.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml").image_size == "auto"
