"""``histodetect demo``: the whole tool on the real sample shipped inside the package.

Ingest -> EDA report -> train two models (a baseline CNN from scratch; a pretrained EfficientNet-Lite0, head first,
then its top stages) -> evaluate each -> comparison table -> Grad-CAM -> ONNX export -> a submission for the
sample's test patches with test-time augmentation -> a small slide, built from the patches the run held out, scored
as ``histodetect slide`` scores one (heatmap, GeoJSON, summary, lesions against its outlines) -> the web app, started
on loopback for a moment to answer ``/health`` and one ``/predict``. Sized to finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from histodetect.io import check_output_dir
from histodetect.sample import sample_dir

if TYPE_CHECKING:
    from histodetect.data.store import Store

MARKER = ".histodetect-demo"
SLIDE_GRID = (10, 12)  # patch places of the demo's slide: about 70 of tissue, seconds to score


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
    from histodetect.runs import TrainConfig
    from histodetect.runs.layout import evaluation_file
    from histodetect.train.run import train

    console = Console(stderr=True)
    out = Path(out)
    _prepare(out)
    sample = sample_dir()
    started = time.perf_counter()
    outputs: dict[str, Path] = {}

    def step(title: str) -> None:
        console.rule(f"[bold]{title}[/]  ({time.perf_counter() - started:.0f}s)")

    step("1/9 ingest the embedded sample")
    result = ingest(sample, out / "store", progress=False)
    if result.exit_code != 0:
        raise RuntimeError(f"the embedded sample failed its checks; see {result.report_path}")
    store = Store(out / "store")
    outputs["store"] = store.path

    step("2/9 exploratory report")
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
        step(f"3/9 train {name} ({i + 1}/{len(recipes)})")
        run = out / "runs" / name
        train(store, run, config)
        runs.append(run)

    step("4/9 evaluate each run on its held-out patches (d4 TTA)")
    for run in runs:
        evaluate(run, store.path, evaluation_file(run, "val").parent, split="val", tta="d4")
    outputs["comparison"] = out / "results.md"
    compare(runs, outputs["comparison"])
    console.print(terminal_table(runs))

    step("5/9 Grad-CAM on sample patches of both classes")
    best = runs[-1]
    outputs["explain"] = out / "explain"
    explain(best, [store.path], outputs["explain"], limit=8)

    step("6/9 export to ONNX")
    outputs["onnx"] = out / "model.onnx"
    export_onnx(best, outputs["onnx"], check_store=store.path)

    step("7/9 a submission for the test patches (both runs, d4 TTA)")
    outputs["submission"] = out / "submission.csv"
    predict(
        runs,
        sample / "test",
        outputs["submission"],
        sample_submission=sample / "sample_submission.csv",
        tta="d4",
    )

    step("8/9 score a slide made of held-out patches")
    outputs["slide"], slide_summary = score_demo_slide(store, best, out / "slide")
    console.print(_describe_slide(slide_summary), highlight=False)

    step("9/9 the app on loopback: /health and one /predict")
    answers = ask_the_app(best, sorted((sample / "test").iterdir())[0])
    console.print(
        f"/health: {answers['health']['status']}; /predict {answers['predict'][0]['filename']}: "
        f"P(tumour) {answers['predict'][0]['probability']:.3f}",
        highlight=False,
    )

    console.print(outputs_table({**outputs, **{f"run {r.name}": r for r in runs}}, time.perf_counter() - started))
    console.print(
        f"Look at {outputs['eda']}, {out / 'results.html'} and the slide's "
        f"{outputs['slide'] / 'heatmap.png'} (its tumour.geojson opens in QuPath). To try the page: "
        f"histodetect serve {best}  (then open the address it prints)",
        highlight=False,
        soft_wrap=True,
    )
    return outputs


def outputs_table(outputs: dict[str, Path], seconds: float) -> Table:
    """Where each output is; a path folds onto a second line rather than lose its end in a narrow terminal."""
    table = Table(title=f"histodetect demo finished in {seconds:.0f}s")
    table.add_column("output", no_wrap=True)
    table.add_column("where", overflow="fold")
    for key, value in outputs.items():
        table.add_row(key, str(value))
    return table


def score_demo_slide(store: Store, run: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """A slide of the run's validation patches (never trained on: a fair picture), normal tissue with 1-3 outlined
    lesions (:func:`~histodetect.data.mosaic.build_cohort`), scored into ``out/scored/<slide>/`` with its outlines;
    returns that folder and the slide's summary. The cascade scores coarse windows first, as a user would on a big
    slide, which keeps this step to seconds."""
    from histodetect.data.mosaic import build_cohort
    from histodetect.infer.engine import Predictor
    from histodetect.infer.slide_batch import score_slides
    from histodetect.runs.layout import held_out_rows

    rows = held_out_rows(run, store)
    (slide,) = build_cohort(
        out, store.read(rows), store.labels[rows], tumour_slides=1, normal_slides=0, grid=SLIDE_GRID
    )
    predictor = Predictor([run], progress=False)
    (row,) = score_slides(
        predictor, [slide.path], out / "scored", annotations=slide.annotations, cascade=True, progress=False
    )
    if "error" in row:
        raise RuntimeError(f"the demo's slide could not be scored: {row['error']}")
    return out / "scored" / slide.name, row


def _describe_slide(summary: dict[str, Any]) -> str:
    return (
        f"{summary['cells_scored']:,} tissue cells scored, {summary['cells_at_or_above_threshold']:,} at P >= 0.5, "
        f"slide score {summary['slide_score'] or 0:.3f}; {summary['lesions_found']} of {summary['lesions']} "
        f"outlined lesion(s) found, {summary['false_positives']} false positive(s)"
    )


def ask_the_app(run: Path, patch: Path) -> dict[str, Any]:
    """Serve ``run`` on a free loopback port with a one-off token, ask ``/health`` and ``/predict`` (``patch``, as
    a multipart upload, as the page sends it), stop it and return both answers."""
    import httpx

    from histodetect.app.server import LOOPBACK_HOSTS, serving_in_thread
    from histodetect.app.settings import Settings

    token = secrets.token_urlsafe(16)
    settings = Settings((run,), token=token, allowed_hosts=LOOPBACK_HOSTS)
    with serving_in_thread(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/health")
        health.raise_for_status()
        answer = client.post(
            "/predict",
            files=[("files", (patch.name, patch.read_bytes(), "image/tiff"))],
            headers={"Authorization": f"Bearer {token}"},
        )
        answer.raise_for_status()
    return {"health": health.json(), "predict": answer.json()}
