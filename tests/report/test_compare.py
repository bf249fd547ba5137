"""The comparison table, from fake run folders laid out like `train` and `evaluate` write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.report.compare import (
    TERMINAL_COLUMNS,
    augment_summary,
    compare,
    duration,
    loss_summary,
    read_runs,
    results_table,
    terminal_table,
)
from histodetect.runs.config import ConfigError, TrainConfig


def _run(
    root: Path,
    name: str,
    summary: dict[str, Any] | None,
    evaluation: dict[str, Any] | None = None,
    **config: Any,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    TrainConfig(**config).save(run / "config.yaml")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if evaluation is not None:
        _evaluated(run, "val", **evaluation)
    return run


def _evaluated(run: Path, split: str, **metrics: Any) -> None:
    """Metrics as `evaluate --split SPLIT` leaves them in the run."""
    (run / "evaluation" / split).mkdir(parents=True, exist_ok=True)
    (run / "evaluation" / split / "metrics.json").write_text(json.dumps({"split": split, **metrics}))


def _summary(auc: float, acc: float, **extra: Any) -> dict[str, Any]:
    return {
        "best_epoch": 3,
        "best_val_auc": auc,
        "best_val_acc": acc,
        "epochs_run": 5,
        "wall_time_s": 754.2,
        "train_images_per_s": 1234.5,
        "device": "NVIDIA H100",
        "precision": "bf16-mixed",
        **extra,
    }


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        _run(tmp_path, "baseline", _summary(0.91, 0.85), model="baseline-cnn", pretrained="none"),
        _run(
            tmp_path,
            "effnet",
            _summary(0.95, 0.88, stopped_by="early_stopping"),
            {"roc_auc": 0.9612, "roc_auc_ci": [0.955, 0.967], "accuracy": 0.901},
            model="tf_efficientnet_lite0",
            freeze="top:2",
            loss="focal",
            mixup=0.2,
            notes="lite0 | fast",
        ),
        _run(tmp_path, "unfinished", None, lr=3e-4),
    ]


def test_table_sorted_by_auc_with_best_marked(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    markdown = compare(runs, out)
    assert out.read_text() == markdown
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | model | freeze | lr |")
    names = [line.split("|")[1].strip() for line in lines[1:]]
    assert names == ["★ effnet", "baseline", "unfinished"]
    effnet = lines[1]
    assert "0.9612 [0.9550–0.9670]" in effnet and "0.9010" in effnet  # evaluate's numbers win over training's
    assert "focal γ2.0 α0.25" in effnet and "mixup 0.2" in effnet and "top:2" in effnet
    assert "stopped by early_stopping" in effnet and "lite0 \\| fast" in effnet  # pipe escaped
    assert "12m 34s" in lines[2] and "5 (best 3)" in lines[2] and "1,234" in lines[2]
    assert "no summary.json" in lines[3] and "0.0003" in lines[3]
    html = (tmp_path / "results.html").read_text()
    assert "class=highlight" in html and "★ effnet" in html
    assert (tmp_path / "results_auc.png").exists()


def test_only_held_out_parts_stand_for_a_run_and_test_never_ranks(tmp_path: Path) -> None:
    """An AUC on `all` (mostly training patches) is never shown; val ranks, test is shown beside it."""
    a = _run(tmp_path, "a", _summary(0.90, 0.8), {"roc_auc": 0.91, "roc_auc_ci": [0.88, 0.94]})
    _evaluated(a, "test", roc_auc=0.99, roc_auc_ci=[0.98, 1.0], numeric_precision="fp32")
    _evaluated(a, "all", roc_auc=0.999)
    b = _run(tmp_path, "b", _summary(0.93, 0.8))
    (b / "evaluation").mkdir()
    (b / "evaluation" / "metrics.json").write_text(json.dumps({"split": "all", "roc_auc": 0.9999}))  # old layout
    markdown = compare([a, b], tmp_path / "r.md")
    lines = [line.split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip("| ") for cell in lines[0]]
    rows = {row[0].strip("| ★"): dict(zip(header, (c.strip("| ") for c in row), strict=True)) for row in lines[1:]}
    assert header.index("test AUC") == header.index("val AUC") + 1  # side by side
    assert [row[0].strip("| ") for row in lines[1:]] == ["★ b", "a"]  # by val AUC (0.93 > 0.91), not by test 0.99
    assert rows["a"]["val AUC"] == "0.9100 [0.8800–0.9400]" and rows["a"]["test AUC"] == "0.9900 [0.9800–1.0000]"
    assert rows["b"]["val AUC"] == "0.9300" and rows["b"]["test AUC"] == ""  # the `all` AUC is not the run's
    assert "0.999" not in markdown
    assert "val AUC from training (best epoch)" in rows["b"]["notes"]
    assert "test AUC from evaluate (numeric_precision fp32)" in rows["a"]["notes"]
    assert "Ranked by val AUC" in markdown
    c = _run(tmp_path, "c", _summary(None, None, weights="last_epoch", best_epoch=None), val_fraction=0.0)
    last = [line for line in compare([a, c], tmp_path / "r2.md").splitlines() if line.startswith("| ")][-1]
    assert last.startswith("| c |") and "no validation: last epoch's weights" in last


def test_missing_or_broken_run_is_named(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compare([*runs, tmp_path / "nowhere"], tmp_path / "r.md")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not a run folder \(no config.yaml\)"):
        compare([tmp_path / "empty"], tmp_path / "r.md")
    (runs[0] / "summary.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"baseline/summary.json: unreadable"):
        compare(runs, tmp_path / "r.md")
    (runs[1] / "config.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match=r"config\.yaml: expected a mapping"):
        compare([runs[1]], tmp_path / "r.md")
    assert not (tmp_path / "r.md").exists()


def test_summaries() -> None:
    config = yaml.safe_load(yaml.safe_dump(TrainConfig().to_dict()))
    assert augment_summary(config) == "D4, HED 0.05, bright 0.1, contrast 0.1"
    assert augment_summary({}) == "none"
    assert loss_summary({"loss": "bce", "pos_weight": 2.0, "label_smoothing": 0.1}) == "bce pos_weight 2.0 smooth 0.1"
    assert [duration(s) for s in (4.6, 754.2, 3725, None)] == ["5s", "12m 34s", "1h 02m", ""]


def test_info_on_a_run_folder_shows_its_row_and_its_summary(tmp_path: Path) -> None:
    run = _run(tmp_path, "lite0", _summary(0.9621, 0.9012), model="tf_efficientnet_lite0")
    shown = CliRunner().invoke(app, ["info", str(run)])
    assert shown.exit_code == 0 and "0.9621" in shown.stderr and "lite0" in shown.stderr
    as_json = CliRunner().invoke(app, ["info", str(run), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["best_val_auc"] == 0.9621


def _rendered(renderable: object, width: int) -> str:
    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text()


def test_the_terminal_table_fits_80_columns_by_leaving_columns_out_never_by_cutting(runs: list[Path]) -> None:
    _evaluated(runs[1], "test", roc_auc=0.9544, roc_auc_ci=[0.9411, 0.9662])
    cells = results_table(read_runs(runs))[TERMINAL_COLUMNS]
    wide = _rendered(terminal_table(runs), 200)
    narrow = _rendered(terminal_table(runs), 80)
    assert "left out" not in wide and "left out at this width:" in narrow
    assert "…" not in narrow and max(len(line.rstrip()) for line in narrow.splitlines()) <= 80
    kept = [c for c in TERMINAL_COLUMNS if c not in narrow.split("left out at this width:")[1]]
    assert {"run", "val AUC", "test AUC"} <= set(kept)
    for column in kept:
        for cell in cells[column]:  # every number whole: an interval may sit on the line under its AUC
            for part in str(cell).split(" ["):
                assert part.strip("]") in narrow, (column, cell)
    for text in (wide, _rendered(terminal_table(runs), 40)):
        assert "…" not in text and "0.9612" in text
