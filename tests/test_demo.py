"""The whole tool end to end, as `make demo` runs it (with fewer epochs), and the command line's surface."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.demo import MARKER, run_demo
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


def test_demo_makes_every_output_and_a_submission_in_the_sample_order(tmp_path: Path) -> None:
    outputs = run_demo(tmp_path / "demo", quick=True)
    for key in ("store", "eda", "comparison", "explain", "onnx", "submission"):
        assert Path(outputs[key]).exists(), key
    submission = pd.read_csv(outputs["submission"])
    expected = pd.read_csv(sample_dir() / "sample_submission.csv")
    assert submission["id"].tolist() == expected["id"].tolist()
    assert submission["label"].between(0, 1).all()
    assert "baseline-cnn" in Path(outputs["comparison"]).read_text()
    run_demo(tmp_path / "demo", quick=True)  # a previous demo's folder is replaced


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "mine.txt").exists() and not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_python_dash_m_works() -> None:
    done = subprocess.run([sys.executable, "-m", "histodetect", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("histodetect ")
