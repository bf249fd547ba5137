"""Slide commands: ``slide`` (heatmaps, GeoJSON and scores for whole slides) and ``extract`` (a store from slides)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from histodetect.cli.common import (
    OWN_SLIDES,
    READERS,
    BatchSize,
    Engine,
    Precision,
    SlideMpp,
    StainNorm,
    StainReference,
    Tta,
    console,
    out_option,
    workers_option,
)
from histodetect.errors import UserError
from histodetect.io import check_apart


def slide(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="RUN... SLIDE_OR_FOLDER...: run folders or .onnx files, then slide files (SVS, NDPI, MIRAX, tiled "
            "TIFF, ... or a PNG/JPEG/TIFF region) and folders of them."
        ),
    ],
    out: Annotated[Path, out_option("Folder; each slide goes into OUT/<slide name>/.")],
    slide_mpp: SlideMpp = None,
    level: Annotated[
        int | None, typer.Option(help="Pyramid level to read (default: the one closest to the model's scale).")
    ] = None,
    min_tissue: Annotated[
        float, typer.Option(help="Score cells whose 96 px window has at least this share of tissue.")
    ] = 0.1,
    mask: Annotated[
        Path | None, typer.Option(help="Score only inside: a PNG mask or GeoJSON/XML polygons (or a folder of them).")
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="Tumour outlines (GeoJSON or Camelyon16 ASAP XML, or a folder of them; a slide without one is "
            "normal): cell ROC AUC, lesions found, and OUT/cohort.json + OUT/report.html for the cohort."
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Camelyon16 reference CSV (image,type: Tumor/Normal): the slides' truth for cohort.json."),
    ] = None,
    threshold: Annotated[float, typer.Option(help="Probability counted as tumour (regions, areas, decision).")] = 0.5,
    top_k: Annotated[
        int, typer.Option(help="summary.json's top_k_mean: the mean of the top-k cells (the slide score reads areas).")
    ] = 10,
    cell: Annotated[
        int,
        typer.Option(
            help="Cell side in model pixels: 32 | 48 | 96, each scored by the 96 px window centred on it "
            "(96: one window per 96x96 area, ~9x fewer than 32)."
        ),
    ] = 32,
    cascade: Annotated[
        bool,
        typer.Option(
            "--cascade",
            help="Coarse-to-fine: score 96 px cells first, then --cell cells only near windows at or above "
            "--refine-above (the rest keep the coarse probability; cells.csv: refined).",
        ),
    ] = False,
    refine_above: Annotated[
        float | None,
        typer.Option(help="With --cascade: refine around 96 px windows at or above this probability (default 0.25)."),
    ] = None,
    geojson: Annotated[
        str, typer.Option(help="regions: tumour.geojson only | cells: also every scored cell (cells.geojson).")
    ] = "regions",
    shard: Annotated[str, typer.Option(help="I/N: score every N-th slide from the I-th (0-based), for array jobs.")] = (
        "0/1"
    ),
    workers: Annotated[int | None, workers_option("Reader threads", READERS)] = None,
    tta: Tta = "none",
    precision: Precision = "auto",
    engine: Engine = "auto",
    batch_size: BatchSize = None,
    stain_norm: StainNorm = None,
    stain_reference: StainReference = None,
) -> None:
    """Tumour heatmaps, QuPath GeoJSON and slide scores for whole slides, at the model's microns per pixel."""
    from histodetect.infer.engine import Predictor
    from histodetect.infer.slide import REFINE_ABOVE, check_options
    from histodetect.infer.slide_batch import parse_shard, score_slides, split_runs_and_slides

    if geojson not in ("regions", "cells"):
        raise UserError(f"--geojson {geojson!r}: choose regions or cells")
    refine_above = REFINE_ABOVE if refine_above is None else refine_above
    check_options(
        min_tissue=min_tissue, threshold=threshold, top_k=top_k, slide_mpp=slide_mpp, level=level, workers=workers,
        cell=cell, cascade=cascade, refine_above=refine_above,
    )  # fmt: skip
    parse_shard(shard)
    for option, given in (("--mask", mask), ("--annotations", annotations)):
        if given is not None and not given.exists():  # before the model loads and OUT is made, not once per slide
            raise UserError(f"{option} {given}: no such file or folder")
    runs, slides = split_runs_and_slides(inputs)
    read = {"RUN": runs, "SLIDE": slides, "--mask": mask, "--annotations": annotations, "--reference": reference}
    check_apart(out, read, folder=True, ours=OWN_SLIDES)
    predictor = Predictor(
        runs,
        tta=tta,
        batch_size=batch_size,
        precision=precision,
        engine=engine,
        stain_norm=stain_norm,
        stain_reference=stain_reference,
    )

    def report(name: str, row: dict[str, Any]) -> None:
        if "error" in row:
            console.print(f"[bold red]error:[/] {row['error']}", highlight=False, soft_wrap=True)
        elif row.get("skipped"):
            console.print(f"{name}: done earlier, skipped", highlight=False)
        else:
            console.print(
                f"{name}: {row['cells_scored']:,} tissue cells, {row['cells_at_or_above_threshold']:,} at P >= "
                f"{threshold:g}, slide score {row['slide_score'] or 0:.3f} ({row['cells_per_second'] or 0:,.0f} "
                f"cells/s): [bold]{out / name}[/]",
                highlight=False,
            )

    rows = score_slides(
        predictor,
        slides,
        out,
        shard=parse_shard(shard),
        mask=mask,
        annotations=annotations,
        reference=reference,
        report=report,
        slide_mpp=slide_mpp,
        level=level,
        min_tissue=min_tissue,
        threshold=threshold,
        top_k=top_k,
        cell=cell,
        cascade=cascade,
        refine_above=refine_above,
        cell_features=geojson == "cells",
        workers=workers,
    )
    if not rows:
        console.print(f"--shard {shard}: no slide falls to this shard; nothing to do", highlight=False)
        return
    failed = sum("error" in row for row in rows)
    console.print(f"{len(rows) - failed} of {len(rows)} slides done: [bold]{out / 'slides.csv'}[/]")
    if annotations is not None or reference is not None:
        console.print(f"cohort metrics: [bold]{out / 'cohort.json'}[/]; report: [bold]{out / 'report.html'}[/]")
    if failed:
        raise typer.Exit(2)


