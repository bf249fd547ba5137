"""``histodetect.io``: durable atomic writes, output paths checked before work, leftovers of dead processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from histodetect.errors import UserError
from histodetect.io import (
    atomic_write_bytes,
    check_output_dir,
    check_output_file,
    read_small_file,
    remove_dead_leftovers,
)


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a power cut the target is the old file or the whole new one: never a renamed, empty file."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, b"weights")
    assert target.read_bytes() == b"weights"
    assert len(events) == 3, events
    (synced, temp), renamed, folder = events
    assert synced == "fsync" and Path(temp).parent == tmp_path and Path(temp).name.startswith(".model.safetensors.")
    assert renamed == ("replace", str(target))
    assert folder == ("fsync", str(tmp_path))


def test_output_checks_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.csv").write_text("x\n")
    with pytest.raises(UserError, match=r"--out .*folder: is a folder"):
        check_output_file(tmp_path / "folder")
    with pytest.raises(UserError, match=r"--report .*file.csv/x.json: .*file.csv is a file"):
        check_output_file(tmp_path / "file.csv" / "x.json", "--report")
    with pytest.raises(UserError, match=r"--out .*file.csv: is a file"):
        check_output_dir(tmp_path / "file.csv")
    check_output_file(tmp_path / "file.csv")  # replacing a file is fine
    check_output_file(tmp_path / "new" / "deeper" / "x.csv")
    check_output_dir(tmp_path / "folder")
    check_output_dir(tmp_path / "new")


def test_leftovers_of_dead_processes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    pattern = re.compile(r"\.store\.partial-(?P<pid>\d+)")
    for name in (f".store.partial-{dead_pid}", f".store.partial-{os.getpid()}", f".other.partial-{dead_pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "patches.u8").write_bytes(b"x")
    (tmp_path / f".store.partial-{dead_pid}.txt").write_text("not ours")
    removed = remove_dead_leftovers(tmp_path, pattern)
    assert removed == [tmp_path / f".store.partial-{dead_pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".store.partial-{os.getpid()}", f".other.partial-{dead_pid}", f".store.partial-{dead_pid}.txt"]
    )


def test_check_apart_sees_through_links_and_allows_only_named_places(tmp_path: Path) -> None:
    """The data-loss rule: an output never lands on an input, by any name, nor inside one outside its places."""
    from histodetect.io import check_apart, recognised_by

    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    weights = run / "model.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "alias").symlink_to(weights)
    os.link(weights, tmp_path / "hard")
    for out in (tmp_path / "alias", tmp_path / "hard", weights):
        with pytest.raises(UserError, match="is the input RUN"):
            check_apart(out, {"RUN": [weights]})
    with pytest.raises(UserError, match="inside the input RUN"):
        check_apart(run / "report", {"RUN": run}, folder=True)
    check_apart(run / "evaluation" / "val", {"RUN": run}, folder=True, allowed=[run / "evaluation"])
    mine, theirs = tmp_path / "mine.csv", tmp_path / "theirs.csv"
    mine.write_text("id,label\na,0.5\n")
    theirs.write_text("precious\n")
    check_apart(mine, {}, ours=recognised_by(b"id,label"))
    with pytest.raises(UserError, match="did not write"):
        check_apart(theirs, {}, ours=recognised_by(b"id,label"))
    check_apart(theirs, {}, ours=recognised_by(b"id,label"), overwrite=True)


def test_read_small_file_reads_a_regular_file_within_its_limit_and_names_what_else_it_is(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    assert read_small_file(tmp_path / "a.json", 2) == b"{}"
    with pytest.raises(OSError, match="3 bytes; at most 2"):
        (tmp_path / "b.json").write_bytes(b"{ }")
        read_small_file(tmp_path / "b.json", 2)
    os.mkfifo(tmp_path / "pipe")  # reading it would wait for a writer for good
    (tmp_path / "folder").mkdir()
    for other in ("pipe", "folder"):
        with pytest.raises(OSError, match="not a regular file"):
            read_small_file(tmp_path / other, 2)
