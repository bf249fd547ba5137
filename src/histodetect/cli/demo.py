"""``demo``: the whole tool end to end on the sample shipped with the package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histodetect.cli.common import out_option


def demo(
    out: Annotated[Path, out_option("Folder for everything the demo makes.")] = Path("demo-output"),
    quick: Annotated[bool, typer.Option(help="Fewer epochs (for tests).")] = False,
) -> None:
    """The whole tool end to end on the real sample shipped with the package."""
    from histodetect.demo import run_demo

    run_demo(out, quick=quick)
