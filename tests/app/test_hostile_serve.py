"""Hostile clients and settings for ``serve``, grouped by the class of failure each caused before: TRACEBACK (a port
out of range, a dropped chunked upload logged as a crash), SILENT ACCEPT (an empty token from the environment, any
Host header, a multi-page TIFF region), AVAILABILITY (idle connections taking every place) and LEAKS (server paths
in /slide's errors)."""

from __future__ import annotations

import io
import logging
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import ClientDisconnect
from typer.testing import CliRunner

from histodetect.app import Settings, create_app
from histodetect.app import server as server_module
from histodetect.app.limits import LimitsMiddleware
from histodetect.cli import app


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=5)


def one_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(app, argv, env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    return str(result.stderr)


# ---------------------------------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_out_of_range_is_one_line(served_run: Path, port: str) -> None:
    assert f"--port {port}: must be 0..65535" in one_line(["serve", str(served_run), "--port", port])


def test_a_client_that_disconnects_is_not_logged_as_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    async def dropped(scope: Any, receive: Any, send: Any) -> None:
        raise ClientDisconnect()  # what Request.stream raises when uvicorn drops a bad chunk

    middleware = LimitsMiddleware(dropped, max_body=100, request_timeout=5)
    with caplog.at_level(logging.ERROR), pytest.raises(Exception):  # noqa: B017 - no answer is sent at all
        TestClient(middleware).post("/predict", content=b"x")
    assert "unexpected error" not in caplog.text


# ---------------------------------------------------------------------------------------------------- silent accepts
def test_an_empty_token_in_the_environment_is_refused_like_an_empty_flag(served_run: Path) -> None:
    says = one_line(["serve", str(served_run)], env={"HISTODETECT_TOKEN": ""})
    assert "HISTODETECT_TOKEN is set but empty" in says


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_as_empty(served_run: Path, host: str) -> None:
    """Before, it was told that other machines could reach the model without a token."""
    assert "--host is empty" in one_line(["serve", str(served_run), "--host", host])


@pytest.mark.parametrize("hosts", ["", ",", " , "])
def test_allowed_hosts_naming_no_host_is_refused(served_run: Path, hosts: str) -> None:
    """Before, the server started and answered every request 400: no Host header could match."""
    assert "--allowed-hosts names no host" in one_line(["serve", str(served_run), "--allowed-hosts", hosts])


def test_the_host_header_is_checked_against_the_served_names(
    settings: Settings, served_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a page of evil.example resolving to 127.0.0.1 must not reach a loopback server."""
    import dataclasses

    guarded = dataclasses.replace(settings, allowed_hosts=("localhost", "127.0.0.1"))
    with TestClient(create_app(guarded), base_url="http://evil.example") as client:
        assert client.get("/health").status_code == 400
    with TestClient(create_app(guarded), base_url="http://localhost:8000") as client:
        assert client.get("/health").status_code == 200
    seen: list[Settings] = []

    class Stop(Exception):
        pass

    def capture(app_settings: Settings) -> None:
        seen.append(app_settings)
        raise Stop

    monkeypatch.setattr(server_module, "create_app", capture)
    with pytest.raises(Stop):
        server_module.serve(settings, host="127.0.0.1", port=0, insecure=False)
    assert seen[0].allowed_hosts is not None and "localhost" in seen[0].allowed_hosts  # the default on loopback


@pytest.mark.parametrize(
    ("served_on", "header", "answered"),
    [
        ("::1", "[::1]:8000", True),
        ("::1", "[::1]", True),
        ("::1", "[0:0::1]:8000", True),
        ("::1", "localhost:8000", True),
        ("localhost", "[::1]:8000", True),
        ("localhost", "LOCALHOST.:8000", True),
        ("127.0.0.1", "127.0.0.1:8000", True),
        ("127.0.0.1", "[::1]:8000", False),  # not what a server on IPv4 loopback is reached by
        ("::1", "[::2]:8000", False),
        ("::1", "[::1]:8000@evil.example", False),
        ("::1", "evil.example:8000", False),
        ("::1", "[::1", False),
        ("::1", "[evil.example]:80", False),
        ("::1", "", False),
    ],
)
def test_ipv6_loopback_host_headers_are_answered_only_where_served(
    settings: Settings, served_on: str, header: str, answered: bool
) -> None:
    """Before, a server on ::1 checked no Host at all (IPv6 Host headers were not parsed), so DNS rebinding reached
    it; and one on localhost refused a browser that asked for http://[::1]:PORT/."""
    import dataclasses

    guarded = dataclasses.replace(settings, allowed_hosts=server_module.loopback_hosts(served_on))
    with TestClient(create_app(guarded)) as client:
        answer = client.get("/health", headers={"host": header})
    assert (answer.status_code == 200) == answered, (answer.status_code, answer.text)
    if not answered:
        assert "is not a name this server answers to" in answer.json()["error"]


def test_a_multi_page_tiff_region_is_refused(client: TestClient) -> None:
    pages = io.BytesIO()
    tifffile.imwrite(pages, np.full((3, 64, 64, 3), 200, np.uint8), photometric="rgb")
    answer = client.post("/slide", files={"file": ("pages.tif", pages.getvalue(), "image/tiff")})
    assert answer.status_code == 400 and "multi-page" in answer.json()["error"]


# ---------------------------------------------------------------------------------------------------- leaks
def test_a_slide_error_names_the_upload_not_the_servers_paths(client: TestClient) -> None:
    glass = io.BytesIO()
    Image.fromarray(np.full((192, 192, 3), 255, np.uint8)).save(glass, format="PNG")
    answer = client.post("/slide", files={"file": ("glass.png", glass.getvalue(), "image/png")})
    error = answer.json()["error"]
    assert answer.status_code == 400 and error.startswith("glass.png: no tissue found"), error
    assert "/tmp" not in error and "histodetect-region" not in error and "--" not in error


# ---------------------------------------------------------------------------------------------------- availability
def test_idle_connections_do_not_take_the_server_down(
    settings: Settings, live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, 65 silent connections made every route, /health included, answer 503 for 60 s."""
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT", 0.5, raising=False)
    with live_server(settings, limit_concurrency=8, request_timeout=30.0) as url:
        idle = [connect(url) for _ in range(7)]  # one client may hold 7 of 8 places
        extra = connect(url)
        assert extra.recv(4096).startswith(b"HTTP/1.1 503")  # the 8th from the same client: refused at once
        extra.close()
        time.sleep(1.5)  # past the idle timeout: the silent ones are closed, well before the request deadline
        assert all(sock.recv(10) == b"" for sock in idle)
        assert httpx.get(f"{url}/health").status_code == 200
        for sock in idle:
            sock.close()
