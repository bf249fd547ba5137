"""The whole tool end to end, as `make demo` runs it (with fewer epochs), and the command line's surface."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.demo import MARKER, _prepare, outputs_table, run_demo
from histodetect.sample import sample_dir

COMMANDS = [
    "ingest",
    "info",
    "eda",
    "train",
    "tune",
    "evaluate",
    "compare",
    "predict",
    "slide",
    "extract",
    "serve",
    "explain",
    "export",
    "demo",
]


@pytest.mark.slow
def test_demo_makes_every_output_and_a_submission_in_the_sample_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = run_demo(tmp_path / "demo", quick=True)
    for key in ("store", "eda", "comparison", "explain", "onnx", "submission", "slide"):
        assert Path(outputs[key]).exists(), key
    for name in ("heatmap.png", "tumour.geojson", "lesions.csv"):
        assert (outputs["slide"] / name).is_file(), name
    slide = json.loads((outputs["slide"] / "summary.json").read_text())
    assert slide["cells_scored"] > 0 and slide["lesions"] >= 1 and slide["annotations"]
    assert json.loads((outputs["slide"] / "tumour.geojson").read_text())["type"] == "FeatureCollection"
    shown = capsys.readouterr().err
    assert "/health: ok" in shown and "P(tumour)" in shown and "histodetect serve" in shown
    assert "…" not in shown  # every table and line fits the 80 columns of a captured stream
    submission = pd.read_csv(outputs["submission"])
    expected = pd.read_csv(sample_dir() / "sample_submission.csv")
    assert submission["id"].tolist() == expected["id"].tolist()
    assert submission["label"].between(0, 1).all()
    assert "baseline-cnn" in Path(outputs["comparison"]).read_text()
    _prepare(tmp_path / "demo")  # a previous demo's folder is replaced (as the next run_demo starts)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [MARKER]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "mine.txt").exists() and not (tmp_path / MARKER).exists()


def test_the_outputs_table_folds_long_paths_at_80_columns(tmp_path: Path) -> None:
    where = tmp_path / ("a-long-folder-name-" * 4) / "runs" / "efficientnet-lite0"
    console = Console(record=True, width=80)
    console.print(outputs_table({"run efficientnet-lite0": where}, 61.0))
    text = console.export_text()
    assert "…" not in text and str(where) in "".join(line.strip(" │") for line in text.splitlines()[3:-1])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_python_dash_m_works() -> None:
    done = subprocess.run([sys.executable, "-m", "histodetect", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("histodetect ")
