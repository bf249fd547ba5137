"""What the commands share: the error wrapper, the console, and the options several commands declare alike.

An option that means the same in several commands is declared here once, as an ``Annotated`` type when its help is
the same everywhere (``--tta``, ``--engine``, ``--stain-norm``...) or as a factory when only the help's detail differs
(``--out``, ``--workers``), so a new command picks up the house's wording instead of writing its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from histodetect.errors import UserError
from histodetect.io import holding, recognised_by
from histodetect.runs.names import CONFIG, CV_CONFIG, EVALUATED

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
READERS = "cores - 1, at most 8"  # infer's default count of slide reader threads, as --workers help says it
# What each command recognises as its own earlier output, which it may replace (io.check_apart's ``ours``).
OWN_SUBMISSION = recognised_by(b"id,label")
OWN_TABLE = recognised_by(b"| run |")
OWN_PAGE = recognised_by(b"<!doctype html>")
OWN_ONNX = recognised_by(b"\x12\x07pytorch", within=4)  # ir_version, then producer_name "pytorch"
OWN_INGEST_REPORT = recognised_by(b'{\n  "source": ')
# ... and, for a folder --out that exists and is not empty, what marks it as the command's own folder.
OWN_EDA = holding(("index.html", OWN_PAGE))
OWN_RUN = holding(CONFIG, CV_CONFIG)  # train then resumes, or refuses: "already holds a run"
OWN_TUNING = holding(
    ("trials.csv", recognised_by(b"number,state")), ("study.db", recognised_by(b"SQLite")), f"trial-*/{CONFIG}"
)
OWN_EVALUATION = holding((EVALUATED, recognised_by(b'{\n  "n": ')))
OWN_SLIDES = holding(("slides.csv", recognised_by(b"name,slide,error")), "*/summary.json")
OWN_EXPLAIN = holding(("grid.png", recognised_by(b"Matplotlib", within=200)))  # savefig's Software text


def friendly(fn: F) -> F:
    """Turn the library's user-facing errors into one red line and exit code 2 (cli/__init__ wraps every command)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, FileExistsError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def out_option(help: str) -> Any:
    """``--out``/``-o``: what the command writes (every writing command checks it with ``io.check_apart`` first)."""
    return typer.Option("--out", "-o", help=help)


def workers_option(what: str, default: str) -> Any:
    """``--workers``: how many processes of ``what`` run, and how many when it is not given."""
    return typer.Option(help=f"{what} (default: {default}).")


# Options shared by the commands that score patches.
Tta = Annotated[str, typer.Option(help="Test-time augmentation: none | flips | d4.")]
BatchSize = Annotated[int | None, typer.Option(help="Patches per batch (default: 64 on CPU, 1024 on GPU).")]
Precision = Annotated[
    str, typer.Option(help="auto (bf16 where the hardware has it: fast, same AUC) | fp32 (exact) | bf16.")
]
Engine = Annotated[
    str,
    typer.Option(
        help="What runs the network: auto (onnxruntime fp32 on a CPU unless --precision bf16; PyTorch on a GPU) "
        "| torch | onnx | openvino (needs pip install openvino)."
    ),
]
StainNorm = Annotated[
    str | None,
    typer.Option(help="Stain normalisation: none | macenko | reinhard (default: what the run was trained with)."),
]
StainReference = Annotated[
    Path | None,
    typer.Option(help="Normalise to this image of the target lab (or a stain.json); default: the run's own."),
]
StainFitPer = Annotated[
    str,
    typer.Option(
        help="patch: each patch normalised by its own fit | set: one fit for the whole input (one lab's patches), "
        "as slide fits each slide once."
    ),
]
# Options shared by the commands that read slides.
SlideMpp = Annotated[float | None, typer.Option(help="Microns per pixel of level 0, for files that do not record it.")]
