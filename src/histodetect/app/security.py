"""Who may use the server: a bearer token on every model route, and no exposure without one.

``/health`` (for load balancers and probes) and the page's static files (the same for everyone, no data in them)
need no token; every route that runs the model does. The comparison is constant-time (``hmac.compare_digest``)
so the answer's timing says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import HTTPException, Request, status

from histodetect.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless ``Authorization: Bearer <token>`` matches the server's token (if it has one)."""
    expected: str | None = request.app.state.settings.token
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this server needs a token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses no other machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, *, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless the user says so with ``--insecure``."""
    if token is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"--host {host}: other machines could reach the model without a token; pass --token (or set "
            "HISTODETECT_TOKEN), or --insecure if something in front of it already controls access"
        )
