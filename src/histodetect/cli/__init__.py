"""The ``histodetect`` command: a Typer app over one module per command family.

``data`` (ingest, info, eda), ``training`` (train, tune), ``evaluation`` (evaluate, compare, predict, explain,
export), ``slides`` (slide, extract), ``serving`` (serve), ``demo``; options several commands share live in
``common``. Each command is a thin wrapper over the library that imports it (torch, matplotlib) only when it runs,
so ``--help`` stays instant. Errors the user can fix (bad input, a missing file) are printed as one clear line and
exit with code 2 (``common.friendly``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from histodetect.cli import data, demo, evaluation, serving, slides, training
from histodetect.cli.common import friendly

app = typer.Typer(
    name="histodetect",
    help="Metastatic cancer in histopathology patches: ingest, explore, train, tune, evaluate, predict, slide, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from histodetect import __version__

        typer.echo(f"histodetect {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """histodetect: from raw patches to a trusted model and a submission."""


COMMANDS = (  # in the order `histodetect --help` lists them
    data.ingest,
    data.info,
    data.eda,
    training.train,
    training.tune,
    evaluation.evaluate,
    evaluation.compare,
    evaluation.predict,
    slides.slide,
    slides.extract,
    serving.serve,
    evaluation.explain,
    evaluation.export,
    demo.demo,
)
for command in COMMANDS:
    app.command()(friendly(command))
