"""Who may use the server: a token on every route but ``/health``, and no exposure beyond loopback without one.

With a token, :class:`TokenMiddleware` lets a request through when it carries ``Authorization: Bearer <token>``
(scripts, curl) or the session cookie (a browser, which cannot send a header to open a page). A browser gets the
cookie the way Jupyter hands it out: opening ``/?token=TOKEN`` (the URL ``histodetect serve`` prints) sets it and
redirects (303) to the same path without the query, so the token leaves the address bar and the history; the
page's own requests then carry the cookie (same origin). The cookie is ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page can make the browser send it) and ``Path=/``.

The cookie holds an HMAC of the token under a key drawn when the app starts, not the token: a cookie that leaks
(a browser profile, a proxy's log) does not reveal a token that scripts, or other servers, may also use, and
every session ends when the server restarts or its token changes. Its name carries the port, since browsers
share cookies between the ports of one host and two servers would otherwise overwrite each other's.

``/health`` (for load balancers and probes) needs nothing. Comparisons are constant-time
(``hmac.compare_digest``), so an answer's timing says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import re
import secrets
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, quote, urlencode

from starlette.types import ASGIApp, Receive, Scope, Send

from histodetect.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
OPEN_PATHS = frozenset({"/health"})
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>histodetect: token needed</title></head>
<body><h1>This histodetect server needs its token</h1><p>{reason} Open the address that <code>histodetect
serve</code> printed when it started, the one ending in <code>?token=...</code>: this browser then keeps a session
cookie for this server. Scripts send <code>Authorization: Bearer TOKEN</code> instead.</p></body></html>
"""


class TokenMiddleware:
    """401 for any request but ``/health`` without the bearer token or the session cookie; ``?token=`` logs in.

    ``token=None``: everyone may use the server (loopback only, unless ``--insecure``; see :func:`check_exposure`).
    """

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.enabled = token is not None
        self.token = (token or "").encode()
        self.session = hmac.new(secrets.token_bytes(32), self.token, hashlib.sha256).hexdigest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        cookie = f"histodetect-session-{scope['server'][1] if scope.get('server') else 0}"
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        given = [value for key, value in query if key == "token"]
        if given and scope["method"] == "GET":
            if not hmac.compare_digest(given[-1].encode(), self.token):
                await _refuse(receive, send, headers, "The token in this address is wrong.")
                return
            rest = urlencode([(key, value) for key, value in query if key != "token"])
            location = "/" + quote(scope["path"].lstrip("/")) + (f"?{rest}" if rest else "")  # never //other.host
            set_cookie = f"{cookie}={self.session}; HttpOnly; SameSite=Strict; Path=/"
            redirect = [(b"location", location.encode()), (b"set-cookie", set_cookie.encode())]
            await _answer(send, 303, b"", [*redirect, (b"cache-control", b"no-store")])
            return
        if self._bearer(headers) or self._cookie(headers, cookie):
            await self.app(scope, receive, send)
            return
        await _refuse(receive, send, headers, "This server needs a token.")

    def _bearer(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    def _cookie(self, headers: dict[bytes, bytes], name: str) -> bool:
        jar = SimpleCookie()
        try:
            jar.load(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:  # a malformed Cookie header is simply no session
            return False
        return name in jar and hmac.compare_digest(jar[name].value.encode(), self.session.encode())


async def _refuse(receive: Receive, send: Send, headers: dict[bytes, bytes], reason: str) -> None:
    """401: a short page for a browser (it asks for HTML), ``{"error": ...}`` for everything else.

    The request's body is read first (and dropped; ``LimitsMiddleware`` bounds its size and time): a connection
    closed on unread data is reset, and a client still sending would never read its 401.
    """
    message = await receive()
    while message["type"] == "http.request" and message.get("more_body", False):
        message = await receive()
    challenge = (b"www-authenticate", b"Bearer")
    if b"text/html" in headers.get(b"accept", b""):
        page = LOGIN_PAGE.format(reason=html.escape(reason)).encode()
        await _answer(send, 401, page, [(b"content-type", b"text/html; charset=utf-8"), challenge])
        return
    error = f"{reason} Send 'Authorization: Bearer <token>', or open /?token=<token> in a browser."
    await _answer(send, 401, json.dumps({"error": error}).encode(), [(b"content-type", b"application/json"), challenge])


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


class HostCheckMiddleware:
    """Answer 400 to a request whose ``Host`` header names none of ``allowed``: against DNS rebinding, a page of
    another site reaching a loopback server by a name that resolves to it. ``*`` allows any, ``*.example.org`` a
    domain's names. The header is parsed here, IPv6 literals included (``[::1]:8000``), rather than by Starlette's
    ``TrustedHostMiddleware``, whose releases parse those differently (older ones cut at the first colon)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.names = {normal_host(h) for h in allowed if not h.startswith("*")}
        self.suffixes = tuple(h[1:].lower() for h in allowed if h.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        name = host_name(header.decode("latin-1")) if header is not None else None
        if name is not None and (name in self.names or name.endswith(self.suffixes)):
            await self.app(scope, receive, send)
            return
        shown = "none" if header is None else repr(header.decode("latin-1")[:80])
        body = json.dumps({"error": f"Host {shown} is not a name this server answers to (--allowed-hosts)"})
        await _answer(send, 400, body.encode(), [(b"content-type", b"application/json")])


_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]/@\s]+))(?::(?P<port>[0-9]{1,5}))?")


def host_name(header: str) -> str | None:
    """The host a ``Host`` header names, in :func:`normal_host`'s form (``[::1]:8000`` -> ``::1``); None when the
    header is not ``host[:port]``."""
    match = _HOST.fullmatch(header.strip())
    if match is None:
        return None
    if match["v6"] is not None:
        try:
            return ipaddress.IPv6Address(match["v6"]).compressed
        except ValueError:
            return None
    return normal_host(match["name"])


def normal_host(host: str) -> str:
    """A host name or address as compared: lower case, no trailing dot, an address in its short form without
    brackets (``[0:0::1]`` -> ``::1``)."""
    bare = host.strip().strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        return bare


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
    if not host.strip():
        raise ConfigError("--host is empty; give the address to listen on, e.g. 127.0.0.1 (this machine only)")
    if token is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"--host {host}: other machines could reach the model without a token; pass --token (or set "
            "HISTODETECT_TOKEN), or --insecure if something in front of it already controls access"
        )


def login_url(url: str, token: str | None) -> str:
    """The address to open in a browser: with ``?token=`` when the server has one (it logs the browser in)."""
    return f"{url}/?{urlencode({'token': token})}" if token else url
