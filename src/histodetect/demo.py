"""``histodetect demo``: the whole tool on the real sample shipped inside the package.

Ingest -> EDA report -> train two models (a baseline CNN from scratch; a pretrained EfficientNet-Lite0, head first,
then its top stages) -> evaluate each -> comparison table -> Grad-CAM -> ONNX export -> a submission for the
sample's test patches with test-time augmentation. Sized to finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from histodetect.io import check_output_dir
from histodetect.sample import sample_dir

MARKER = ".histodetect-demo"


def _prepare(out: Path) -> None:
    """Start from an empty folder; only a previous demo's folder is ever removed."""
    check_output_dir(out)  # a file, a FIFO or a link that leads nowhere: one line
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(f"{out}: exists and is not a previous demo's folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `histodetect demo`; safe to delete\n")


def run_demo(out: str | Path, *, quick: bool = False) -> dict[str, Path]:
    from histodetect.data.ingest import ingest
    from histodetect.data.store import Store
    from histodetect.infer.evaluate import evaluate
    from histodetect.infer.explain import explain
    from histodetect.infer.export import export_onnx
    from histodetect.infer.predict import predict
    from histodetect.report.compare import compare, terminal_table
    from histodetect.report.eda import write_eda
    from histodetect.train.config import TrainConfig
    from histodetect.train.run import train

    console = Console(stderr=True)
    out = Path(out)
    _prepare(out)
    sample = sample_dir()
    started = time.perf_counter()
    outputs: dict[str, Path] = {}

    def step(title: str) -> None:
        console.rule(f"[bold]{title}[/]  ({time.perf_counter() - started:.0f}s)")

    step("1/7 ingest the embedded sample")
    result = ingest(sample, out / "store", progress=False)
    if result.exit_code != 0:
        raise RuntimeError(f"the embedded sample failed its checks; see {result.report_path}")
    store = Store(out / "store")
    outputs["store"] = store.path

    step("2/7 exploratory report")
    outputs["eda"] = write_eda(store, out / "eda")

    # The sample has 192 training patches: epochs are seconds long, so both recipes get enough of them.
    epochs = 2 if quick else 25
    recipes = {
        "baseline-cnn": TrainConfig(model="baseline-cnn", epochs=epochs, batch_size=32, lr=2e-3, patience=0),
        "efficientnet-lite0": TrainConfig(
            model="tf_efficientnet_lite0",
            pretrained="auto",
            freeze="top:2",
            warmup_epochs=1 if quick else 3,
            backbone_lr_scale=0.3,
            image_size=128,
            epochs=epochs,
            batch_size=32,
            lr=1e-3,
            patience=0,
        ),
    }
    runs: list[Path] = []
    for i, (name, config) in enumerate(recipes.items()):
        step(f"3/7 train {name} ({i + 1}/{len(recipes)})")
        run = out / "runs" / name
        train(store, run, config)
        runs.append(run)

    step("4/7 evaluate on each run's held-out patches (d4 test-time augmentation)")
    for run in runs:
        evaluate(run, store.path, run / "evaluation" / "val", split="val", tta="d4")
    outputs["comparison"] = out / "results.md"
    compare(runs, outputs["comparison"])
    console.print(terminal_table(runs))

    step("5/7 Grad-CAM on sample patches of both classes")
    best = runs[-1]
    outputs["explain"] = out / "explain"
    explain(best, [store.path], outputs["explain"], limit=8)

    step("6/7 export to ONNX")
    outputs["onnx"] = out / "model.onnx"
    export_onnx(best, outputs["onnx"], check_store=store.path)

    step("7/7 predict a submission for the test patches (ensemble of both runs, d4 TTA)")
    outputs["submission"] = out / "submission.csv"
    predict(
        runs,
        sample / "test",
        outputs["submission"],
        sample_submission=sample / "sample_submission.csv",
        tta="d4",
    )

    summary = Table(title=f"histodetect demo finished in {time.perf_counter() - started:.0f}s", show_lines=False)
    summary.add_column("output")
    summary.add_column("where")
    for key, value in {**outputs, **{f"run {r.name}": r for r in runs}}.items():
        summary.add_row(key, str(value))
    console.print(summary)
    return outputs
