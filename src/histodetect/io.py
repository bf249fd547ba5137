"""Safe outputs: atomic, durable writes; output paths checked before any work; leftovers of dead processes removed;
and small files read back without trusting them.

Every output goes to a temporary name beside its target, is flushed to disk (``fsync``) and only then renamed into
place, and the folder is synced after the rename: an interrupted command never leaves a file that looks
complete, and after a power cut a file is either the old one or the whole new one, never empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from histodetect.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` only if the block succeeds.

    The block writes the file by any means (closing it flushes Python's buffers); the data is then synced
    to disk before the rename, and the folder after it, so the rename is durable too.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        fsync_path(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a folder's data to disk (a folder: the names it holds); a no-op where the system
    cannot open folders (Windows)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes, else an ``OSError`` saying which it is not
    (callers name the file in their own error). Opened without blocking and checked on the open file, so a FIFO
    named like an output one command wrote and another reads back cannot hang the reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file")
        if info.st_size > limit:
            raise OSError(f"{info.st_size:,} bytes; at most {limit:,}")
        with open(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse, before any work, an output file that could not be written: a folder, or a path under a file."""
    path = Path(path)
    _check_kind(path, option)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give the name of a file to write")
    _check_parent(path, option)


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse, before any work, an output folder that could not be made: an existing file, or a path under one."""
    path = Path(path)
    _check_kind(path, option)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file; give a folder to write into")
    _check_parent(path, option)


def check_apart(
    out: str | os.PathLike[str],
    inputs: Mapping[str, Any],
    *,
    option: str = "--out",
    folder: bool = False,
    allowed: Iterable[str | os.PathLike[str]] = (),
    ours: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
) -> None:
    """Refuse, before any work, an output that would change what the command reads or what it did not make.

    Every writing command calls this first (the rule of DEVELOPERS.md): ``out`` may not be, or be inside, any of
    ``inputs`` (a name such as ``RUN`` or ``--config`` -> a path, a list of paths or None), through symlinks and
    hard links; a ``folder`` output may not hold an input either (the command would list, skip or replace it).
    ``allowed`` names folders inside an input where this command does write (``RUN/evaluation``). An existing
    file at ``out`` is replaced only when ``ours(out)`` recognises it as this command's own output, or with the
    command's ``overwrite`` option; likewise a ``folder`` output that exists and holds anything (hidden entries
    aside) is written into only when ``ours(out)`` recognises it as a folder this command made (:func:`holding`),
    so no file of the user's in it is replaced. It also makes the checks of :func:`check_output_dir` /
    :func:`check_output_file`.
    """
    out = Path(out)
    _check_kind(out, option)
    target = _resolve(out, option)
    places = [Path(a).resolve() for a in allowed]
    for name, paths in inputs.items():
        for path in _as_paths(paths):
            _check_kind(path, name)
            source = _resolve(path, name)
            if target == source or _same_file(out, path):
                raise UserError(f"{option} {out}: is the input {name} {path}; writing there would destroy it")
            if target.is_relative_to(source) and not any(target.is_relative_to(p) for p in places):
                raise UserError(f"{option} {out}: is inside the input {name} {path}; choose a path outside it")
            if folder and source.is_relative_to(target):
                raise UserError(f"{option} {out}: holds the input {name} {path}; choose a folder apart from it")
    (check_output_dir if folder else check_output_file)(out, option)
    if ours is None or overwrite:
        return
    if out.is_file() and not ours(out):
        raise UserError(
            f"{option} {out}: an existing file that this command did not write; move it or choose another {option}"
        )
    held = sorted(entry.name for entry in out.iterdir() if not entry.name.startswith(".")) if out.is_dir() else []
    if held and not ours(out):
        listed = ", ".join(repr(name)[1:-1] for name in held[:3]) + (" ..." if len(held) > 3 else "")
        raise UserError(
            f"{option} {out}: an existing folder that this command did not make (it holds {listed}); "
            f"choose a new or empty folder"
        )


def holding(*patterns: str | tuple[str, Callable[[Path], bool]]) -> Callable[[Path], bool]:
    """A recogniser for :func:`check_apart`'s ``ours`` of a folder: it holds a regular file matching one of
    ``patterns`` (globs, e.g. ``*/summary.json``; a ``(glob, recogniser)`` pair also asks the recogniser)."""
    pairs = [(p, None) if isinstance(p, str) else p for p in patterns]

    def check(folder: Path) -> bool:
        return folder.is_dir() and any(
            path.is_file() and (recognise is None or recognise(path))
            for pattern, recognise in pairs
            for path in folder.glob(pattern)
        )

    return check


def recognised_by(marker: bytes, within: int = 0) -> Callable[[Path], bool]:
    """A recogniser for :func:`check_apart`'s ``ours``: the file holds ``marker`` in its first ``within`` bytes
    past the marker's length (0: the file begins with it)."""

    def check(path: Path) -> bool:
        try:
            with open(path, "rb") as file:
                return marker in file.read(len(marker) + within)
        except OSError:
            return False

    return check


def _check_kind(path: Path, name: str) -> None:
    """Refuse a path that is neither absent, a regular file nor a folder: a symbolic link that leads nowhere (a
    loop, or its target gone), a FIFO (reading or writing it would block), a socket or a device."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{name} {path}: a symbolic link that leads nowhere (a loop, or its target is gone)")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise UserError(f"{name} {path}: not a regular file or folder (a FIFO, socket or device)")


def _resolve(path: Path, name: str) -> Path:
    """``path`` with every link followed; a loop further up the path is one line too."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
        raise UserError(f"{name} {path}: cannot be followed ({exc})") from None


def _as_paths(paths: Any) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths if p is not None]


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file (a hard link or a symlink to it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_parent(path: Path, option: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a folder")
            return


def remove_dead_leftovers(folder: str | os.PathLike[str], pattern: re.Pattern[str]) -> list[Path]:
    """Remove the entries of ``folder`` whose whole name matches ``pattern`` and whose ``pid`` group names a
    process that no longer exists: what a killed command left behind. Anything of a live process (or of another
    user's) is left alone, and so is every name the pattern does not match. Returns what was removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is None or _alive(int(match["pid"])):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists; always True on Windows, where signal 0 would not probe but kill."""
    if os.name == "nt" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True
