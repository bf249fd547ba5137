"""``postgres_url``: a real PostgreSQL server for the distributed-tuning test, started and stopped here.

It uses Debian's server binaries (``/usr/lib/postgresql/*/bin``; ``.ci/run`` installs ``postgresql`` when it is
missing): ``initdb`` into a temporary folder, a free loopback port, trust authentication, one database. initdb
refuses to run as root, so as root the server runs as the ``postgres`` user in a folder it owns. The test skips,
saying why, only where no server binary exists.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@pytest.fixture
def postgres_url(free_port: Callable[[], int]) -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/histodetect``, as a user would write it."""
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binary (initdb) in /usr/lib/postgresql/*/bin or on PATH")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
    folder = Path(tempfile.mkdtemp(prefix="histodetect-pg-"))
    if as_root:
        os.chown(folder, owner.pw_uid, owner.pw_gid)

    def run(*args: str) -> None:
        command = [str(bindir / args[0]), *args[1:]]
        subprocess.run(["runuser", "-u", "postgres", "--", *command] if as_root else command, check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    port = free_port()
    data = folder / "data"
    run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "histodetect")
        yield f"postgresql://postgres@127.0.0.1:{port}/histodetect"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
