"""Hostile inputs, class DATA LOSS: every writing command, with its output pointed onto (or into, or around) each
of its inputs, or onto a file it did not make, is refused in one line (exit 2) before any work, and leaves every
input byte-identical and nothing new beside them (``io.check_apart``, called first by each command). Last, a
SILENT ACCEPT of the same inputs: sample submission columns predict does not carry over."""

from __future__ import annotations

import hashlib
import json
import shutil
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
    from histodetect.cli.evaluation import OWN_ONNX, OWN_PAGE, OWN_SUBMISSION, OWN_TABLE

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
