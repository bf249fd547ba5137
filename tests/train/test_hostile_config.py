"""Hostile settings for train and tune, grouped by the class of failure each caused before: SILENT ACCEPT (a NaN
or out-of-range number trained a "finished" run), TRACEBACK (a config file that is not UTF-8, an alias bomb, an
image size the network cannot pool) and LEFTOVERS (a refused run left an empty --out). Each is refused in one line
(exit 2) before any folder is made."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.store import Store
from histodetect.errors import ConfigError
from histodetect.runs.config import TrainConfig, build_config, read_settings
from histodetect.train import module as module_module
from histodetect.train.run import train

QUICK = dict(epochs=1, batch_size=8, limit_train=16, val_fraction=0.2, num_workers=0, patience=0)


def refused(argv: list[str]) -> str:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    return str(result.stderr)


# ---------------------------------------------------------------------------------------------------- silent accepts
@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--lr", "nan", "lr must be a finite number"),
        ("--lr", "inf", "lr must be a finite number"),
        ("--pos-weight", "nan", "pos_weight must be a finite number"),
        ("--max-time", "-1", "max_time must be positive"),
        ("--mpp", "-1", "mpp must be"),
        ("--mpp", "nan", "mpp must be a finite number"),
        ("--weight-decay", "nan", "weight_decay must be a finite number"),
        ("--image-size", "7", "image_size must be 32..1024"),
        ("--label-smoothing", "1.5", "label_smoothing must be in [0, 1)"),
        ("--folds", "1", "--folds 1: cross-validation needs at least 2"),
        ("--seed", "-1", "seed must be 0..4294967295"),  # a numpy ValueError before
        ("--seed", "100000000000000000000000", "seed must be 0..4294967295"),
        ("--num-workers", "-1", "num_workers must be 0..64"),  # a DataLoader ValueError before
        ("--num-workers", "100000", "num_workers must be 0..64"),  # forked until memory ran out before
        ("--folds", "1000", "--folds 1000: each class needs at least 1000"),  # scikit-learn's ValueError before
        ("--precision", "bogus", "precision must be one of"),  # Lightning's ValueError before
        ("--devices", "0", "devices must be auto, a count"),  # Lightning's MisconfigurationException before
        ("--num-nodes", "0", "num_nodes must be at least 1"),
        ("--accelerator", "bogus", "Lightning refuses them here"),  # and the folder it made is removed
        ("--logger", "", "logger must be a comma list of csv, tensorboard, mlflow"),  # silently accepted before
        ("--logger", "csv,wandb", "logger must be a comma list"),  # refused only once the run folder was made before
    ],
)
def test_a_bad_number_is_refused_before_a_run_folder_is_made(
    sample_store: Store, tmp_path: Path, flag: str, value: str, says: str
) -> None:
    out = tmp_path / "run"
    assert says in refused(["train", str(sample_store.path), "--out", str(out), flag, value])
    assert not out.exists()


def test_nan_in_a_yaml_config_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: .nan\n")
    with pytest.raises(ConfigError, match=f"{path}: lr must be a finite number"):
        build_config(config_file=path)


@pytest.mark.parametrize(("args", "says"), [(["--timeout", "-5"], "--timeout -5"), (["--trials", "0"], "--trials 0")])
def test_tune_refuses_a_budget_that_runs_nothing(
    sample_store: Store, tmp_path: Path, args: list[str], says: str
) -> None:
    out = tmp_path / "tuning"
    assert says in refused(["tune", str(sample_store.path), "--out", str(out), *args])
    assert not out.exists()


@pytest.mark.slow
def test_a_run_whose_loss_turns_nan_stops_in_one_line(
    sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, NaN weights were saved as a finished run with a best validation AUC."""
    monkeypatch.setattr(module_module, "build_loss", lambda config: lambda logits, targets: logits.sum() * math.nan)
    with pytest.raises(ConfigError, match="training diverged"):
        train(sample_store, tmp_path / "run", TrainConfig(**QUICK))
    assert not (tmp_path / "run").exists()  # what it made is gone: the same command is not told "already holds a run"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(ConfigError, match="training diverged"):
        train(sample_store, tmp_path / "mine", TrainConfig(**QUICK))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # only what the run made is removed


