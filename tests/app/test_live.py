"""A real uvicorn on a free loopback port: slow clients are cut, excess connections get 503, and under load from
many threads with bad requests mixed in every good answer equals predict's and the server stays healthy."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from histodetect.app import Settings
from histodetect.app.server import bind
from histodetect.infer.engine import Predictor

from .conftest import LiveServer


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_status(sock: socket.socket) -> int:
    """The status code of the answer on ``sock`` (b'' once the server has closed it)."""
    head = sock.recv(4096)
    return int(head.split(b" ", 2)[1]) if head else 0


DRIPS = 50  # bytes a slow client sends, one per DRIP seconds: ten times the 1 s deadline under test
DRIP = 0.2


def test_a_client_that_sends_too_slowly_is_cut_off(settings: Settings, live_server: LiveServer) -> None:
    with live_server(settings, request_timeout=1.0) as url:
        sock = connect(url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        sock.settimeout(DRIP)  # the wait for an answer paces the drip
        status = 0
        for _ in range(DRIPS):  # at this pace the body would take 5.5 hours: only a deadline ends it
            try:
                sock.sendall(b"\0")
                status = read_status(sock)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        sock.close()
        assert status == 408
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_trickles_its_headers_is_cut_off(settings: Settings, live_server: LiveServer) -> None:
    with live_server(settings, request_timeout=1.0) as url:
        sock = connect(url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(DRIP)
        answer = b""
        for _ in range(DRIPS):  # one header byte at a time, never the end of the head: only a deadline ends it
            try:
                sock.sendall(b"X")
                answer = sock.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert httpx.get(f"{url}/health").status_code == 200


def test_connections_over_the_limit_get_503_not_a_queue(settings: Settings, live_server: LiveServer) -> None:
    with live_server(settings, limit_concurrency=3, request_timeout=30.0) as url:
        held = []
        for _ in range(2):  # requests in progress whose bodies never come
            held.append(connect(url))
            held[-1].sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
            )
            assert read_status(held[-1]) == 100  # the app is reading its body: the connection is counted
        answer = httpx.get(f"{url}/health")
        assert answer.status_code == 503
        for sock in held:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):  # the server has closed it (and uncounted it, before its socket closed)
                pass
            sock.close()
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_content_length_that_is_not_a_number_is_answered_400(settings: Settings, live_server: LiveServer) -> None:
    with live_server(settings) as url:
        for length in ("²".encode(), b"12abc"):
            sock = connect(url)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\nxx")
            assert read_status(sock) == 400
            sock.close()


def bad_requests(tif: bytes) -> list[dict]:
    grey = io.BytesIO()
    Image.new("L", (96, 96)).save(grey, format="PNG")
    floats = io.BytesIO()
    np.save(floats, np.zeros((2, 96, 96, 3), np.float32))
    return [
        {"content": b"not an image"},
        {"content": grey.getvalue()},
        {"content": floats.getvalue()},
        {"content": tif[: len(tif) // 2]},
        {"files": [("files", ("a.tif", tif, "image/tiff"))] * 3, "headers": {"X-Too-Many": "1"}},
        {"content": b"\0" * 200_000},
    ]


def test_300_requests_from_8_threads_with_bad_ones_mixed_in(
    settings: Settings, live_server: LiveServer, reference: Predictor, patch_files: list[Path]
) -> None:
    images = [path.read_bytes() for path in patch_files]
    expected = reference.predict(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in patch_files]))
    bad = bad_requests(images[0])

    def one(i: int, client: httpx.Client, url: str) -> tuple[int, int, float | None]:
        if i % 5 == 4:  # every fifth request is bad in one of several ways
            answer = client.post(f"{url}/predict", **bad[(i // 5) % len(bad)])
            return i, answer.status_code, None
        k = i % len(images)
        if i % 2:
            answer = client.post(f"{url}/predict", files=[("files", (f"{k}.tif", images[k], "image/tiff"))])
            return i, answer.status_code, answer.json()[0]["probability"] if answer.status_code == 200 else None
        answer = client.post(f"{url}/predict", content=images[k])
        return i, answer.status_code, answer.json()["probabilities"][0] if answer.status_code == 200 else None

    with live_server(settings, max_body=100_000, max_files=2) as url:
        local = threading.local()

        def task(i: int) -> tuple[int, int, float | None]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=60)
            return one(i, local.client, url)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(task, range(300)))
        for i, status, probability in results:
            if i % 5 == 4:
                assert 400 <= status < 500, (i, status)
            else:
                assert status == 200, (i, status)
                assert abs(probability - expected[i % len(images)]) <= 1e-5, i
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_connections_send_at_once_without_waiting_for_acks() -> None:
    """TCP_NODELAY on every accepted connection: otherwise an answer written as head then body waits 40 ms for the
    client's delayed ACK (Nagle)."""

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            writer.close()
            return await asyncio.wait_for(accepted, 10)

    assert asyncio.run(accepted_nodelay()) != 0
