"""Data commands: ``ingest`` (raw patches to a store), ``info`` (what a store or run holds), ``eda`` (a report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histodetect.cli.common import OWN_EDA, OWN_INGEST_REPORT, console, out_option, workers_option
from histodetect.io import check_apart


def ingest(
    source: Annotated[
        Path,
        typer.Argument(
            help="Competition folder (train/, test/), PCam .h5 folder or file, folder of images, or folder per class."
        ),
    ],
    out: Annotated[Path, out_option("Store folder to write.")],
    labels: Annotated[Path | None, typer.Option(help="Labels CSV (id,label) for a bare folder of images.")] = None,
    class_dirs: Annotated[
        str | None,
        typer.Option(help="Folder-per-class layout: 'NEG,POS' folder names, e.g. 'normal,tumor' (default '0,1')."),
    ] = None,
    pcam_meta: Annotated[
        Path | None,
        typer.Option(
            help="Folder with PCam's *_x.h5 and *_meta.csv files: records each patch's slide, matched by the SHA-1 "
            "of its pixels (the competition's ids)."
        ),
    ] = None,
    groups: Annotated[
        Path | None, typer.Option(help="CSV of id,group: records each patch's group (e.g. its slide).")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Write the store without the bad items (all listed in the report).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    workers: Annotated[int | None, workers_option("Decoding processes", "all cores")] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the JSON problem report when ingest is refused (default: <out>.report.json)."
        ),
    ] = None,
) -> None:
    """Check raw patches and pack them into a memory-mappable store."""
    from histodetect.data.ingest import ingest as run_ingest

    read = {"--labels": labels, "--pcam-meta": pcam_meta, "--groups": groups}
    check_apart(out, read, folder=True)
    report_file = report if report is not None else out.with_name(f"{out.name}.report.json")  # ingest's default
    check_apart(report_file, {"SOURCE": source, **read}, option="--report", ours=OWN_INGEST_REPORT)
    result = run_ingest(
        source,
        out,
        labels=labels,
        class_dirs=class_dirs,
        pcam_meta=pcam_meta,
        groups=groups,
        skip_bad=skip_bad,
        overwrite=overwrite,
        workers=workers,
        report_path=report,
    )
    raise typer.Exit(result.exit_code)


def info(
    path: Annotated[Path, typer.Argument(help="A store (from `ingest`) or a run folder (from `train`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest (or the run's summary) as JSON.")] = False,
) -> None:
    """Show what a store holds (patches per split, label balance, problems at ingest), or how a run did."""
    from histodetect.data.ingest import describe_store
    from histodetect.data.store import Store
    from histodetect.runs.layout import CONFIG

    if (path / CONFIG).is_file():  # a run folder
        from histodetect.report.compare import read_run, terminal_table

        if as_json:
            typer.echo(json.dumps(read_run(path).summary, indent=2))
        else:
            console.print(terminal_table([path], title=f"run {path}"))
        return
    s = Store(path)
    if as_json:
        typer.echo(json.dumps(s.manifest, indent=2))
    else:
        console.print(describe_store(s))


def eda(
    store: Annotated[Path, typer.Argument(help="A store folder.")],
    out: Annotated[Path, out_option("Folder for the report (index.html and its figures).")],
    seed: Annotated[int, typer.Option(help="Seed for the example grids.")] = 0,
) -> None:
    """Write an HTML report: label balance, example patches, colour statistics, integrity summary."""
    from histodetect.data.store import Store
    from histodetect.report.eda import write_eda

    check_apart(out, {"STORE": store}, folder=True, ours=OWN_EDA)
    page = write_eda(Store(store), out, seed=seed)
    console.print(f"report: [bold]{page}[/]")
