"""The command line against the run contract: every ``TrainConfig`` setting has a ``train`` flag, and the base
settings ``tune`` takes are ``train``'s flags (same names, same help), so the two cannot drift apart again."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import typer.main

from histodetect.cli import app
from histodetect.runs.config import TrainConfig

# TrainConfig fields that deliberately have no flag: each is set some other way.
NOT_FLAGS = {
    "version",  # the config format's version, written by the code, never chosen
    "notes",  # what made the config (tune writes which trial), not a setting
    "extra",  # a config file's free-form keys of the user's own
}
# train's flags that are no TrainConfig field: what to train on and where to, and how the command runs.
COMMAND_FLAGS = {"store", "out", "config", "resume", "all_folds", "restart"}
# The settings tune takes as its trials' base (the search space varies the rest).
TUNE_BASE = {
    "preset",
    "model",
    "pretrained",
    "freeze",
    "epochs",
    "image_size",
    "limit_train",
    "epoch_patches",
    "val_patches",
}


def options(command: str) -> dict[str, Any]:
    """A command's parameters by their Python name (a TrainConfig field's name for its flag)."""
    group: Any = typer.main.get_command(app)  # typer's own click: its classes are not the click package's
    return {param.name: param for param in group.commands[command].params}


def described(param: Any) -> tuple[object, ...]:
    """What a user sees of a flag in ``--help``: its names, its help, whether it is an on/off switch."""
    return (*param.opts, *param.secondary_opts, getattr(param, "help", None), getattr(param, "is_flag", None))


def test_every_train_config_field_has_a_train_flag() -> None:
    train = options("train")
    settings = {f.name for f in fields(TrainConfig)}
    assert not NOT_FLAGS - settings, "NOT_FLAGS names a field TrainConfig no longer has"
    assert settings - NOT_FLAGS <= set(train), (
        f"fields without a train flag: {sorted(settings - NOT_FLAGS - set(train))}"
    )
    assert set(train) - settings <= COMMAND_FLAGS, (
        f"train flags that set nothing: {set(train) - settings - COMMAND_FLAGS}"
    )
    assert not NOT_FLAGS & set(train)


def test_every_setting_tune_takes_is_a_train_flag_with_the_same_help() -> None:
    train, tune = options("train"), options("tune")
    settings = {f.name for f in fields(TrainConfig)}
    assert settings & set(tune) == TUNE_BASE
    for name in TUNE_BASE:
        assert described(tune[name]) == described(train[name]), name
    # --config is spelled --base-config too in tune (the trials' base); its help is train's.
    assert tune["base_config"].opts == ["--base-config", "--config"]
    assert tune["base_config"].help == train["config"].help
