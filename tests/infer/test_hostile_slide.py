"""Hostile inputs to ``slide``, grouped by the class of failure each caused before: TRACEBACK (now one line naming
the flag or file), SILENT ACCEPT (a bad slide skipped or a glass slide called negative) and LEFTOVERS (a refused
command made OUT/ first, or announced a table it never wrote)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor
from histodetect.infer.slide import score_slide

pytestmark = pytest.mark.slow  # every test trains a run or scores a slide with one (seconds each on 2 cores)

MakeSlide = Callable[..., Path]


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, mosaic) -> Path:
    """The mosaic as a PNG region (a plain image at the model's scale): the cheapest slide to score."""
    path = tmp_path_factory.mktemp("region") / "region.png"
    Image.fromarray(mosaic.image).save(path)
    return path


def invoke(*argv: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in argv])
    return result.exit_code, str(result.stderr)


def one_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert stderr.startswith("error:") and stderr.count("\n") == 1, stderr
    return stderr


# ---------------------------------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--slide-mpp", "nan", "--slide-mpp nan: must be"),
        ("--slide-mpp", "1e-7", "--slide-mpp 1e-07: must be"),
        ("--workers", "-1", "--workers -1: must be"),
        ("--min-tissue", "2", "--min-tissue 2.0"),
        ("--shard", "3/2", "--shard 3/2"),
        ("--mask", "missing.geojson", "--mask missing.geojson: no such file"),
    ],
)
def test_a_bad_flag_is_one_line_before_the_model_loads_or_out_is_made(
    tmp_path: Path, region: Path, flag: str, value: str, says: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: baseline-cnn\n")  # no weights: loading the model would fail first
    out = tmp_path / "out"
    assert says in one_line(*invoke("slide", run, region, "--out", out, flag, value))
    assert not out.exists()


def test_a_run_trained_at_nan_microns_is_one_line(tmp_path: Path, region: Path, baseline_run: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "store.json"):
        (run / name).write_bytes((baseline_run / name).read_bytes())
    (run / "config.yaml").write_text((baseline_run / "config.yaml").read_text().replace("mpp: 0.972", "mpp: .nan"))
    assert "mpp must be a finite number" in one_line(*invoke("slide", run, region, "--out", tmp_path / "out"))


def test_a_slide_named_like_the_table_is_one_line(tmp_path: Path, region: Path, baseline_run: Path) -> None:
    slide = tmp_path / "slides.csv.png"
    slide.write_bytes(region.read_bytes())
    assert "would take the place of the table" in one_line(
        *invoke("slide", baseline_run, slide, "--out", tmp_path / "o")
    )


def test_a_foreign_summary_in_out_is_listed_as_an_error_not_a_traceback(
    tmp_path: Path, region: Path, baseline_run: Path
) -> None:
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "summary.json").write_text("not json {")
    code, stderr = invoke("slide", baseline_run, region, "--out", out, "--workers", "0")
    assert code == 0, stderr
    table = pd.read_csv(out / "slides.csv")
    assert set(table["name"]) == {"region", "notes"}
    assert "not a slide's summary" in table.set_index("name").loc["notes", "error"]


# ---------------------------------------------------------------------------------------------------- silent accepts
def test_a_fifo_named_as_a_slide_in_a_folder_is_reported_not_skipped(
    tmp_path: Path, region: Path, baseline_run: Path
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "region.png").write_bytes(region.read_bytes())
    os.mkfifo(folder / "pipe.svs")
    (folder / "loop.svs").symlink_to(folder / "loop.svs")
    code, stderr = invoke("slide", baseline_run, folder, "--out", tmp_path / "out", "--workers", "0")
    assert code == 2 and "not a regular file" in stderr and "leads nowhere" in stderr, stderr
    assert "1 of 3 slides done" in stderr


@pytest.mark.parametrize("value", [255, 0], ids=["white", "black"])
def test_a_slide_without_tissue_says_so(tmp_path: Path, baseline_run: Path, value: int) -> None:
    predictor = Predictor([baseline_run], precision="fp32", progress=False)
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), value, np.uint8)).save(path)
    with pytest.raises(InferError, match="no tissue found"):
        score_slide(predictor, path, tmp_path / "out", workers=0)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- leftovers
def test_a_shard_with_nothing_to_do_says_so_and_writes_nothing(
    tmp_path: Path, region: Path, baseline_run: Path
) -> None:
    code, stderr = invoke("slide", baseline_run, region, "--out", tmp_path / "out", "--shard", "1/2")
    assert code == 0 and "nothing to do" in stderr and "slides.csv" not in stderr, stderr
    assert not (tmp_path / "out" / "slides.csv").exists()


def test_out_onto_a_summary_file_says_what_is_wrong(tmp_path: Path, region: Path, baseline_run: Path) -> None:
    out = tmp_path / "summary.json"
    out.write_text(json.dumps({}))
    assert "is a file" in one_line(*invoke("slide", baseline_run, region, "--out", out))


READER = """
import os, sys, time
from torch.utils.data import DataLoader, Dataset
from histodetect.infer.slide import die_with_parent

class Slow(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)
        return i

for _ in DataLoader(Slow(), num_workers=1, batch_size=None, worker_init_fn=die_with_parent):
    pass
"""


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (dead, waiting for whoever adopted it to reap it)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_reader_worker_dies_with_its_killed_parent(tmp_path: Path) -> None:
    """Before, kill -9 on slide left its reader worker running (parent gone, ~620 MB resident, minutes later)."""
    pid_file = tmp_path / "worker.pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", READER, str(pid_file)], env=env)
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    exited = os.pidfd_open(worker)  # readable once the worker has exited: an event, not a poll
    parent.kill()
    parent.wait()
    ended, _, _ = select.select([exited], [], [], 60)
    os.close(exited)
    alive = not ended and running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the reader outlived its parent"
