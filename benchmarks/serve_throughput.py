"""Web app throughput under many clients: micro-batching on vs off, against the same app in the same run.

    python benchmarks/serve_throughput.py [--duration 30] [--clients 16] [--run RUN]

For each mode a server (the app of ``histodetect serve``, uvicorn, fp32, in its own process so the clients do not
share its interpreter) serves ``--run`` (default: ``tf_efficientnet_lite0`` with its ImageNet weights at 96 px,
written as a run folder in a temporary directory). ``--clients`` threads each post one real patch per request
(multipart ``files``) for ``--duration`` seconds:

- batched: the app as it ships, gathering the patches of requests that arrive within a few ms into one model call;
- unbatched: the same app with micro-batching off, one request scored at a time (as the old server scored);
- single client: one client alone against the batched server, for the latency a lone user sees.

Prints one JSON object: images/s and p50/p95 latency of each, the ratio of images/s (target >= 3) and the batched
p95 over the single client's (target <= 2).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from histodetect.sample import sample_dir

MODEL = "tf_efficientnet_lite0"
TARGET_RATIO = 3.0
TARGET_P95 = 2.0


def make_run(folder: Path) -> Path:
    """A run folder (config + safetensors) holding ``MODEL`` with its pretrained weights: no training needed to
    measure serving."""
    from safetensors.torch import save_file

    from histodetect.models import create_model
    from histodetect.runs.config import TrainConfig
    from histodetect.runs.layout import CONFIG, WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    TrainConfig(model=MODEL, pretrained="auto").save(folder / CONFIG)
    model = create_model(MODEL, pretrained="auto")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    return folder


def serve(run: Path, port: int, batching: bool, precision: str) -> None:
    """The server process: the app on uvicorn, as ``histodetect serve`` starts it, with batching on or off."""
    from histodetect.app import Settings, create_app
    from histodetect.app.server import bind, uvicorn_server

    settings = Settings((run,), precision=precision, batching=batching, limit_concurrency=256)
    sock = bind("127.0.0.1", port)
    server = uvicorn_server(create_app(settings), settings)
    server.run(sockets=[sock])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, batching: bool, precision: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", str(run), "--port", str(port), "--precision", precision]
    process = subprocess.Popen([*command, *([] if batching else ["--no-batching"])])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def load(url: str, clients: int, duration: float, patches: list[bytes]) -> dict[str, Any]:
    """``clients`` threads posting one patch per request for ``duration`` seconds: images/s and latencies."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.monotonic() + duration

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            k = i
            while time.monotonic() < stop:
                body = patches[k % len(patches)]
                started = time.perf_counter()
                answer = http.post(f"{url}/predict", files=[("files", ("p.tif", body, "image/tiff"))])
                if answer.status_code == 200:
                    latencies[i].append(time.perf_counter() - started)
                else:
                    errors[i] += 1
                k += clients

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    flat = np.array([x for per_client in latencies for x in per_client])
    return {
        "clients": clients,
        "requests": len(flat),
        "errors": sum(errors),
        "images_per_s": round(len(flat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(flat, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(flat, 95)) * 1000, 1),
    }


def measure(run: Path, batching: bool, args: argparse.Namespace, patches: list[bytes]) -> dict[str, Any]:
    process, url = start_server(run, batching, args.precision)
    try:
        load(url, args.clients, min(3.0, args.duration), patches)  # warm-up
        result = {"many": load(url, args.clients, args.duration, patches)}
        if batching:
            result["single"] = load(url, 1, max(3.0, args.duration / 3), patches)
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per mode")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--run", type=Path, help=f"run folder to serve (default: {MODEL}, ImageNet weights)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, not args.no_batching, args.precision)
        return
    patches = [path.read_bytes() for path in sorted((sample_dir() / "test").glob("*.tif"))]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(Path(tmp) / MODEL)
        batched = measure(run, True, args, patches)
        unbatched = measure(run, False, args, patches)
    ratio = batched["many"]["images_per_s"] / unbatched["many"]["images_per_s"]
    p95_over_single = batched["many"]["p95_ms"] / batched["single"]["p95_ms"]
    result = {
        "model": args.run.name if args.run else MODEL,
        "precision": args.precision,
        "duration_s": args.duration,
        "batched": batched["many"],
        "unbatched": unbatched["many"],
        "single_client": batched["single"],
        "images_per_s_ratio": round(ratio, 2),
        "batched_p95_over_single_p95": round(p95_over_single, 2),
        "target": {"ratio": TARGET_RATIO, "p95_over_single": TARGET_P95},
        "met": ratio >= TARGET_RATIO and p95_over_single <= TARGET_P95,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
