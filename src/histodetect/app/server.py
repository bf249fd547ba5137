"""Run the app on uvicorn: check who could reach it, bind the socket (so a taken port is a one-line error and
port 0 works), then serve until Ctrl-C. Tests use :func:`uvicorn_server` with their own loopback socket.

uvicorn waits for a request's head (its line and headers) without any time limit, and the app only sees a request
once its head is complete, so the head gets its own deadline here (:class:`HeadDeadline`); the body's is
:class:`~histodetect.app.limits.LimitsMiddleware`'s.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from histodetect.app.main import create_app
from histodetect.app.security import check_exposure, login_url
from histodetect.app.settings import Settings
from histodetect.errors import ConfigError

KEEP_ALIVE = 5  # seconds an idle keep-alive connection is held


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, with 408 and a closed connection for a client that has not sent a request's head
    within ``head_timeout`` seconds of connecting (or of its previous answer): a client trickling its headers
    would otherwise hold a connection, and a place under ``limit_concurrency``, for ever."""

    head_timeout = 60.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if hasattr(self, "_head_timer"):
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expire, self.cycle)

    def _expire(self, armed: Any) -> None:
        """No new request head since the timer was armed (and none in progress): answer 408 and close."""
        if self.cycle is not armed or (armed is not None and not armed.response_complete):
            return
        if not self.transport.is_closing():
            body = json.dumps({"error": f"the request was not received within {self.head_timeout:g} s"}).encode()
            head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            self.transport.write(head.encode() + b"\r\nconnection: close\r\n\r\n" + body)
            self.transport.close()


def uvicorn_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
    """uvicorn with the app's limits: past ``limit_concurrency`` connections it answers 503, and a request head
    not received within ``request_timeout`` is answered 408."""
    protocol = type("HeadDeadline", (HeadDeadline,), {"head_timeout": settings.request_timeout})
    config = uvicorn.Config(
        app,
        http=protocol,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=KEEP_ALIVE,
        log_level="info",
        access_log=False,
    )
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (``IPPROTO_TCP``, not the default 0) because asyncio sets
    ``TCP_NODELAY`` only on connections accepted from such a socket; without it every answer, written as head then
    body, waited for the client's delayed ACK: 40 ms added to each request (measured: /health 44 ms, now 2 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from exc
    return sock


def serve(settings: Settings, *, host: str, port: int, insecure: bool, announce: Callable[[str], None] = print) -> None:
    """Load the model, listen on ``host:port`` and serve until interrupted; ``announce`` gets the address to open
    (with ``?token=`` when there is a token: opening it logs the browser in, as Jupyter's printed URL does)."""
    check_exposure(host, settings.token, insecure=insecure)
    app = create_app(settings)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(login_url(f"http://{shown}:{sock.getsockname()[1]}", settings.token))
    uvicorn_server(app, settings).run(sockets=[sock])
