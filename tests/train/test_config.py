from pathlib import Path

import pytest

from histodetect.runs.config import PRESETS, ConfigError, TrainConfig, build_config, freeze_top_k


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
        {"stain_norm": "vahadane"},
        {"stain_aug": 1.0},
        {"stain_consistency": 10.0},
        {"stain_aug": 0.6, "stain_consistency": -1.0},
        {"freeze": "frozen", "cache_embeddings": True, "stain_aug": 0.6, "stain_consistency": 10.0},
        {"freeze": "frozen", "cache_embeddings": True, "stain_norm": "macenko"},
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


def test_yaml_numbers_written_as_text_are_coerced(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; the field's annotation says it is a float."""
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nweight_decay: 1e-4\nepochs: 3\nimage_size: '128'\ndevices: 2\n")
    config = TrainConfig.load(tmp_path / "c.yaml")
    assert (config.lr, config.weight_decay, config.epochs, config.image_size, config.devices) == (
        0.001,
        0.0001,
        3,
        128,
        "2",
    )
    assert isinstance(config.lr, float) and isinstance(config.weight_decay, float)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("weight_decay: lots", "weight_decay: expected float, not 'lots'"),
        ("epochs: 2.5", "epochs: expected int, not 2.5"),
        ("aug_dihedral: 1", "aug_dihedral: expected bool, not 1"),
        ("limit_train: [1, 2]", "limit_train: expected int or unset, not [1, 2]"),
        ("batch_size: true", "batch_size: expected int, not True"),
    ],
)
def test_a_wrong_type_is_one_line_naming_the_file_key_and_value(tmp_path: Path, line: str, named: str) -> None:
    (tmp_path / "c.yaml").write_text(line + "\n")
    with pytest.raises(ConfigError) as caught:
        TrainConfig.load(tmp_path / "c.yaml")
    assert str(caught.value) == f"{tmp_path / 'c.yaml'}: {named}"


def test_cli_refuses_a_wrong_type_before_making_the_run_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histodetect.cli import app

    (tmp_path / "c.yaml").write_text("weight_decay: lots\n")
    done = CliRunner().invoke(app, ["train", str(tmp_path / "no-store"), "--out", str(tmp_path / "run"),
                                    "--config", str(tmp_path / "c.yaml")])  # fmt: skip
    assert done.exit_code == 2 and "weight_decay: expected float, not 'lots'" in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)
    assert not (tmp_path / "run").exists()


def test_each_layer_overrides_only_the_keys_it_sets(tmp_path: Path) -> None:
    """defaults < preset < config file < flags; a file that sets lr keeps everything else the preset chose."""
    default = TrainConfig()
    assert build_config() == default  # layer 0: the defaults
    preset = build_config(preset="cpu")  # layer 1: the preset's keys, the defaults for the rest
    assert (preset.model, preset.image_size, preset.epoch_patches) == ("tf_efficientnet_lite0", 128, 4096)
    assert preset.dropout == default.dropout and preset.preset == "cpu"
    (tmp_path / "small.yaml").write_text("lr: 3e-4\nepochs: 2\n")
    filed = build_config(preset="cpu", config_file=tmp_path / "small.yaml")  # layer 2: only lr and epochs
    assert (filed.lr, filed.epochs) == (3e-4, 2)
    assert (filed.model, filed.image_size, filed.epoch_patches, filed.max_time) == (
        "tf_efficientnet_lite0",
        128,
        4096,
        18.0,
    )
    flagged = build_config(preset="cpu", config_file=tmp_path / "small.yaml", epochs=5, lr=None)  # layer 3
    assert (flagged.epochs, flagged.lr, flagged.model) == (5, 3e-4, "tf_efficientnet_lite0")
    assert build_config(config_file=tmp_path / "small.yaml").model == default.model  # no preset: defaults


def test_stain_settings_round_trip_and_an_older_file_loads_without_them(tmp_path: Path) -> None:
    config = TrainConfig(stain_norm="reinhard", stain_reference="lab.png", stain_aug="0.4")
    assert config.stain_aug == 0.4
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config
    older = {k: v for k, v in TrainConfig().to_dict().items() if not k.startswith("stain_")}
    assert TrainConfig.from_dict(older).stain_norm == "none"
