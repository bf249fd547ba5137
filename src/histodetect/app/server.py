"""Run the app on uvicorn: check who could reach it, bind the socket (so a taken port is a one-line error and
port 0 works), then serve until Ctrl-C. Tests use :func:`uvicorn_server` with their own loopback socket.

uvicorn waits for a request's head (its line and headers) without any time limit, and the app only sees a request
once its head is complete, so the head gets its own deadline here (:class:`HeadDeadline`); the body's is
:class:`~histodetect.app.limits.LimitsMiddleware`'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from histodetect.app.main import create_app
from histodetect.app.security import check_exposure, is_loopback, login_url, normal_host
from histodetect.app.settings import Settings
from histodetect.errors import ConfigError

KEEP_ALIVE = 5  # seconds an idle keep-alive connection is held
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")  # the Host a browser sends for a loopback server
IDLE_TIMEOUT = 10.0  # seconds a new connection may send nothing at all (well before the request deadline)


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, with 408 and a closed connection for a client that has not sent a request's head
    within ``head_timeout`` seconds of connecting (or of its previous answer): a client trickling its headers
    would otherwise hold a connection, and a place under ``limit_concurrency``, for ever."""

    head_timeout = 60.0
    idle_timeout = IDLE_TIMEOUT
    per_client = 64
    open_by_client: ClassVar[collections.Counter[str]] = collections.Counter()  # per server: uvicorn_server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer = self.client[0] if self.client else ""
        self.open_by_client[self._peer] += 1
        self._idle = self.loop.call_later(self.idle_timeout, self._silent)
        self._arm()
        if self.open_by_client[self._peer] > self.per_client:  # one client may not take every place
            self._refuse(503, f"more than {self.per_client} connections from one client", "Retry-After: 1\r\n")

    def data_received(self, data: bytes) -> None:
        self._idle.cancel()
        super().data_received(data)

    def _silent(self) -> None:
        """A connection that sent nothing within ``idle_timeout``: closed, so idle sockets cannot fill the server."""
        if not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        self._idle.cancel()
        self.open_by_client[self._peer] -= 1
        if self.open_by_client[self._peer] <= 0:
            del self.open_by_client[self._peer]
        super().connection_lost(exc)

    def _arm(self) -> None:
        if hasattr(self, "_head_timer"):
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expire, self.cycle)

    def _expire(self, armed: Any) -> None:
        """No new request head since the timer was armed (and none in progress): answer 408 and close."""
        if self.cycle is not armed or (armed is not None and not armed.response_complete):
            return
        self._refuse(408, f"the request was not received within {self.head_timeout:g} s")

    def _refuse(self, status: int, error: str, extra: str = "") -> None:
        """Answer ``status`` with ``{"error": ...}`` and close the connection."""
        if not self.transport.is_closing():
            body = json.dumps({"error": error}).encode()
            reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
            head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            self.transport.write(head.encode() + f"\r\n{extra}connection: close\r\n\r\n".encode() + body)
            self.transport.close()


class SignallingServer(uvicorn.Server):
    """uvicorn that sets ``ready`` once its startup is over (listening, or failed): waited on, never polled."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


def uvicorn_server(app: FastAPI, settings: Settings, *, log_level: str = "info") -> SignallingServer:
    """uvicorn with the app's limits: past ``limit_concurrency`` connections it answers 503, and a request head
    not received within ``request_timeout`` is answered 408."""
    # One client may hold all but an eighth of the places, so that /health and others still get in.
    per_client = max(1, settings.limit_concurrency - max(1, settings.limit_concurrency // 8))
    protocol = type(
        "HeadDeadline",
        (HeadDeadline,),
        {
            "head_timeout": settings.request_timeout,
            "idle_timeout": min(IDLE_TIMEOUT, settings.request_timeout),
            "per_client": per_client,
            "open_by_client": collections.Counter(),
        },
    )
    config = uvicorn.Config(
        app,
        http=protocol,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=KEEP_ALIVE,
        log_level=log_level,
        access_log=False,
    )
    return SignallingServer(config)


@contextlib.contextmanager
def serving_in_thread(settings: Settings, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve the app on a free port of ``host`` in a background thread while the block runs; yields its base URL.
    For the demo and the tests: a server that answers a few requests and stops, without a process of its own, and
    without uvicorn's start and stop lines (its warnings and errors still show)."""
    server = uvicorn_server(create_app(settings), settings, log_level="warning")
    sock = bind(host, 0)

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            server.ready.set()  # a failure before startup must not leave the caller waiting

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        server.ready.wait()
        if not server.started:
            raise RuntimeError("the app did not start; see the log above")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be 0..65535 (0 picks a free one)")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (``IPPROTO_TCP``, not the default 0) because asyncio sets
    ``TCP_NODELAY`` only on connections accepted from such a socket; without it every answer, written as head then
    body, waited for the client's delayed ACK: 40 ms added to each request (measured: /health 44 ms, now 2 ms)."""
    check_port(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from exc
    return sock


def loopback_hosts(host: str) -> tuple[str, ...]:
    """The ``Host`` names a browser sends to a server on loopback ``host``: its own, ``localhost`` and
    ``127.0.0.1``, and ``::1`` (``[::1]:PORT``) when it serves on IPv6 loopback or on ``localhost``."""
    names = [*LOOPBACK_HOSTS, normal_host(host)]
    if normal_host(host) in ("::1", "localhost"):
        names.append("::1")
    return tuple(dict.fromkeys(names))


def serve(settings: Settings, *, host: str, port: int, insecure: bool, announce: Callable[[str], None] = print) -> None:
    """Load the model, listen on ``host:port`` and serve until interrupted; ``announce`` gets the address to open
    (with ``?token=`` when there is a token: opening it logs the browser in, as Jupyter's printed URL does)."""
    check_port(port)  # before the model loads
    check_exposure(host, settings.token, insecure=insecure)
    if settings.allowed_hosts is not None and not settings.allowed_hosts:  # every request would be refused
        raise ConfigError("--allowed-hosts names no host; give names, e.g. localhost,example.org, or * for any")
    if settings.allowed_hosts is None and is_loopback(host):
        settings = dataclasses.replace(settings, allowed_hosts=loopback_hosts(host))
    app = create_app(settings)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(login_url(f"http://{shown}:{sock.getsockname()[1]}", settings.token))
    uvicorn_server(app, settings).run(sockets=[sock])
