"""``serve``: the web app over one or more runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from histodetect.cli.common import Engine, StainNorm, StainReference, Tta, console
from histodetect.errors import UserError


def serve(
    runs: Annotated[list[Path], typer.Argument(help="Run folders or .onnx files (several: their mean).")],
    host: Annotated[str, typer.Option(help="Address to listen on; beyond loopback it needs --token or --insecure.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8000,
    tta: Tta = "none",
    precision: Annotated[str, typer.Option(help="fp32 (exact, the default here) | bf16 | auto.")] = "fp32",
    engine: Engine = "auto",
    threshold: Annotated[float, typer.Option(help="Probability at which a patch's label is 1.")] = 0.5,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="HISTODETECT_TOKEN",
            help="Require 'Authorization: Bearer TOKEN', or the cookie /?token=TOKEN sets (all but /health).",
        ),
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without a token.")] = False,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(help="Host header names to answer, comma list, or * (default: localhost names on loopback)."),
    ] = None,
    stain_norm: StainNorm = None,
    stain_reference: StainReference = None,
) -> None:
    """The web app: a page at /, POST /predict, /explain, /slide, GET /health, the API's docs at /docs."""
    from histodetect.app.server import serve as run_server
    from histodetect.app.settings import Settings

    if token is None and os.environ.get("HISTODETECT_TOKEN") == "":  # click reads an empty variable as unset
        raise UserError("HISTODETECT_TOKEN is set but empty: an empty token would let anyone in; unset it or give one")
    hosts = tuple(h.strip() for h in allowed_hosts.split(",") if h.strip()) if allowed_hosts is not None else None
    settings = Settings(
        tuple(runs),
        tta=tta,
        precision=precision,
        engine=engine,
        threshold=threshold,
        token=token,
        allowed_hosts=hosts,
        stain_norm=stain_norm,
        stain_reference=stain_reference,
    )
    run_server(
        settings,
        host=host,
        port=port,
        insecure=insecure,
        announce=lambda url: console.print(
            f"serving: open [bold]{url}[/] (the page; the API at /docs); Ctrl-C stops", soft_wrap=True
        ),
    )
