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
import shapely
from PIL import Image
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.errors import InferError
from histodetect.infer.engine import Predictor
from histodetect.infer.lesions import lesions, regions_geojson
from histodetect.infer.slide import score_slide
from histodetect.infer.slide_batch import write_cohort_outputs
from histodetect.report.cohort_page import MAX_HEATMAP_BYTES

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


def finished_folder(out: Path, name: str, score: float = 0.9) -> Path:
    """A finished slide folder as ``slide --annotations`` writes one: one lesion, found by one detection."""
    folder = out / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"slide_score": score, "annotations": "a.xml", "slide_tumour": 1}))
    (folder / "detections.csv").write_text("x,y,probability\n250,250,0.9\n")
    (folder / "lesions.geojson").write_text(json.dumps(regions_geojson(lesions(shapely.box(0, 0, 500, 500), 1.0))))
    return folder


DAMAGE = {
    "detections not CSV": ("detections.csv", b'"unterminated\n\x00\xff', "not a readable CSV"),
    "detections empty": ("detections.csv", b"", "not a readable CSV"),
    "detections another table": ("detections.csv", b"a,b\n1,2\n", "no column x, y, probability"),
    "detections NaN": ("detections.csv", b"x,y,probability\nnan,1,0.5\n", "line 2"),
    "detections text": ("detections.csv", b"x,y,probability\n1,2,high\n", "line 2"),
    "detections over 1": ("detections.csv", b"x,y,probability\n1,2,7\n", "within [0, 1]"),
    "detections missing": ("detections.csv", None, "missing"),
    "lesions not JSON": ("lesions.geojson", b"{not json", "not the lesions slide wrote"),
    "lesions not UTF-8": ("lesions.geojson", b"\xff\xfe{}", "not the lesions slide wrote"),
    "lesions a list": ("lesions.geojson", b"[1, 2]", "not the lesions slide wrote"),
    "lesions features null": ("lesions.geojson", b'{"features": null}', "not the lesions slide wrote"),
    "lesions no properties": ("lesions.geojson", b'{"features": [{"geometry": null}]}', "not the lesions"),
    "lesions deep": ("lesions.geojson", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "lesions a point": (
        "lesions.geojson",
        json.dumps(
            {
                "features": [
                    {
                        "geometry": {"type": "Point", "coordinates": [1, 1]},
                        "properties": {"area_mm2": 1, "longest_axis_um": 1, "itc": False},
                    }
                ]
            }
        ).encode(),
        "not a polygon",
    ),
    "lesions missing": ("lesions.geojson", None, "missing"),
    "lesions a folder": ("lesions.geojson", "dir", "not a regular file"),
    "lesions a FIFO": ("lesions.geojson", "fifo", "not a regular file"),
    "summary a FIFO": ("summary.json", "fifo", "not a regular file"),
    "summary deep": ("summary.json", b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    "score not a number": (
        "summary.json",
        json.dumps({"slide_score": "high", "annotations": "a.xml"}).encode(),
        "is not",
    ),
}


@pytest.mark.parametrize(("file", "content", "says"), list(DAMAGE.values()), ids=list(DAMAGE))
def test_a_damaged_slide_folder_is_a_named_problem_of_the_cohort_not_a_crash(
    tmp_path: Path, file: str, content: bytes | str | None, says: str
) -> None:
    """TRACEBACK before: a damaged detections.csv or lesions.geojson in one finished folder stopped the cohort."""
    finished_folder(tmp_path, "good")
    damaged = finished_folder(tmp_path, "bad", score=0.1) / file
    damaged.unlink()
    if content == "dir":
        damaged.mkdir()
    elif content == "fifo":
        os.mkfifo(damaged)
    elif content is not None:
        damaged.write_bytes(content)
    write_cohort_outputs(tmp_path, {"good": True, "bad": True}, threshold=0.5)
    cohort = json.loads((tmp_path / "cohort.json").read_text())
    assert cohort["slide"]["slides"] == 1 and cohort["lesion"]["found"] == 1
    (problem,) = cohort["problems"]
    assert "left out of the cohort metrics" in problem and file in problem and says in problem, problem
    assert "left out of the cohort metrics" in (tmp_path / "report.html").read_text()


def test_a_heatmap_too_large_to_embed_is_named_on_the_cohort_page(tmp_path: Path) -> None:
    finished_folder(tmp_path, "good")
    with open(tmp_path / "good" / "heatmap.png", "wb") as file:
        file.truncate(MAX_HEATMAP_BYTES + 1)  # sparse: no disk used
    write_cohort_outputs(tmp_path, None, threshold=0.5)
    assert "heatmap.png: not shown" in (tmp_path / "report.html").read_text()


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
