"""Who may reach the model: loopback by default, a token (constant-time) or an explicit --insecure beyond it; with
a token every route but /health needs the bearer header or the session cookie that ``/?token=`` sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from histodetect.app import Settings, create_app
from histodetect.app.security import check_exposure, is_loopback, login_url
from histodetect.cli import app
from histodetect.errors import ConfigError


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"])
def test_loopback_addresses_are_recognised(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_other_addresses_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_exposure_without_a_token_is_refused_unless_insecure() -> None:
    with pytest.raises(ConfigError, match="--token"):
        check_exposure("0.0.0.0", None, insecure=False)
    check_exposure("0.0.0.0", "a-token", insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    check_exposure("127.0.0.1", None, insecure=False)


def test_the_cli_refuses_to_expose_a_model_without_a_token(served_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HISTODETECT_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", str(served_run), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2 and "--insecure" in result.output
    result = CliRunner().invoke(app, ["serve", str(served_run), "--token", " "])
    assert result.exit_code == 2 and "empty token" in result.output


TOKEN = "s3cret token/+&"  # characters a URL must escape
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SESSION = "histodetect-session-80"  # TestClient's server is testserver:80


@pytest.fixture(scope="module")
def guarded(settings: Settings) -> Iterator[TestClient]:
    """The app with a token; the client keeps no cookies between requests unless a test gives them."""
    with TestClient(create_app(Settings(settings.runs, precision="fp32", token=TOKEN))) as client:
        yield client


@pytest.fixture(scope="module")
def good_requests(patch_files: list[Path], region_png: bytes) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """A good request to every route but /health: (method, path, httpx arguments)."""
    tif = patch_files[0].read_bytes()
    return {
        "page": ("GET", "/", {}),
        "static file": ("GET", "/static/app.js", {}),
        "docs": ("GET", "/docs", {}),
        "openapi": ("GET", "/openapi.json", {}),
        "predict": ("POST", "/predict", {"files": [("files", ("a.tif", tif, "image/tiff"))]}),
        "predict raw": ("POST", "/predict", {"content": tif}),
        "explain": ("POST", "/explain", {"files": {"file": ("a.tif", tif, "image/tiff")}}),
        "slide": ("POST", "/slide", {"files": {"file": ("region.png", region_png, "image/png")}}),
    }


ROUTES = ["page", "static file", "docs", "openapi", "predict", "predict raw", "explain", "slide"]


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_but_health_needs_the_token(guarded: TestClient, good_requests: dict, route: str) -> None:
    method, path, kwargs = good_requests[route]
    guarded.cookies.clear()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        answer = guarded.request(method, path, headers=headers, **kwargs)
        assert answer.status_code == 401, (route, headers)
        assert answer.headers["www-authenticate"] == "Bearer" and "?token=" in answer.json()["error"]
    guarded.cookies.set(SESSION, "forged")
    assert guarded.request(method, path, **kwargs).status_code == 401
    guarded.cookies.clear()
    answer = guarded.request(method, path, headers=BEARER, **kwargs)
    assert answer.status_code == 200, (route, answer.text)


def test_health_needs_no_token(guarded: TestClient) -> None:
    guarded.cookies.clear()
    answer = guarded.get("/health")
    assert answer.status_code == 200 and answer.json()["token_required"] is True


def test_a_browser_without_the_token_is_told_to_open_the_printed_address(guarded: TestClient) -> None:
    guarded.cookies.clear()
    answer = guarded.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert answer.status_code == 401 and answer.headers["content-type"].startswith("text/html")
    assert "?token=" in answer.text and "<h1>" in answer.text


def test_the_token_in_the_address_sets_a_strict_http_only_cookie_and_leaves_the_address(
    guarded: TestClient, good_requests: dict
) -> None:
    guarded.cookies.clear()
    answer = guarded.get(login_url("", TOKEN), follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION}=") and TOKEN not in cookie  # an HMAC of the token, not the token
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {part.strip() for part in cookie.split(";")}
    assert guarded.cookies.get(SESSION)  # the client now sends it, and nothing else, on every request
    for route in ROUTES:
        method, path, kwargs = good_requests[route]
        assert guarded.request(method, path, **kwargs).status_code == 200, route
    answer = guarded.get("/docs", params={"token": TOKEN, "x": "1"}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/docs?x=1"
    guarded.cookies.clear()


def test_a_wrong_token_in_the_address_gets_401_and_no_cookie(guarded: TestClient) -> None:
    guarded.cookies.clear()
    answer = guarded.get("/", params={"token": TOKEN[:-1]}, headers={"Accept": "text/html"}, follow_redirects=False)
    assert answer.status_code == 401 and "wrong" in answer.text
    assert "set-cookie" not in answer.headers and not guarded.cookies


def test_the_address_to_open_carries_the_token_only_when_there_is_one() -> None:
    assert login_url("http://127.0.0.1:8000", None) == "http://127.0.0.1:8000"
    assert login_url("http://127.0.0.1:8000", "a b&c") == "http://127.0.0.1:8000/?token=a+b%26c"
