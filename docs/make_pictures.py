"""Remake the pictures of the README and the docs from a trained run, so anyone can check or refresh them.

    python docs/make_pictures.py RUN STORE [--out docs] [--work DIR]

RUN should be a CPU-preset run with a held-out test part, e.g.
``histodetect train STORE --out RUN --preset cpu --test-fraction 0.2 --val-fraction 0 --seed 42`` on the shared
5,000-patch subset. Every picture is made from patches the run never trained on (its ``test`` part):

- ``report.png``: the top of ``evaluate RUN STORE --split test --tta d4``'s ``report.html``;
- ``slide-heatmap.png``: a slide built from those patches (``data.mosaic.build_cohort``: normal tissue with lesions
  of real tumour patches, outlined in ASAP XML) scored by ``slide --annotations``: ``heatmap.png`` beside the slide
  with the regions of ``tumour.geojson`` (and the true outlines);
- ``webapp.png``: the page of ``serve RUN`` in Chromium (Playwright, ``/usr/bin/chromium``: nothing is downloaded)
  after three held-out patches, a file that is not an image and a region were dropped on it;
- ``cohort-report.png``: the top of the ``report.html`` that ``slide --annotations --reference`` writes for a cohort
  of 12 tumour and 12 normal slides built from those patches.

``--pictures report slide`` remakes only those.

It prints JSON naming the run (model, preset, seed, epochs, the store) and what each picture shows. Pictures are
saved with 256 colours, small enough for a repository.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histodetect.data.mosaic import build_cohort
from histodetect.data.store import Store
from histodetect.runs.layout import held_out_rows, read_summary
from histodetect.runs.loading import load_config

CHROMIUM = "/usr/bin/chromium"
SLIDE_SEED = 10  # a draw whose slide holds three lesions


def histodetect(*args: str | Path) -> str:
    """Runs one command as a user would, failing loudly; returns what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "histodetect", *map(str, args)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"histodetect {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def save_small(png: bytes | Image.Image, target: Path) -> int:
    """Saves ``png`` with 256 colours; returns its size in bytes."""
    image = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
    image.convert("RGB").quantize(256).save(target, optimize=True)
    return target.stat().st_size


def report_picture(run: Path, store: Store, work: Path, target: Path, browser: Any) -> dict[str, Any]:
    """The evaluation report of the run's held-out test patches, as a browser shows its top."""
    out = work / "evaluation"
    histodetect("evaluate", run, store.path, "--split", "test", "--tta", "d4", "--out", out)
    page = browser.new_page(viewport={"width": 1100, "height": 1500})
    page.goto((out / "report.html").as_uri())
    size = save_small(page.screenshot(), target)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"file": target.name, "bytes": size, "split": "test", "tta": "d4", "roc_auc": metrics.get("roc_auc")}


