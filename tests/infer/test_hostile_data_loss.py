"""Hostile inputs, class DATA LOSS: every writing command, with its output pointed onto (or into, or around) each
of its inputs, or onto a file it did not make, is refused in one line (exit 2) before any work, and leaves every
input byte-identical and nothing new beside them (``io.check_apart``, called first by each command); an existing
folder --out is written into only when the command made it. Then TRACEBACKS and HANGS of the same inputs: a FIFO or
a symbolic link loop as an input or an output, and counts and seeds out of range. Last, a SILENT ACCEPT: sample
submission columns predict does not carry over."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from histodetect.cli import app
from histodetect.data.store import Store

QUICK = ["--epochs", "1", "--limit-train", "16", "--num-workers", "0", "--batch-size", "8"]
ANNOTATIONS = {"type": "FeatureCollection", "features": []}


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    baseline_run: Path,
    sample_store: Store,
    exported: Callable[[str], dict[str, Any]],
    sample_dir: Path,
    mosaic: Any,
    make_slide: Callable[..., Path],
) -> Path:
    """Copies of every kind of input in one folder, so that a command that does write cannot harm the session's."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(baseline_run, root / "run")
    shutil.copytree(sample_store.path, root / "store")
    shutil.copy(exported("baseline-cnn")["path"], root / "model.onnx")
    shutil.copytree(sample_dir / "test", root / "test")
    shutil.copy(sample_dir / "sample_submission.csv", root / "sample.csv")
    shutil.copy(sample_dir / "train_labels.csv", root / "labels.csv")
    shutil.copy(root / "run" / "config.yaml", root / "config.yaml")
    make_slide(root / "slide.tif", mosaic.image, 0.972, levels=1)
    (root / "marks.geojson").write_text(json.dumps(ANNOTATIONS))
    (root / "notes.txt").write_text("the user's own notes\n")
    (root / "notes.md").write_text("# the user's own notes\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` and the SHA-256 of each file: equal before and after means nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def image(world: Path) -> str:
    return str(sorted((world / "test").glob("*.tif"))[0])


# (case id, arguments with {W} for the world folder and {IMG} for one test image, what the error must say)
CASES = [
    ("predict onto the run's config", "predict {W}/run {W}/test --out {W}/run/config.yaml", "inside the input RUN"),
    ("predict onto the weights", "predict {W}/run {W}/test --out {W}/run/model.safetensors", "inside the input RUN"),
    ("predict onto the store index", "predict {W}/run {W}/store --out {W}/store/index.csv", "inside the input SOURCE"),
    ("predict onto the image", "predict {W}/run {IMG} --out {IMG}", "is the input SOURCE"),
    ("predict into the source folder", "predict {W}/run {W}/test --out {IMG}", "inside the input SOURCE"),
    (
        "predict onto the sample submission",
        "predict {W}/run {W}/test --sample-submission {W}/sample.csv --out {W}/sample.csv",
        "is the input --sample-submission",
    ),
    ("predict onto the onnx model", "predict {W}/model.onnx {W}/test --out {W}/model.onnx", "is the input RUN"),
    ("predict onto a file it did not make", "predict {W}/run {W}/test --out {W}/notes.txt", "did not write"),
    ("compare onto the run summary", "compare {W}/run --out {W}/run/summary.json", "inside the input RUN"),
    ("compare onto a file it did not make", "compare {W}/run --out {W}/notes.md", "did not write"),
    ("evaluate into the run", "evaluate {W}/run {W}/store --out {W}/run", "is the input RUN"),
    ("evaluate into the run's checkpoints", "evaluate {W}/run {W}/store --out {W}/run/checkpoints", "inside"),
    ("evaluate into the store", "evaluate {W}/run {W}/store --out {W}/store/report", "inside the input STORE"),
    ("train into the store", "train {W}/store --out {W}/store " + " ".join(QUICK), "is the input STORE"),
    ("train around its inputs", "train {W}/store --out {W} " + " ".join(QUICK), "holds the input STORE"),
    (
        "train onto its config",
        "train {W}/store --config {W}/config.yaml --out {W}/config.yaml " + " ".join(QUICK),
        "is the input --config",
    ),
    (
        "tune into the store",
        "tune {W}/store --out {W}/store/tuning --trials 1 --epochs 1 --limit-train 16",
        "inside the input STORE",
    ),
    ("eda into the store", "eda {W}/store --out {W}/store", "is the input STORE"),
    ("eda inside the store", "eda {W}/store --out {W}/store/eda", "inside the input STORE"),
    ("slide around the runs", "slide {W}/run {W}/slide.tif --out {W} --workers 0", "holds the input RUN"),
    ("slide into the run", "slide {W}/run {W}/slide.tif --out {W}/run/slides --workers 0", "inside the input RUN"),
    ("slide onto the slide", "slide {W}/run {W}/slide.tif --out {W}/slide.tif --workers 0", "is the input SLIDE"),
    (
        "slide onto the annotations",
        "slide {W}/run {W}/slide.tif --annotations {W}/marks.geojson --out {W}/marks.geojson --workers 0",
        "is the input --annotations",
    ),
    ("explain into the run", "explain {W}/run {IMG} --out {W}/run/explain", "inside the input RUN"),
    ("explain around the images", "explain {W}/run {IMG} --out {W}/test", "holds the input IMAGES"),
    ("export onto the weights", "export {W}/run --out {W}/run/model.safetensors", "inside the input RUN"),
    ("export into the check store", "export {W}/run --check {W}/store --out {W}/store/m.onnx", "inside the input"),
    ("export onto a file it did not make", "export {W}/run --out {W}/notes.txt", "did not write"),
    ("extract onto the slide", "extract {W}/slide.tif --out {W}/slide.tif", "is the input SLIDE"),
    (
        "extract into the hard-negatives run",
        "extract {W}/slide.tif --hard-negatives {W}/run --out {W}/run/store",
        "inside the input --hard-negatives",
    ),
    ("extract around the slides", "extract {W}/slide.tif --out {W}", "holds the input SLIDE"),
    (
        "ingest's report onto its labels",
        "ingest {W}/test --labels {W}/labels.csv --out {W}/new-store --report {W}/labels.csv",
        "is the input --labels",
    ),
    ("ingest's report onto a file it did not make", "ingest {W}/test --out {W}/s --report {W}/notes.txt", "did not"),
]


@pytest.mark.parametrize(("args", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_output_onto_an_input_is_refused_and_changes_nothing(world: Path, args: str, says: str) -> None:
    before = snapshot(world)
    argv = args.replace("{IMG}", image(world)).replace("{W}", str(world)).split()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --") and result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr, result.stderr
    assert snapshot(world) == before


def test_every_writing_command_is_walked() -> None:
    """A new command that writes must join the walk above."""
    walked = {case[1].split()[0] for case in CASES}
    writing = {c.name or c.callback.__name__ for c in app.registered_commands} - {"info", "serve", "demo"}
    assert writing == walked, writing ^ walked


def test_a_command_may_still_replace_its_own_output(world: Path, tmp_path: Path) -> None:
    """The rule refuses only what the command did not make: a re-run writes over its own submission, table, page
    and model."""
    from histodetect.cli.common import OWN_ONNX, OWN_PAGE, OWN_SUBMISSION, OWN_TABLE

    runner = CliRunner()
    for _ in range(2):  # the second time over the first one's files
        table = runner.invoke(app, ["compare", str(world / "run"), "--out", str(tmp_path / "t.md")])
        assert table.exit_code == 0, table.output
        submission = runner.invoke(
            app, ["predict", str(world / "run"), image(world), "--out", str(tmp_path / "s.csv"), "--precision", "fp32"]
        )
        assert submission.exit_code == 0, submission.output
    assert OWN_TABLE(tmp_path / "t.md") and OWN_PAGE(tmp_path / "t.html") and OWN_SUBMISSION(tmp_path / "s.csv")
    assert OWN_ONNX(world / "model.onnx") and not OWN_ONNX(world / "notes.txt")


# (case id, arguments with {D} for a folder of the user's holding a file of the name the command writes, that file)
FOLDER_CASES = [
    ("eda", "eda {W}/store --out {D}", "index.html"),
    ("train", "train {W}/store --out {D} " + " ".join(QUICK), "metrics.csv"),
    ("tune", "tune {W}/store --out {D} --trials 1 --epochs 1 --limit-train 16", "trials.csv"),
    ("evaluate", "evaluate {W}/run {W}/store --out {D}", "metrics.json"),
    ("slide", "slide {W}/run {W}/slide.tif --out {D} --workers 0", "slides.csv"),
    ("slide, a same-named slide folder", "slide {W}/run {W}/slide.tif --out {D} --workers 0", "slide/heatmap.png"),
    ("explain", "explain {W}/run {IMG} --out {D}", "grid.png"),
]


@pytest.mark.parametrize(("args", "name"), [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_an_existing_folder_the_command_did_not_make_is_refused(
    world: Path, tmp_path: Path, args: str, name: str
) -> None:
    """DATA LOSS before: an existing --out folder was written into file by file, over the user's file of a name the
    command writes. A folder --out that exists must now be empty or the command's own."""
    desk = tmp_path / "desk"
    (desk / name).parent.mkdir(parents=True)
    (desk / name).write_text("the user's own file\n")
    before = snapshot(tmp_path)
    argv = args.replace("{IMG}", image(world)).replace("{W}", str(world)).replace("{D}", str(desk)).split()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "an existing folder that this command did not make" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert snapshot(tmp_path) == before


def test_a_folder_output_of_the_command_itself_is_recognised(world: Path, tmp_path: Path) -> None:
    """The rule refuses only what the command did not make: eda and explain write again into their own folder,
    and hidden entries (a killed run's leftovers, .DS_Store) do not make a folder foreign."""
    (tmp_path / "eda").mkdir()
    (tmp_path / "eda" / ".DS_Store").write_text("")
    for _ in range(2):
        for args in (
            ["eda", str(world / "store"), "--out", str(tmp_path / "eda")],
            ["explain", str(world / "run"), image(world), "--out", str(tmp_path / "explain")],
        ):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------- tracebacks, hangs
# (case id, arguments with {W}, {IMG}, {F} for a FIFO and {L} for a symlink loop, what the error must say)
PATH_CASES = [
    ("predict from a FIFO", "predict {W}/run {F} --out {T}/s.csv", "SOURCE {F}: not a regular file or folder"),
    ("predict from a loop", "predict {W}/run {L} --out {T}/s.csv", "SOURCE {L}: a symbolic link that leads nowhere"),
    ("predict onto a FIFO", "predict {W}/run {IMG} --out {F}", "--out {F}: not a regular file or folder"),
    ("predict onto a loop", "predict {W}/run {IMG} --out {L}", "--out {L}: a symbolic link that leads nowhere"),
    ("sample submission a FIFO", "predict {W}/run {IMG} --sample-submission {F} --out {T}/s.csv", "a FIFO"),
    ("compare onto a FIFO", "compare {W}/run --out {F}", "--out {F}: not a regular file or folder"),
    ("explain a FIFO", "explain {W}/run {F} --out {T}/x", "IMAGES {F}: not a regular file or folder"),
    ("train with a FIFO config", "train {W}/store --config {F} --out {T}/r", "--config {F}: not a regular file"),
    ("ingest a FIFO", "ingest {F} --out {T}/s", "{F}: not a regular file or folder"),
    ("explain --limit too many", "explain {W}/run {W}/store --limit 100000000000 --out {T}/x", "must be 1..256"),
    ("eda --seed -1", "eda {W}/store --seed -1 --out {T}/e", "--seed -1: must be 0 or more"),
    ("ingest --workers 100000", "ingest {W}/test --out {T}/s --workers 100000", "must be 1..64"),
    ("extract --workers -1", "extract {W}/slide.tif --out {T}/s --workers -1", "--workers -1: must be 0..64"),
    ("demo onto a FIFO", "demo --out {F}", "--out {F}: not a regular file or folder"),
    ("predict a non-UTF-8 name", "predict {W}/run {N}.tif --out {T}/s.csv", "not UTF-8 text"),
    ("slide a non-UTF-8 name", "slide {W}/run {N}.tif --out {T}/o --workers 0", "not UTF-8 text in the slide's name"),
]


@pytest.mark.parametrize(("args", "says"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
def test_a_path_that_is_no_file_or_a_number_out_of_range_is_one_line(
    world: Path, tmp_path: Path, args: str, says: str
) -> None:
    """TRACEBACK before (NotADirectoryError, RuntimeError 'Symlink loop', numpy's seed ValueError, a file name that
    is not UTF-8 reaching the CSV writer or matplotlib), HANG (explain
    drew a figure per patch of the whole store), or DATA LOSS (an output replaced a FIFO someone reads)."""
    fifo, loop = tmp_path / "pipe", tmp_path / "loop"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    named = tmp_path / "names" / os.fsdecode(b"latin1-\xe9")  # bytes that are not UTF-8: a surrogate escape
    named.parent.mkdir()
    shutil.copy(image(world), f"{named}.tif")
    values = {"{IMG}": image(world), "{W}": str(world), "{F}": str(fifo), "{L}": str(loop), "{T}": str(tmp_path)}
    values["{N}"] = str(named)
    for key, value in values.items():
        args, says = args.replace(key, value), says.replace(key, value)
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr, result.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and loop.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "names", "pipe"]  # nothing made


# ---------------------------------------------------------------------------------------------------- silent accepts
def test_predict_mentions_sample_submission_columns_it_does_not_read(world: Path, tmp_path: Path) -> None:
    """SILENT ACCEPT before: an extra column of the sample submission vanished from the submission without a word."""
    sample = tmp_path / "sample.csv"
    lines = (world / "sample.csv").read_text().splitlines()
    sample.write_text("\n".join([lines[0] + ",site", *(f"{line},a" for line in lines[1:])]) + "\n")
    args = ["predict", str(world / "run"), str(world / "test"), "--sample-submission", str(sample)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s.csv"), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "column(s) 'site' of sample.csv are not read" in result.stderr
