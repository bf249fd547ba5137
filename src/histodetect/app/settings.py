"""What one server is: the model it loads and every limit it enforces, in one frozen object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from histodetect.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """``runs``: run folders or ``.onnx`` files (several: their mean), as ``predict`` takes them.

    The limits bound what one request may cost: ``max_body`` bytes (a larger body is refused before it is read),
    ``max_files`` files in one form, ``max_patches`` patches in one ``.npy``, ``max_region_pixels`` in a region
    image (checked from its header, before decoding), ``request_timeout`` seconds to receive a whole request (a
    client that sends more slowly is cut off), ``limit_concurrency`` connections before uvicorn answers 503, and
    ``queue_size`` requests waiting for the model before the app answers 503.

    ``batching``: score the patches of every request waiting for the model (up to ``max_batch``) in one call,
    waiting up to ``batch_window_ms`` for requests still being received; off, each request is scored by itself
    (the benchmark's baseline).
    """

    runs: tuple[Path, ...]
    tta: str = "none"
    precision: str = "fp32"
    engine: str = "auto"  # infer.engine.ENGINES
    threshold: float = 0.5
    token: str | None = None
    device: str = "auto"
    batching: bool = True
    batch_window_ms: float = 5.0
    max_batch: int = 64
    queue_size: int = 256
    max_body: int = 64 * 2**20
    max_files: int = 64
    max_patches: int = 2048
    max_region_pixels: int = 50_000_000
    request_timeout: float = 60.0
    limit_concurrency: int = 64
    region_min_tissue: float = 0.1
    # Host header values answered (security.HostCheckMiddleware; None = any): against DNS rebinding, a page
    # of another site reaching a loopback server by a name that resolves to 127.0.0.1. ``serve`` sets the loopback
    # names for a loopback --host.
    allowed_hosts: tuple[str, ...] | None = None
    stain_norm: str | None = None  # none | macenko | reinhard; None = what the runs were trained with
    stain_reference: Path | None = None  # an image of the target lab or a stain.json; None = the runs' own

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple(Path(os.fspath(r)) for r in self.runs))
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold {self.threshold}: must be within [0, 1]")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token: an empty token would let anyone in; give a real one or none")
        for name in ("max_batch", "queue_size", "max_body", "max_files", "max_patches", "max_region_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)}: need at least 1")
        if self.request_timeout <= 0 or self.batch_window_ms < 0:
            raise ConfigError("request_timeout must be positive and batch_window_ms not negative")
