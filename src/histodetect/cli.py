"""The ``histodetect`` command: thin wrappers over the library, one per subcommand.

Heavy imports (torch, matplotlib) happen inside each command so that ``--help`` stays instant. Errors the user
can fix (bad input, a missing file) are printed as one clear line and exit with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from histodetect.errors import UserError
from histodetect.io import check_apart, holding, recognised_by

app = typer.Typer(
    name="histodetect",
    help="Metastatic cancer in histopathology patches: ingest, explore, train, tune, evaluate, predict, slide, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
# What each command recognises as its own earlier output, which it may replace (io.check_apart's ``ours``).
OWN_SUBMISSION = recognised_by(b"id,label")
OWN_TABLE = recognised_by(b"| run |")
OWN_PAGE = recognised_by(b"<!doctype html>")
OWN_ONNX = recognised_by(b"\x12\x07pytorch", within=4)  # ir_version, then producer_name "pytorch"
OWN_INGEST_REPORT = recognised_by(b'{\n  "source": ')
# ... and, for a folder --out that exists and is not empty, what marks it as the command's own folder.
OWN_EDA = holding(("index.html", OWN_PAGE))
OWN_RUN = holding("config.yaml", "cv-config.yaml")  # train then resumes, or refuses: "already holds a run"
OWN_TUNING = holding(
    ("trials.csv", recognised_by(b"number,state")), ("study.db", recognised_by(b"SQLite")), "trial-*/config.yaml"
)
OWN_EVALUATION = holding(("metrics.json", recognised_by(b'{\n  "n": ')))
OWN_SLIDES = holding(("slides.csv", recognised_by(b"name,slide,error")), "*/summary.json")
OWN_EXPLAIN = holding(("grid.png", recognised_by(b"Matplotlib", within=200)))  # savefig's Software text
IMAGE_SIZE_HELP = "Pixels the network sees: 96 = native, or auto = the backbone's pretrained size (224 for most)."
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


def friendly(fn: F) -> F:
    """Turn the library's user-facing errors into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, FileExistsError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _runs_then(inputs: list[Path], command: str, what: str) -> tuple[list[Path], Path]:
    """``RUN [RUN...] X`` arguments: the runs, and the last one."""
    if len(inputs) < 2:
        raise UserError(f"{command} needs at least one RUN and {what}")
    return inputs[:-1], inputs[-1]


def _existing(value: str | Path | None) -> Path | None:
    """An option that may name a file (``--pretrained``, ``--groups``, ``--space``): its path when it is one."""
    return Path(value) if value is not None and Path(value).exists() else None


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