def slide_picture(run: Path, store: Store, work: Path, target: Path, browser: Any) -> dict[str, Any]:
    """One slide of real held-out patches with three lesions, scored; the heatmap beside the outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    rows = held_out_rows(run, store, "test")
    slides = build_cohort(  # the lesions' tumour patches and the normal tissue around them: all held out
        work / "cohort", store.read(rows), store.labels[rows], tumour_slides=1, normal_slides=0,
        grid=(14, 20), lesion_patches=(6, 14), seed=SLIDE_SEED,
    )  # fmt: skip
    slide = slides[0]
    out = work / "slides"
    histodetect("slide", run, slide.path, "--out", out, "--annotations", slide.annotations)
    folder = out / slide.name
    summary = json.loads((folder / "summary.json").read_text())
    heatmap = Image.open(folder / "heatmap.png").convert("RGB")
    pixels = np.asarray(Image.open(slide.path).convert("RGB"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=90)
    left.imshow(heatmap)
    left.set_title("heatmap.png")
    right.imshow(pixels)
    right.set_title("tumour.geojson (yellow) over the slide; the true outlines (green)")
    for feature in json.loads((folder / "tumour.geojson").read_text())["features"]:
        for ring in _rings(feature["geometry"]):
            right.add_patch(Polygon(ring, fill=False, edgecolor="yellow", linewidth=1.6))
    for feature in json.loads((folder / "lesions.geojson").read_text())["features"]:
        for ring in _rings(feature["geometry"]):
            right.add_patch(Polygon(ring, fill=False, edgecolor="lime", linewidth=1.0, linestyle="--"))
    for axis in (left, right):
        axis.set_axis_off()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    size = save_small(buffer.getvalue(), target)
    keys = ("slide_score", "slide_positive", "cell_roc_auc", "lesions", "lesions_found", "false_positives")
    return {"file": target.name, "bytes": size, "slide": slide.name, **{k: summary.get(k) for k in keys}}


def _rings(geometry: dict[str, Any]) -> list[np.ndarray]:
    """The outer rings of a GeoJSON Polygon or MultiPolygon, as (x, y) arrays."""
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [np.asarray(polygon[0]) for polygon in polygons]


def webapp_picture(run: Path, store: Store, work: Path, target: Path, browser: Any) -> dict[str, Any]:
    """The page after two tumour and one normal held-out patch (drawn at random, seed 0), a text file and a 2x2
    region were dropped on it."""
    from playwright.sync_api import Error as PlaywrightError

    rows = held_out_rows(run, store, "test")
    labels = store.labels[rows]
    rng = np.random.default_rng(0)
    tumour, normal = rng.choice(rows[labels == 1], 2, replace=False), rng.choice(rows[labels == 0])
    chosen = [tumour[0], normal, tumour[1]]
    files = []
    for k, row in enumerate(chosen):
        files.append(work / f"patch-{k + 1}.png")
        Image.fromarray(store.read(np.array([row]))[0]).save(files[-1])
    bad = work / "notes.png"
    bad.write_bytes(b"this is not an image")
    tiles = store.read(rows[:4])
    region = work / "region.png"
    Image.fromarray(np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)])).save(region)
    env = {**os.environ, "HISTODETECT_TOKEN": "pictures"}
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "histodetect", "serve", str(run), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        printed = next((line for line in server.stdout if "?token=" in line), "")
        address = re.search(r"http://\S+\?token=\S+", printed)
        if address is None:
            raise SystemExit(f"serve did not start: {printed}{server.stdout.read()}")
        page = browser.new_page(viewport={"width": 860, "height": 760})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the address is printed as the socket opens
            try:
                page.goto(address.group())
                break
            except PlaywrightError:  # not listening yet
                time.sleep(0.5)
        names = [f.name for f in files]
        page.locator("#patches").set_input_files([str(f) for f in files])
        for path in files:
            card = page.locator(".card", has_text=path.name)
            card.locator("img[alt='Grad-CAM of the patch']").wait_for(timeout=60_000)
        page.locator("#patches").set_input_files(str(bad))
        page.locator(".card", has_text="notes.png").locator(".error").wait_for(timeout=30_000)
        page.locator("#region").set_input_files(str(region))
        page.locator("#region-result img").wait_for(timeout=60_000)
        shown = {name: page.locator(".card", has_text=name).locator(".probability").inner_text() for name in names}
        size = save_small(page.screenshot(full_page=True), target)
    finally:
        server.terminate()
        server.wait(timeout=20)
    truth = [int(store.labels[r]) for r in chosen]
    return {"file": target.name, "bytes": size, "labels": dict(zip(names, truth, strict=True)), "shown": shown}


def cohort_picture(run: Path, store: Store, work: Path, target: Path, browser: Any) -> dict[str, Any]:
    """A Camelyon16-style cohort of held-out patches judged by ``slide``; the top of its report page."""
    rows = held_out_rows(run, store, "test")
    cohort = work / "cohort24"
    build_cohort(cohort, store.read(rows), store.labels[rows], tumour_slides=12, normal_slides=12, grid=(12, 16))
    out = work / "judged"
    histodetect("slide", run, cohort / "slides", "--out", out, "--annotations", cohort / "annotations",
                "--reference", cohort / "reference.csv")  # fmt: skip
    page = browser.new_page(viewport={"width": 1000, "height": 1500})
    page.goto((out / "report.html").as_uri())
    size = save_small(page.screenshot(), target)
    judged = json.loads((out / "cohort.json").read_text())
    slide, lesion = judged["slide"], judged["lesion"]
    keys = ("roc_auc", "correct", "slides")
    return {"file": target.name, "bytes": size, **{k: slide.get(k) for k in keys}, "froc": lesion.get("froc")}


# Each takes (run, store, work folder, target file, browser) and returns what its picture shows.
PICTURES = {"report": report_picture, "slide": slide_picture, "webapp": webapp_picture, "cohort": cohort_picture}
FILES = {"report": "report.png", "slide": "slide-heatmap.png", "webapp": "webapp.png", "cohort": "cohort-report.png"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--work", type=Path, default=None, help="keep the intermediate outputs here")
    parser.add_argument("--pictures", nargs="+", choices=sorted(PICTURES), default=list(PICTURES))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    store = Store(args.store)
    config = load_config(args.run)
    summary = read_summary(args.run)
    made: dict[str, Any] = {
        "run": str(args.run),
        "model": config.model,
        "preset": config.preset,
        "seed": config.seed,
        "epochs_run": summary.get("epochs_run"),
        "store": str(args.store),
        "test_patches": int(summary.get("n_test") or 0),
    }
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            for name in args.pictures:
                made[name] = PICTURES[name](args.run, store, work, args.out / FILES[name], browser)
        finally:
            browser.close()
    print(json.dumps(made, indent=2))


if __name__ == "__main__":
    main()
