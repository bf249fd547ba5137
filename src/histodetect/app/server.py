"""Run the app on uvicorn: check who could reach it, bind the socket (so a taken port is a one-line error and
port 0 works), then serve until Ctrl-C. Tests use :func:`uvicorn_server` with their own loopback socket."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from histodetect.app.main import create_app
from histodetect.app.security import check_exposure
from histodetect.app.settings import Settings
from histodetect.errors import ConfigError

KEEP_ALIVE = 5  # seconds an idle keep-alive connection is held


def uvicorn_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
    """uvicorn with the app's connection limit: past ``limit_concurrency`` connections it answers 503."""
    config = uvicorn.Config(
        app,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=KEEP_ALIVE,
        log_level="info",
        access_log=False,
    )
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from exc
    return sock


def serve(settings: Settings, *, host: str, port: int, insecure: bool, announce: Callable[[str], None] = print) -> None:
    """Load the model, listen on ``host:port`` and serve until interrupted."""
    check_exposure(host, settings.token, insecure=insecure)
    app = create_app(settings)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(f"http://{shown}:{sock.getsockname()[1]}")
    uvicorn_server(app, settings).run(sockets=[sock])
