"""The command as a whole: every command's help renders, and asking for it loads none of the heavy libraries the
commands import only when they run (so ``--help`` stays instant)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from histodetect.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
HEAVY = ("torch", "torchvision", "timm", "lightning", "matplotlib", "optuna", "onnxruntime", "fastapi", "openslide")
ASK_FOR_HELP = f"""
import sys
from histodetect.cli import app
for command in {COMMANDS!r}:
    try:
        app([command, "--help"], prog_name="histodetect")
    except SystemExit:
        pass
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str) -> None:
    done = CliRunner().invoke(app, [command, "--help"])
    assert done.exit_code == 0, done.output
    assert f"histodetect {command}" in done.output


def test_help_loads_no_heavy_library() -> None:
    done = subprocess.run([sys.executable, "-c", ASK_FOR_HELP], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]
