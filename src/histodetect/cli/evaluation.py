"""Commands that use a run on patches: ``evaluate``, ``compare``, ``predict``, ``explain``, ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histodetect.cli.common import (
    OWN_EVALUATION,
    OWN_EXPLAIN,
    OWN_ONNX,
    OWN_PAGE,
    OWN_SUBMISSION,
    OWN_TABLE,
    BatchSize,
    Engine,
    Precision,
    StainFitPer,
    StainNorm,
    StainReference,
    Tta,
    console,
    out_option,
)
from histodetect.errors import UserError
from histodetect.io import check_apart


def _runs_then(inputs: list[Path], command: str, what: str) -> tuple[list[Path], Path]:
    """``RUN [RUN...] X`` arguments: the runs, and the last one."""
    if len(inputs) < 2:
        raise UserError(f"{command} needs at least one RUN and {what}")
    return inputs[:-1], inputs[-1]


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    store: Annotated[Path, typer.Argument(help="A labeled store.")],
    out: Annotated[Path, out_option("Folder for metrics.json, figures and report.html.")],
    split: Annotated[
        str,
        typer.Option(
            help="'val' or 'test' (the run's own held-out parts, split.csv), 'all', or a store split (store:NAME)."
        ),
    ] = "val",
    tta: Tta = "none",
    precision: Annotated[
        str, typer.Option(help="fp32 (what export computes: the model you deploy) | auto (bf16 where fast) | bf16.")
    ] = "fp32",
    threshold: Annotated[float, typer.Option(help="Decision threshold for accuracy, sensitivity, specificity.")] = 0.5,
    stain_norm: StainNorm = None,
    stain_reference: StainReference = None,
    stain_shifts: Annotated[
        bool, typer.Option("--stain-shifts", help="Also score the patches re-stained as other labs' (ROC AUC each).")
    ] = False,
    stain_fit: StainFitPer = "patch",
) -> None:
    """Metrics with confidence intervals, ROC/PR/calibration plots and the worst mistakes, as HTML."""
    from histodetect.infer.evaluate import evaluate as run_evaluate
    from histodetect.runs.layout import EVALUATION

    check_apart(out, {"RUN": run, "STORE": store}, folder=True, allowed=[run / EVALUATION], ours=OWN_EVALUATION)
    metrics = run_evaluate(
        run,
        store,
        out,
        split=split,
        tta=tta,
        threshold=threshold,
        precision=precision,
        stain_norm=stain_norm,
        stain_reference=stain_reference,
        stain_shifts=stain_shifts,
        stain_fit=stain_fit,
    )
    console.print(
        f"{split}: ROC AUC {metrics['roc_auc']:.4f}  accuracy {metrics['accuracy']:.4f}  "
        f"({metrics['n']:,} patches, {metrics['numeric_precision']})  report: [bold]{out}[/]"
    )
    for name, shift in (metrics.get("stain_shifts") or {}).items():
        console.print(f"  {name}: ROC AUC {shift['roc_auc']:.4f} ({shift['delta']:+.4f})", highlight=False)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    out: Annotated[Path, out_option("Table file (.md; an .html is written beside it).")],
) -> None:
    """A results table, one row per run, built from the run folders."""
    from histodetect.report.compare import compare as run_compare
    from histodetect.report.compare import terminal_table

    check_apart(out, {"RUN": runs}, ours=OWN_TABLE)
    check_apart(out.with_suffix(".html"), {"RUN": runs}, option="--out (its .html)", ours=OWN_PAGE)
    run_compare(runs, out)
    console.print(terminal_table(runs))
    console.print(f"full table: [bold]{out}[/] and [bold]{out.with_suffix('.html')}[/]")


def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="RUN [RUN...] SOURCE: run folders or .onnx files, then a test/ folder, a store, or one image."
        ),
    ],
    out: Annotated[Path, out_option("Submission CSV (id,label).")],
    sample_submission: Annotated[Path | None, typer.Option(help="Write exactly these ids, in this order.")] = None,
    tta: Tta = "none",
    precision: Precision = "auto",
    engine: Engine = "auto",
    threshold: Annotated[float | None, typer.Option(help="Write 0/1 decisions instead of probabilities.")] = None,
    batch_size: BatchSize = None,
    split: Annotated[
        str | None, typer.Option(help="With a store: which split to predict (default: test, or all).")
    ] = None,
    stain_norm: StainNorm = None,
    stain_reference: StainReference = None,
    stain_fit: StainFitPer = "patch",
) -> None:
    """Predict probabilities for a test folder, store or image; ensembles several runs; writes a submission."""
    from histodetect.infer.predict import predict as run_predict

    runs, source = _runs_then(inputs, "predict", "a SOURCE")
    read = {"RUN": runs, "SOURCE": source, "--sample-submission": sample_submission}
    check_apart(out, read, ours=OWN_SUBMISSION)
    frame = run_predict(
        runs,
        source,
        out,
        sample_submission=sample_submission,
        tta=tta,
        threshold=threshold,
        batch_size=batch_size,
        split=split,
        precision=precision,
        engine=engine,
        stain_norm=stain_norm,
        stain_reference=stain_reference,
        stain_fit=stain_fit,
    )
    console.print(f"{len(frame)} predictions: [bold]{out}[/]")


def explain(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files, or a store (its first patches are used).")],
    out: Annotated[Path, out_option("Folder for the overlays and the grid.")],
    method: Annotated[str, typer.Option(help="gradcam | gradcam++.")] = "gradcam",
    limit: Annotated[int, typer.Option(help="At most this many patches from a store.")] = 16,
    stain_norm: StainNorm = None,
    stain_reference: StainReference = None,
) -> None:
    """Grad-CAM heatmaps over patches, with the predicted probability."""
    from histodetect.infer.explain import explain as run_explain

    check_apart(out, {"RUN": run, "IMAGES": images}, folder=True, ours=OWN_EXPLAIN)

    paths = run_explain(
        run, images, out, method=method, limit=limit, stain_norm=stain_norm, stain_reference=stain_reference
    )
    console.print(f"{len(paths)} files in [bold]{out}[/]")


def export(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    out: Annotated[Path, out_option("The .onnx file to write.")],
    format: Annotated[str, typer.Option(help="onnx.")] = "onnx",
    check: Annotated[
        Path | None,
        typer.Option(help="A store whose patches check the export (default: the embedded sample)."),
    ] = None,
) -> None:
    """Export a run to ONNX (uint8 RGB in, probability out) and check it against PyTorch."""
    from histodetect.infer.export import export_onnx

    if format != "onnx":
        raise UserError(f"unsupported export format {format!r}; only onnx is available")
    check_apart(out, {"RUN": run, "--check": check}, ours=OWN_ONNX)
    result = export_onnx(run, out, check_store=check)
    console.print(f"exported [bold]{out}[/]; max |onnx - torch| = {result['max_abs_diff']:.2e}")
