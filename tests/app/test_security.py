"""Who may reach the model: loopback by default, a token (constant-time) or an explicit --insecure beyond it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from histodetect.app.security import check_exposure, is_loopback
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