# ---------------------------------------------------------------------------------------------------- tracebacks
def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: r\xe9snet\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_settings(path)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """527 bytes that expand to 10^9 values: before, a MemoryError after 36 s formatting the value."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join(['*' + chr(97 + k)] * 9)}]" for k in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="anchors and aliases are not allowed"):
        read_settings(path)


@pytest.mark.slow
def test_many_unknown_keys_give_a_short_error_and_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"k{n}: 1\n" for n in range(20_000)))
    with pytest.raises(ConfigError, match="and 19,990 more") as error:
        build_config(config_file=path)
    assert len(str(error.value)) < 400
    path.write_text("".join(f"k{n}: 1\n" for n in range(200_000)))
    with pytest.raises(ConfigError, match="bytes; a configuration file is at most"):
        read_settings(path)


def test_a_long_value_is_quoted_cut_short() -> None:
    with pytest.raises(ConfigError) as error:
        TrainConfig(lr=["x" * 10_000])  # type: ignore[arg-type]
    assert len(str(error.value)) < 200


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, sample_store: Store) -> dict[str, Path]:
    """Copies of one finished run, each with one of its files damaged as a careless hand or a full disk leaves it."""
    import shutil

    root = tmp_path_factory.mktemp("damaged")
    train(sample_store, root / "run", TrainConfig(**QUICK))
    damage = {
        "split.csv not CSV": ("split.csv", b'"\x00\xff'),
        "split.csv another table": ("split.csv", b"a,b\n1,2\n"),
        "store.json a list": ("store.json", b"[1]"),
        "store.json not JSON": ("store.json", b"{"),
        "config.yaml empty": ("config.yaml", b""),
        "config.yaml a FIFO": ("config.yaml", None),
    }
    runs = {}
    for k, (case, (name, content)) in enumerate(damage.items()):
        run = root / f"run{k}"
        shutil.copytree(root / "run", run)
        (run / name).unlink()
        if content is None:
            os.mkfifo(run / name)
        else:
            (run / name).write_bytes(content)
        runs[case] = run
    return runs


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("split.csv not CSV", "split.csv: not a readable CSV"),
        ("split.csv another table", "split.csv: no id and part columns"),
        ("store.json a list", "store.json: a JSON list"),
        ("store.json not JSON", "store.json: not readable JSON"),
        ("config.yaml empty", "config.yaml: names no model"),  # SILENT ACCEPT before: every setting its default
        ("config.yaml a FIFO", "config.yaml: not a regular file"),  # HANG before: the read waited for a writer
    ],
)
def test_a_damaged_file_in_a_run_folder_is_one_line(
    damaged: dict[str, Path], sample_store: Store, tmp_path: Path, case: str, says: str
) -> None:
    """TRACEBACK before (KeyError 'part', AttributeError on a list) from evaluate on its own held-out patches."""
    out = tmp_path / "eval"
    assert says in refused(["evaluate", str(damaged[case]), str(sample_store.path), "--out", str(out)])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- leftovers
def test_a_refused_pretrained_file_leaves_no_empty_out(sample_store: Store, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    weights.write_text("not weights\n")
    out = tmp_path / "run"
    refused(["train", str(sample_store.path), "--out", str(out), "--pretrained", str(weights), "--epochs", "1"])
    assert not out.exists()


@pytest.mark.slow
def test_nan_weights_are_refused_by_evaluate_in_one_line(
    sample_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train(sample_store, run, TrainConfig(**QUICK))
    from safetensors.torch import load_file, save_file

    weights = {
        k: torch.full_like(v, math.nan) if v.is_floating_point() else v
        for k, v in load_file(run / "model.safetensors").items()
    }
    save_file(weights, run / "model.safetensors")
    says = refused(["evaluate", str(run), str(sample_store.path), "--out", str(tmp_path / "eval"), "--split", "all"])
    assert "weights are not finite" in says
