"""Training commands: ``train`` (one run, or every fold) and ``tune`` (a search over training settings).

Each ``TrainConfig`` setting has one ``train`` flag named after its field; the flags ``tune`` takes as well (the
base settings of its trials) are declared once below and used by both, so their names and help cannot drift apart
(tests/cli/test_options.py checks both rules).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from histodetect.cli.common import OWN_RUN, OWN_TUNING, console, out_option
from histodetect.errors import UserError
from histodetect.io import check_apart

LabeledStore = Annotated[Path, typer.Argument(help="A store folder with a labeled split.")]
# The base settings of a run that train and tune both take (tune: its trials' base, which the search space varies).
Preset = Annotated[
    str | None, typer.Option(help="cpu | gpu: start from the best settings for the time on that hardware.")
]
CONFIG_HELP = "Start from a config.yaml (e.g. an earlier run's)."  # tune's flag has a second name, --base-config
Model = Annotated[str | None, typer.Option(help="baseline-cnn or any timm model name.")]
Pretrained = Annotated[str | None, typer.Option(help="auto | none | path to .safetensors/.pth.")]
Freeze = Annotated[str | None, typer.Option(help="none | frozen | top:K.")]
Epochs = Annotated[int | None, typer.Option(help="Epochs to train (in tune: each trial's).")]
ImageSize = Annotated[
    str | None,
    typer.Option(help="Pixels the network sees: 96 = native, or auto = the backbone's pretrained size (224 for most)."),
]
LimitTrain = Annotated[int | None, typer.Option(help="Use at most this many training patches.")]
EpochPatches = Annotated[
    int | None, typer.Option(help="Training patches per epoch, drawn afresh each epoch (default: all).")
]
ValPatches = Annotated[
    int | None, typer.Option(help="Validate each epoch on a stratified subset of this size (default: all).")
]


def _existing(value: str | Path | None) -> Path | None:
    """An option that may name a file (``--pretrained``, ``--groups``, ``--space``): its path when it is one."""
    return Path(value) if value is not None and Path(value).exists() else None


def train(
    store: LabeledStore,
    out: Annotated[Path, out_option("Run folder to write.")],
    preset: Preset = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
    model: Model = None,
    pretrained: Pretrained = None,
    freeze: Freeze = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="Head-only epochs before top:K unfreezes.")] = None,
    backbone_lr_scale: Annotated[
        float | None, typer.Option(help="Learning rate of a pretrained backbone, as a fraction of --lr.")
    ] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout before the head (default 0.3).")] = None,
    image_size: ImageSize = None,
    mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of the patches (default 0.972: PCam/Kaggle); slide uses it.")
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | rmsprop | sgd.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default 1e-4).")] = None,
    momentum: Annotated[float | None, typer.Option(help="Momentum of sgd and rmsprop (default 0.9).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per step (default 64).")] = None,
    epochs: Epochs = None,
    scheduler: Annotated[str | None, typer.Option(help="cosine | onecycle | plateau | none.")] = None,
    lr_warmup_epochs: Annotated[float | None, typer.Option(help="Linear LR warm-up, in epochs.")] = None,
    loss: Annotated[str | None, typer.Option(help="bce | focal.")] = None,
    pos_weight: Annotated[float | None, typer.Option(help="BCE weight of the positive class.")] = None,
    focal_gamma: Annotated[float | None, typer.Option(help="Focal loss focusing (default 2).")] = None,
    focal_alpha: Annotated[float | None, typer.Option(help="Focal loss weight of positives (default 0.25).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing in [0, 1) (default 0).")] = None,
    aug_dihedral: Annotated[
        bool | None,
        typer.Option("--aug-dihedral/--no-aug-dihedral", help="The 8 flips and 90-degree rotations (default on)."),
    ] = None,
    aug_hed: Annotated[float | None, typer.Option(help="H&E colour jitter strength (0 = off).")] = None,
    aug_brightness: Annotated[float | None, typer.Option(help="Brightness jitter (default 0.1; 0 = off).")] = None,
    aug_contrast: Annotated[float | None, typer.Option(help="Contrast jitter (default 0.1; 0 = off).")] = None,
    stain_aug: Annotated[
        float | None,
        typer.Option(
            help="Re-stain half the patches as another lab might: H/E, yellowing, white balance (0 = off; 0.6 best)."
        ),
    ] = None,
    stain_consistency: Annotated[
        float | None,
        typer.Option(
            help="Weight of a loss asking each patch and its re-staining for the same score (0 = off; needs "
            "--stain-aug; steps cost twice as much; 10 measured)."
        ),
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
    folds: Annotated[int | None, typer.Option(help="K-fold cross-validation when > 1 (default 1).")] = None,
    fold: Annotated[int | None, typer.Option(help="The fold held out, 0..K-1 (default 0).")] = None,
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
    limit_train: LimitTrain = None,
    epoch_patches: EpochPatches = None,
    val_patches: ValPatches = None,
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
    seed: Annotated[int | None, typer.Option(help="Seed of the split and the training (default 42).")] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
    devices: Annotated[str | None, typer.Option(help="auto, a count, or a list like 0,1.")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Machines, under a cluster launcher (default 1).")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | 32 | bf16-mixed | 16-mixed.")] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last/--no-channels-last", help="Memory layout (default: on where it helps)."),
    ] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="DataLoader workers (default: chosen from the device).")
    ] = None,
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


def tune(
    store: LabeledStore,
    out: Annotated[Path, out_option("Folder for the trials, study.db, trials.csv, report.html, best.yaml.")],
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
    preset: Preset = None,
    base_config: Annotated[Path | None, typer.Option("--base-config", "--config", help=CONFIG_HELP)] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    freeze: Freeze = None,
    epochs: Epochs = None,
    image_size: ImageSize = None,
    limit_train: LimitTrain = None,
    epoch_patches: EpochPatches = None,
    val_patches: ValPatches = None,
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