def extract(
    slides: Annotated[list[Path], typer.Argument(help="Slide files (or folders of them) to cut patches from.")],
    out: Annotated[Path, out_option("The store to write (an ordinary histodetect store).")],
    annotations: Annotated[
        Path | None,
        typer.Option(help="Tumour outlines: GeoJSON or ASAP XML, or a folder of <slide>.xml/.geojson; none: normal."),
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Camelyon16 reference CSV (image,type: Tumor/Normal) saying which is which.")
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option(help="Model's um per pixel (default: the --hard-negatives run's, else 0.972)."),
    ] = None,
    per_slide: Annotated[int, typer.Option(help="Windows drawn per slide.")] = 500,
    positive_share: Annotated[float, typer.Option(help="Share of a tumour slide's windows drawn from tumour.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the draw (with each slide's name): same seed, same store.")] = 0,
    min_tissue: Annotated[float, typer.Option(help="Tissue share a window needs, as in slide.")] = 0.1,
    slide_mpp: SlideMpp = None,
    hard_negatives: Annotated[
        Path | None,
        typer.Option(help="A run: add the windows it scores highest, away from tumour, as negatives."),
    ] = None,
    hard_count: Annotated[int, typer.Option(help="Hard negatives per slide.")] = 100,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it is a store.")] = False,
    workers: Annotated[int | None, workers_option("Reader threads for scoring", READERS)] = None,
) -> None:
    """Labelled 96x96 patches from annotated slides (PCam's rule), optionally with a run's hard negatives: a store."""
    from histodetect.infer.extract import Settings, describe
    from histodetect.infer.extract import extract as run_extract

    read = {"SLIDE": slides, "--annotations": annotations, "--reference": reference, "--hard-negatives": hard_negatives}
    check_apart(out, read, folder=True)
    settings = Settings(
        mpp=mpp,
        per_slide=per_slide,
        positive_share=positive_share,
        seed=seed,
        min_tissue=min_tissue,
        slide_mpp=slide_mpp,
        hard_negatives=str(hard_negatives.resolve()) if hard_negatives is not None else None,
        hard_count=hard_count,
    )

    def report(name: str, meta: dict[str, Any], reused: bool) -> None:
        console.print(describe(meta) + (" (done earlier, reused)" if reused else ""), highlight=False)

    store = run_extract(
        slides,
        out,
        settings,
        annotations=annotations,
        reference=reference,
        overwrite=overwrite,
        workers=workers,
        report=report,
    )
    counts = store.manifest["splits"][store.splits[0]] if len(store) else {"positive": 0, "negative": 0}
    console.print(
        f"{len(store):,} patches ({counts['positive']:,} positive, {counts['negative']:,} negative) from "
        f"{len(store.manifest['extract']['slides'])} slides ({store.manifest['extract']['duplicates']} windows "
        f"left out as copies of stored ones: report.json): [bold]{out}[/]",
        highlight=False,
    )