# ---------------------------------------------------------------------------------------------------- data
@app.command()
@friendly
def ingest(
    source: Annotated[
        Path,
        typer.Argument(
            help="Competition folder (train/, test/), PCam .h5 folder or file, folder of images, or folder per class."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Store folder to write.")],
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
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: all cores).")] = None,
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


@app.command()
@friendly
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


@app.command()
@friendly
def eda(
    store: Annotated[Path, typer.Argument(help="A store folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report (index.html and its figures).")],
    seed: Annotated[int, typer.Option(help="Seed for the example grids.")] = 0,
) -> None:
    """Write an HTML report: label balance, example patches, colour statistics, integrity summary."""
    from histodetect.data.store import Store
    from histodetect.report.eda import write_eda

    check_apart(out, {"STORE": store}, folder=True, ours=OWN_EDA)
    page = write_eda(Store(store), out, seed=seed)
    console.print(f"report: [bold]{page}[/]")


# ---------------------------------------------------------------------------------------------------- train
@app.command()
@friendly
def train(
    store: Annotated[Path, typer.Argument(help="A store folder with a labeled split.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")],
    preset: Annotated[
        str | None, typer.Option(help="cpu | gpu: the best settings for the time on that hardware.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A config.yaml (e.g. from an earlier run).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
    model: Annotated[str | None, typer.Option(help="baseline-cnn or any timm model name.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="auto | none | path to .safetensors/.pth.")] = None,
    freeze: Annotated[str | None, typer.Option(help="none | frozen | top:K.")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="Head-only epochs before top:K unfreezes.")] = None,
    backbone_lr_scale: Annotated[
        float | None, typer.Option(help="Learning rate of a pretrained backbone, as a fraction of --lr.")
    ] = None,
    dropout: Annotated[float | None, typer.Option()] = None,
    image_size: Annotated[str | None, typer.Option(help=IMAGE_SIZE_HELP)] = None,
    mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of the patches (default 0.972: PCam/Kaggle); slide uses it.")
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | rmsprop | sgd.")] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    scheduler: Annotated[str | None, typer.Option(help="cosine | onecycle | plateau | none.")] = None,
    lr_warmup_epochs: Annotated[float | None, typer.Option(help="Linear LR warm-up, in epochs.")] = None,
    loss: Annotated[str | None, typer.Option(help="bce | focal.")] = None,
    pos_weight: Annotated[float | None, typer.Option(help="BCE weight of the positive class.")] = None,
    focal_gamma: Annotated[float | None, typer.Option()] = None,
    focal_alpha: Annotated[float | None, typer.Option()] = None,
    label_smoothing: Annotated[float | None, typer.Option()] = None,
    aug_dihedral: Annotated[bool | None, typer.Option("--aug-dihedral/--no-aug-dihedral")] = None,
    aug_hed: Annotated[float | None, typer.Option(help="H&E colour jitter strength (0 = off).")] = None,
    aug_brightness: Annotated[float | None, typer.Option()] = None,
    aug_contrast: Annotated[float | None, typer.Option()] = None,
    stain_aug: Annotated[
        float | None,
        typer.Option(help="Another lab's staining per patch: H/E amounts, hues, yellowing, white balance (0-0.9)."),
    ] = None,
    stain_norm: Annotated[
        str | None, typer.Option(help="Stain normalisation before augmentation: none | macenko | reinhard.")
    ] = None,
    stain_reference: Annotated[
        str | None,
        typer.Option(help="Normalise to this image (or stain.json); default: the run's own training patches."),
    ] = None,
    mixup: Annotated[float | None, typer.Option(help="MixUp alpha (0 = off).")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (0 = off).")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Validation hold-out (0 = none: the last epoch's weights are kept).")
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(help="Untouched test hold-out, drawn first and kept out of every fold (evaluate --split test)."),
    ] = None,
    groups: Annotated[
        str | None,
        typer.Option(help="A split by group: 'auto' (the slides the store holds) or a CSV of id,group."),
    ] = None,
    folds: Annotated[int | None, typer.Option()] = None,
    fold: Annotated[int | None, typer.Option()] = None,
    all_folds: Annotated[
        bool,
        typer.Option(
            "--all-folds", help="Train every fold of --folds K into OUT/fold-I, with out-of-fold predictions."
        ),
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="With --all-folds: delete the folds an earlier run made and start over.")
    ] = False,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience on val AUC (0 = off).")] = None,
    max_time: Annotated[float | None, typer.Option(help="Time budget in minutes.")] = None,
    limit_train: Annotated[int | None, typer.Option(help="Use at most this many training patches.")] = None,
    epoch_patches: Annotated[
        int | None, typer.Option(help="Training patches per epoch, drawn afresh each epoch (default: all).")
    ] = None,
    val_patches: Annotated[
        int | None, typer.Option(help="Validate each epoch on a stratified subset of this size (default: all).")
    ] = None,
    ema: Annotated[
        float | None,
        typer.Option(help="Average the weights (EMA, this decay per step, e.g. 0.998; 0 = off); saved averaged."),
    ] = None,
    swa_epochs: Annotated[
        int | None, typer.Option(help="Average the weights of the last N epochs (SWA); saved averaged.")
    ] = None,
    cache_embeddings: Annotated[
        bool | None,
        typer.Option(
            "--cache-embeddings/--no-cache-embeddings",
            help="With --freeze frozen: embed each patch once, cache it, train the head on the embeddings.",
        ),
    ] = None,
    cache_dir: Annotated[
        str | None, typer.Option(help="Embedding cache (default $HISTODETECT_CACHE/embeddings or ~/.cache/...).")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
    devices: Annotated[str | None, typer.Option(help="auto, a count, or a list like 0,1.")] = None,
    num_nodes: Annotated[int | None, typer.Option()] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | 32 | bf16-mixed | 16-mixed.")] = None,
    channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    num_workers: Annotated[int | None, typer.Option()] = None,
    logger: Annotated[str | None, typer.Option(help="Comma list of csv, tensorboard, mlflow.")] = None,
) -> None:
    """Train one model on a store; writes a run folder (config, checkpoints, metrics, summary)."""
    flags = dict(locals())  # first statement: every option, before any other name is bound
    from histodetect.data.store import Store
    from histodetect.runs import build_config
    from histodetect.train.run import train as run_train

    read = {"STORE": store, "--config": config, "--pretrained": _existing(pretrained), "--groups": _existing(groups)}
    check_apart(out, read, folder=True, ours=OWN_RUN)
    if folds is not None and folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds (leave it out for one run)")
    commands = {"store", "out", "preset", "config", "resume", "all_folds", "restart"}
    overrides = {k: v for k, v in flags.items() if k not in commands}
    cfg = build_config(preset=preset, config_file=config, **overrides)
    if all_folds:  # re-running continues by itself: finished folds are kept, an interrupted one resumes
        from histodetect.infer.evaluate import score_rows
        from histodetect.report.compare import terminal_table
        from histodetect.train.crossval import cross_validate

        result = cross_validate(Store(store), out, cfg, score=score_rows, restart=restart)
        if not result:  # a DDP process other than rank zero
            return
        runs = [Path(fold["run"]) for fold in result["folds"]]
        console.print(terminal_table(runs, title=f"{cfg.folds} folds in {out}"))
        console.print(
            f"out-of-fold ROC AUC [bold]{result['oof_auc']:.4f}[/] over {result['oof_patches']:,} patches "
            f"(folds {result['fold_auc_mean']:.4f} ± {result['fold_auc_std']:.4f}): {out / 'cv.json'}"
        )
        if result["test_auc"] is not None:
            console.print(
                f"test ROC AUC [bold]{result['test_auc']:.4f}[/] over {result['test_patches']:,} untouched patches "
                "(the folds' mean prediction)"
            )
        return
    if restart:
        raise UserError("--restart starts --all-folds over; a single run starts over in a new --out")
    summary = run_train(Store(store), out, cfg, resume=resume)
    if not summary:  # a DDP process other than rank zero
        return
    if summary.get("best_val_auc") is None:
        console.print(f"run: [bold]{out}[/]  no validation: the last epoch's weights are kept")
    else:
        console.print(f"run: [bold]{out}[/]  best val AUC {summary['best_val_auc']:.4f}")


@app.command()
@friendly
def tune(
    store: Annotated[Path, typer.Argument(help="A store folder with a labeled split.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the trials, study.db, trials.csv, report.html, best.yaml.")
    ],
    trials: Annotated[int, typer.Option(help="Finished trials the study should hold (re-running continues it).")] = 20,
    space: Annotated[
        str, typer.Option(help="seed (the notebook's 54-point grid) | default | a YAML file of ranges.")
    ] = "default",
    sampler: Annotated[
        str | None, typer.Option(help="tpe | random | grid (default: grid for --space seed, else tpe).")
    ] = None,
    pruner: Annotated[str, typer.Option(help="median | hyperband | none.")] = "median",
    storage: Annotated[
        str | None,
        typer.Option(help="Study database shared by workers, e.g. postgresql://user@host:5432/db (default: sqlite)."),
    ] = None,
    study_name: Annotated[str, typer.Option(help="Study name inside the storage.")] = "histodetect",
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many minutes.")] = None,
    heartbeat: Annotated[int, typer.Option(help="Seconds between a running trial's heartbeats.")] = 60,
    grace: Annotated[
        int | None, typer.Option(help="Seconds of silence after which a trial's worker counts as dead (3x heartbeat).")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Base settings: cpu | gpu.")] = None,
    base_config: Annotated[
        Path | None, typer.Option("--base-config", "--config", help="Base settings from a config.yaml.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="baseline-cnn or any timm model name.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="auto | none | path to weights.")] = None,
    freeze: Annotated[str | None, typer.Option(help="none | frozen | top:K.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per trial.")] = None,
    image_size: Annotated[str | None, typer.Option(help=IMAGE_SIZE_HELP)] = None,
    limit_train: Annotated[int | None, typer.Option(help="Training patches per trial, at most.")] = None,
    epoch_patches: Annotated[int | None, typer.Option(help="Training patches per epoch, drawn afresh.")] = None,
    val_patches: Annotated[int | None, typer.Option(help="Validate on a stratified subset of this size.")] = None,
) -> None:
    """Search training settings with Optuna; resumable, and shared by any number of workers on one --storage."""
    from histodetect.data.store import Store
    from histodetect.report.tuning import write_tuning_report
    from histodetect.runs import build_config
    from histodetect.train.search_space import load_space
    from histodetect.train.tune import Heartbeat
    from histodetect.train.tune import tune as run_tune
    from histodetect.train.tune_results import best_config

    check_apart(
        out, {"STORE": store, "--config": base_config, "--space": _existing(space)}, folder=True, ours=OWN_TUNING
    )
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise UserError(f"--timeout {timeout}: must be a positive number of minutes")
    if trials < 1:
        raise UserError(f"--trials {trials}: must be at least 1")
    base = build_config(
        preset=preset,
        config_file=base_config,
        model=model,
        pretrained=pretrained,
        freeze=freeze,
        epochs=epochs,
        image_size=image_size,
        limit_train=limit_train,
        epoch_patches=epoch_patches,
        val_patches=val_patches,
    )
    searched = load_space(space, base)
    study = run_tune(
        Store(store),
        out,
        base,
        searched,
        trials=trials,
        space_source=space,
        sampler=sampler or ("grid" if space == "seed" else "tpe"),
        pruner=pruner,
        storage=storage,
        study_name=study_name,
        timeout_minutes=timeout,
        heartbeat=Heartbeat(heartbeat, grace if grace is not None else 3 * heartbeat),
        after_trial=write_tuning_report,
    )
    best = best_config(study)
    if best is not None:
        console.print(f"{best.notes}; config: {out / 'best.yaml'}; report: {out / 'report.html'}")


# ---------------------------------------------------------------------------------------------------- use a run
@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    store: Annotated[Path, typer.Argument(help="A labeled store.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json, figures and report.html.")],
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


@app.command()
@friendly
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Table file (.md; an .html is written beside it).")],
) -> None:
    """A results table, one row per run, built from the run folders."""
    from histodetect.report.compare import compare as run_compare
    from histodetect.report.compare import terminal_table

    check_apart(out, {"RUN": runs}, ours=OWN_TABLE)
    check_apart(out.with_suffix(".html"), {"RUN": runs}, option="--out (its .html)", ours=OWN_PAGE)
    run_compare(runs, out)
    console.print(terminal_table(runs))
    console.print(f"full table: [bold]{out}[/] and [bold]{out.with_suffix('.html')}[/]")


@app.command()
@friendly
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="RUN [RUN...] SOURCE: run folders or .onnx files, then a test/ folder, a store, or one image."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Submission CSV (id,label).")],
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


@app.command()
@friendly
def slide(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="RUN... SLIDE_OR_FOLDER...: run folders or .onnx files, then slide files (SVS, NDPI, MIRAX, tiled "
            "TIFF, ... or a PNG/JPEG/TIFF region) and folders of them."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder; each slide goes into OUT/<slide name>/.")],
    slide_mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of level 0, for files that do not record it.")
    ] = None,
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
    workers: Annotated[int | None, typer.Option(help="Reader threads (default: cores - 1, at most 8).")] = None,
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


@app.command()
@friendly
def extract(
    slides: Annotated[list[Path], typer.Argument(help="Slide files (or folders of them) to cut patches from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The store to write (an ordinary histodetect store).")],
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
    slide_mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of level 0, for files that do not record it.")
    ] = None,
    hard_negatives: Annotated[
        Path | None,
        typer.Option(help="A run: add the windows it scores highest, away from tumour, as negatives."),
    ] = None,
    hard_count: Annotated[int, typer.Option(help="Hard negatives per slide.")] = 100,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it is a store.")] = False,
    workers: Annotated[
        int | None, typer.Option(help="Reader threads for scoring (default: cores - 1, at most 8).")
    ] = None,
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


@app.command()
@friendly
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


@app.command()
@friendly
def explain(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files, or a store (its first patches are used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the overlays and the grid.")],
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


@app.command()
@friendly
def export(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .onnx file to write.")],
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


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo makes.")] = Path(
        "demo-output"
    ),
    quick: Annotated[bool, typer.Option(help="Fewer epochs (for tests).")] = False,
) -> None:
    """The whole tool end to end on the real sample shipped with the package."""
    from histodetect.demo import run_demo

    run_demo(out, quick=quick)
