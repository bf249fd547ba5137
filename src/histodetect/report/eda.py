"""The exploratory report of a store: what is in it, what it looks like, and what ingest found wrong with it.

Everything that needs pixels is computed on a seeded sample (at most :data:`SAMPLE_SIZE` patches, shared
evenly between negatives, positives and unlabeled patches) read in sorted chunks from the memory map, so the
report takes seconds on the full 220,025-patch store and never holds more than one chunk of pixels in RAM.
Counts, label balance and duplicates come from the index and cover every patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from histodetect.data.problems import KINDS
from histodetect.data.store import Store
from histodetect.errors import UserError
from histodetect.report.figures import (
    CLASS_COLORS,
    CLASS_NAMES,
    INK,
    NEG_COLOR,
    POS_COLOR,
    UNLABELED,
    UNLABELED_COLOR,
    class_hist,
    class_legend,
    draw_centre_box,
    patch_grid,
    styled,
)
from histodetect.report.html import Card, Page, Section

SAMPLE_SIZE = 5000  # patches behind the colour, mean-image and brightness figures
GRID_PER_CLASS = 16  # example patches per class: two rows of eight
CHUNK = 512  # patches per read from the memory map (~14 MB)
NEAR_WHITE = 220  # a pixel with every channel at or above this is glass or background, not tissue
BLANK_FRACTION = 0.8  # a patch this much near-white shows hardly any tissue
DARK_MEAN = 30  # a patch darker than this on average is black (a scanner or export artefact)
PROBLEM_COLUMNS = ["kind", "severity", "split", "id", "file", "detail"]
MAX_LISTED = 50  # rows of problems and duplicate groups listed in full
GROUP_ORDER = (0, 1, UNLABELED)
SPLIT_ORDER = ("train", "val", "valid", "test")  # the usual ones first, any others after, by name


@dataclass
class GroupStats:
    """Pixel statistics of the sampled patches of one class (or of the unlabeled ones)."""

    label: int
    channel_hist: np.ndarray  # (3, 256) pixel counts per RGB value
    mean_image: np.ndarray  # (H, W, 3) float, 0..255
    brightness: np.ndarray  # (n,) mean RGB value of each patch
    saturation: np.ndarray  # (n,) mean HSV saturation of each patch, 0..1
    near_white: np.ndarray  # (n,) fraction of near-white pixels in each patch

    @property
    def n(self) -> int:
        return len(self.brightness)


def write_eda(store: Store, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write ``out_dir/index.html`` (and its figures as PNGs) describing ``store``; return the page's path."""
    if seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")
    rng = np.random.default_rng(seed)
    groups = [g for g in GROUP_ORDER if np.any(store.labels == g)]
    report = _report(store)
    problems = problems_frame(report)
    duplicates = duplicate_groups(store.index)
    splits = split_table(store)

    page = Page(out_dir, f"Exploring {store.path.name}", _subtitle(store))
    page.cards(_headline(store, problems, duplicates))
    _splits_section(page.section("Splits and label balance", _SPLITS_INTRO), splits)
    _examples_section(page.section("What the patches look like", _EXAMPLES_INTRO), store, groups, rng)
    stats = [group_stats(store, g, rows) for g, rows in sample_rows(store, groups, rng).items()]
    _colour_section(page.section("Colour by class", _COLOUR_INTRO), stats)
    _background_section(page.section("Brightness and background", _BACKGROUND_INTRO), stats)
    _integrity_section(page.section("Integrity", _INTEGRITY_INTRO), ingest_summary(report), problems, duplicates)
    return page.write("index.html")


_SPLITS_INTRO = (
    "How many patches each split holds and how the labels are balanced. A strong imbalance changes what "
    "accuracy means (always answering 'negative' would already score the negative share), which is why "
    "models here are compared on ROC AUC."
)
_EXAMPLES_INTRO = (
    f"{GRID_PER_CLASS} random patches of each class (seeded). The label only describes the outlined "
    "centre: it is positive when the central 32x32 pixels hold at least one pixel of tumour. Tumour in "
    "the outer ring does not count, so some negatives show tumour at their edges; the ring is there for "
    "context (and so that models without padding can still see the centre)."
)
_COLOUR_INTRO = (
    "H&E stains nuclei purple (haematoxylin) and cytoplasm and stroma pink (eosin). Tumour tissue is "
    "crowded with large nuclei, so positives tend to be darker and more purple; differences that exist only "
    "between slides or scanners are a warning that a model may learn the stain instead of the tissue."
)
_BACKGROUND_INTRO = (
    "Patches cut at the edge of the tissue are mostly glass: near-white and unsaturated. They are almost "
    "always negative and easy, but they take up training time and inflate accuracy."
)
_INTEGRITY_INTRO = (
    "What ingest found wrong with the source files (every problem is listed in report.json in the store) and "
    "patches whose pixels are identical (same SHA-1), which would leak between training and validation."
)


def _report(store: Store) -> dict[str, Any]:
    """The store's ingest report; an unreadable one becomes a single entry saying so, not a crash."""
    try:
        return store.report
    except ValueError as exc:  # json.JSONDecodeError
        return {"report.json": f"unreadable ({exc})"}


def _subtitle(store: Store) -> str:
    manifest = store.manifest
    parts = [str(store.path), f"source: {manifest.get('source', 'unknown')}"]
    if manifest.get("created"):
        parts.append(f"created {manifest['created']}")
    return " · ".join(parts)


def _headline(store: Store, problems: pd.DataFrame, duplicates: pd.DataFrame) -> list[Card]:
    labels = store.labels
    labeled = int(np.sum(labels != UNLABELED))
    positive = int(np.sum(labels == 1))
    share = f"{100 * positive / labeled:.1f}%" if labeled else "—"
    return [
        Card("Patches", f"{len(store):,}", f"{len(store.splits)} split(s)"),
        Card("Labeled", f"{labeled:,}", f"{labeled - positive:,} negative", "neg"),
        Card("Unlabeled", f"{len(store) - labeled:,}", "no label known"),
        Card("Positive", share, f"{positive:,} of the labeled", "pos"),
        Card("Problems at ingest", f"{len(problems):,}", "see Integrity", "warn" if len(problems) else "good"),
        Card(
            "Duplicate groups",
            f"{len(duplicates):,}",
            "identical pixels",
            "warn" if len(duplicates) else "good",
        ),
    ]


# ------------------------------------------------------------------------------------------------ tables
def split_table(store: Store) -> pd.DataFrame:
    """Per split: patches, labeled, unlabeled, negative, positive and positive share (of the labeled).

    Splits the manifest names but the index has no rows for are kept as zeros, so an empty split is visible.
    """
    names = sorted(
        set(store.splits) | set(store.manifest.get("splits") or {}),
        key=lambda name: (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name),
    )
    rows = []
    for name in names:
        labels = store.labels[store.index["split"].to_numpy() == name]
        labeled = int(np.sum(labels != UNLABELED))
        positive = int(np.sum(labels == 1))
        rows.append(
            {
                "split": name,
                "patches": len(labels),
                "labeled": labeled,
                "unlabeled": len(labels) - labeled,
                "negative": labeled - positive,
                "positive": positive,
                "positive %": round(100 * positive / labeled, 1) if labeled else float("nan"),
            }
        )
    return pd.DataFrame(
        rows, columns=["split", "patches", "labeled", "unlabeled", "negative", "positive", "positive %"]
    )


def problems_frame(report: dict[str, Any]) -> pd.DataFrame:
    """The ingest report's problems as a table with :data:`PROBLEM_COLUMNS`; absent keys become empty text.

    Tolerant on purpose: the report is written by ingest, and a report from another version (or none) must
    still give a readable page rather than an exception.
    """
    problems = report.get("problems") if isinstance(report, dict) else None
    if not isinstance(problems, list):
        problems = []
    records = [
        {col: "" if p.get(col) is None else str(p.get(col)) for col in PROBLEM_COLUMNS}
        for p in problems
        if isinstance(p, dict)
    ]
    return pd.DataFrame(records, columns=PROBLEM_COLUMNS)


def duplicate_groups(index: pd.DataFrame) -> pd.DataFrame:
    """Groups of rows sharing a pixel SHA-1, largest first, with their ids, splits and labels."""
    columns = ["sha1", "copies", "ids", "splits", "labels", "labels disagree"]
    sha = index[index["sha1"].astype(str) != ""]
    shared = sha[sha.duplicated("sha1", keep=False)]
    rows = []
    for sha1, part in shared.groupby("sha1", sort=False):
        labels = sorted({CLASS_NAMES[int(v)] for v in part["label"]})
        known = {int(v) for v in part["label"] if int(v) != UNLABELED}
        rows.append(
            {
                "sha1": str(sha1)[:12],
                "copies": len(part),
                "ids": ", ".join(part["id"].astype(str).head(4)) + (" …" if len(part) > 4 else ""),
                "splits": ", ".join(sorted(set(part["split"].astype(str)))),
                "labels": ", ".join(labels),
                "labels disagree": "yes" if len(known) > 1 else "no",
            }
        )
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("copies", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ sampling
def sample_rows(store: Store, groups: list[int], rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Sorted rows of a seeded sample per group, :data:`SAMPLE_SIZE` shared evenly between the groups."""
    quota = SAMPLE_SIZE // max(len(groups), 1)
    return {g: _choose(np.flatnonzero(store.labels == g), quota, rng) for g in groups}


def example_rows(store: Store, groups: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Sorted rows of :data:`GRID_PER_CLASS` random patches of each group, for the example grid."""
    return [_choose(np.flatnonzero(store.labels == g), GRID_PER_CLASS, rng) for g in groups]


def _choose(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=min(k, len(rows)), replace=False))


def group_stats(store: Store, label: int, rows: np.ndarray) -> GroupStats:
    """Pixel statistics of ``rows`` (sorted), read :data:`CHUNK` patches at a time."""
    hist = np.zeros((3, 256), dtype=np.int64)
    total = np.zeros(store.patch_shape, dtype=np.float64)
    brightness, saturation, near_white = [], [], []
    for start in range(0, len(rows), CHUNK):
        x = store.read(rows[start : start + CHUNK])
        for c in range(3):
            hist[c] += np.bincount(x[..., c].ravel(), minlength=256)
        total += x.sum(axis=0, dtype=np.float64)
        brightness.append(x.mean(axis=(1, 2, 3)))
        hi = x.max(axis=3).astype(np.float32)
        lo = x.min(axis=3)
        saturation.append(((hi - lo) / np.maximum(hi, 1.0)).mean(axis=(1, 2)))
        near_white.append((lo >= NEAR_WHITE).mean(axis=(1, 2)))
    return GroupStats(
        label=label,
        channel_hist=hist,
        mean_image=total / max(len(rows), 1),
        brightness=np.concatenate(brightness) if brightness else np.zeros(0),
        saturation=np.concatenate(saturation) if saturation else np.zeros(0),
        near_white=np.concatenate(near_white) if near_white else np.zeros(0),
    )


# ------------------------------------------------------------------------------------------------ sections
def _splits_section(section: Section, splits: pd.DataFrame) -> None:
    if len(splits) == 0:
        section.note("This store holds no patches.", "warn")
        return
    section.figure(
        split_balance_figure(splits),
        "splits",
        "Patches per split, coloured by label. Bars are counts; the numbers at the right end are the "
        "positive share of the labeled patches.",
    )
    section.table(splits)


def _examples_section(section: Section, store: Store, groups: list[int], rng: np.random.Generator) -> None:
    if not groups:
        section.note("No patches to show.")
        return
    picks = example_rows(store, groups, rng)
    patches = np.concatenate([store.read(rows) for rows in picks])
    colors = [CLASS_COLORS[g] for g, rows in zip(groups, picks, strict=True) for _ in rows]
    section.figure(
        patch_grid(patches, frame_colors=colors, legend=groups),
        "examples",
        "Frame colour = label; the box marks the centre region the label is about. Look for dense, purple, "
        "irregular nuclei inside the box of positives, and for blank or blurred patches in either class.",
        wide=True,
    )


def _colour_section(section: Section, stats: list[GroupStats]) -> None:
    if not stats:
        section.note("No patches to measure.")
        return
    n = ", ".join(f"{s.n:,} {CLASS_NAMES[s.label]}" for s in stats)
    section.figure(
        channel_histogram_figure(stats),
        "colour_histograms",
        f"Share of pixels at each value of R, G and B, per class (sample: {n}). Bumps above 200 are glass "
        "and background, the broad hump below is stained tissue. Look at how much background each class "
        "carries, and whether unlabeled (test) patches follow the labeled curves: a shift means a stain or "
        "scanner difference the model has not seen.",
        wide=True,
    )
    section.figure(
        mean_image_figure(stats),
        "mean_images",
        "Average patch per class, and where positives differ from negatives (mean over R, G, B). Orange: "
        "positives darker; purple: positives lighter. A difference concentrated in the box means the label "
        "really is about the centre; one spread evenly means whole tumour regions differ from normal tissue.",
        wide=True,
    )


def _background_section(section: Section, stats: list[GroupStats]) -> None:
    if not stats:
        section.note("No patches to measure.")
        return
    section.figure(
        intensity_figure(stats),
        "brightness",
        "Per-patch mean brightness and saturation, by class. Patches to the far right of brightness and "
        "the far left of saturation are mostly glass: check how many there are and which class they carry.",
        wide=True,
    )
    section.table(background_table(stats), "Counted on the sample above; shares are of each class's sample.")


def background_table(stats: list[GroupStats]) -> pd.DataFrame:
    """Per class: sampled patches, mostly-background (near-white) patches and black patches."""
    rows = []
    for s in stats:
        blank = int(np.sum(s.near_white >= BLANK_FRACTION))
        dark = int(np.sum(s.brightness < DARK_MEAN))
        rows.append(
            {
                "class": CLASS_NAMES[s.label],
                "sampled": s.n,
                f"≥{BLANK_FRACTION:.0%} near-white": blank,
                "near-white %": round(100 * blank / max(s.n, 1), 1),
                f"black (mean < {DARK_MEAN})": dark,
                "median brightness": round(float(np.median(s.brightness)), 1) if s.n else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def ingest_summary(report: dict[str, Any]) -> pd.DataFrame:
    """The report's plain values (source, status, counts), one level of nesting flattened as ``a.b``.

    Whatever keys this ingest version wrote are shown; lists (the problems themselves) have their own tables.
    """
    items: dict[str, Any] = {}
    for key, value in report.items() if isinstance(report, dict) else []:
        nested = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in nested:
            if isinstance(v, str | int | float | bool):
                items[key if sub is None else f"{key}.{sub}"] = v
    return pd.DataFrame({"item": list(items), "value": [str(v) for v in items.values()]})


def _integrity_section(
    section: Section, summary: pd.DataFrame, problems: pd.DataFrame, duplicates: pd.DataFrame
) -> None:
    if len(summary):
        section.table(summary, "What ingest recorded about this store (report.json).")
    if len(problems) == 0:
        section.note("Ingest reported no problems.", "good")
    else:
        by_kind = problems.groupby(["kind", "severity"], sort=True).size().reset_index(name="count")
        # a store from an older version may name a kind the table no longer holds: shown without a meaning
        by_kind["meaning"] = [KINDS[k].meaning if k in KINDS else "" for k in by_kind["kind"]]
        section.table(by_kind.sort_values("count", ascending=False, kind="stable"), "Problems at ingest by kind.")
        section.table(
            problems.head(MAX_LISTED),
            f"The first {min(MAX_LISTED, len(problems))} of {_count(len(problems), 'problem')} (all are in "
            "report.json).",
        )
    if len(duplicates) == 0:
        section.note("No two patches in the store share their pixels (SHA-1).", "good")
    else:
        conflicts = int((duplicates["labels disagree"] == "yes").sum())
        section.note(
            f"{_count(len(duplicates), 'group')} of patches with identical pixels, {conflicts} with "
            "disagreeing labels. Keep each group on one side of any train/validation split.",
            "warn",
        )
        section.table(duplicates.head(MAX_LISTED), f"The largest {_count(min(MAX_LISTED, len(duplicates)), 'group')}.")
    reported = problems[problems["kind"] == "duplicate_pixels"]
    if len(reported):
        section.table(
            reported.head(MAX_LISTED),
            f"{_count(len(reported), 'duplicate_pixels problem')} found by ingest (files with the pixels of "
            "another file).",
        )


# ------------------------------------------------------------------------------------------------ figures
@styled
def split_balance_figure(splits: pd.DataFrame) -> Figure:
    """Horizontal stacked bars per split: negative, positive, unlabeled."""
    fig = Figure(figsize=(7.5, 0.55 * len(splits) + 1.1), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(splits))
    left = np.zeros(len(splits))
    for column, color in (("negative", NEG_COLOR), ("positive", POS_COLOR), ("unlabeled", UNLABELED_COLOR)):
        values = splits[column].to_numpy(dtype=float)
        ax.barh(y, values, left=left, color=color, label=column, height=0.6)
        left += values
    for yi, total, share in zip(y, left, splits["positive %"], strict=True):
        text = f"{int(total):,}" + ("" if np.isnan(share) else f"  ({share:.1f}% pos)")
        ax.annotate(text, (total, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8.5)
    ax.set_yticks(y, splits["split"])
    ax.invert_yaxis()
    ax.set_xlabel("patches")
    ax.set_xlim(0, max(left.max(), 1) * 1.25)
    ax.grid(axis="y", visible=False)
    fig.legend(loc="outside upper center", ncol=3)
    return fig


@styled
def channel_histogram_figure(stats: list[GroupStats]) -> Figure:
    """Three panels (R, G, B): share of pixels at each value, one line per class."""
    fig = Figure(figsize=(11, 3.0), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    values = np.arange(256)
    for c, (ax, name) in enumerate(zip(axes, ("red", "green", "blue"), strict=True)):
        for s in stats:
            share = s.channel_hist[c] / max(s.channel_hist[c].sum(), 1)
            ax.plot(values, 100 * share, color=CLASS_COLORS[s.label], linewidth=1.4)
            ax.fill_between(values, 100 * share, color=CLASS_COLORS[s.label], alpha=0.08, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel(f"{name} value")
        ax.set_xlim(0, 255)
    axes[0].set_ylabel("% of pixels")
    class_legend(fig, [s.label for s in stats])
    return fig


@styled
def mean_image_figure(stats: list[GroupStats]) -> Figure:
    """The mean patch of each class and, with both classes, their difference as a diverging map."""
    by_label = {s.label: s for s in stats}
    has_diff = 0 in by_label and 1 in by_label
    panels = len(stats) + has_diff
    fig = Figure(figsize=(2.6 * panels + (0.6 if has_diff else 0), 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    for ax, s in zip(axes, stats, strict=False):
        ax.imshow(np.clip(s.mean_image, 0, 255).astype(np.uint8), interpolation="nearest")
        _image_axes(ax, f"mean {CLASS_NAMES[s.label]} (n={s.n:,})", CLASS_COLORS[s.label])
    if has_diff:
        diff = by_label[0].mean_image.mean(axis=2) - by_label[1].mean_image.mean(axis=2)
        limit = max(float(np.abs(diff).max()), 1e-6)
        im = axes[-1].imshow(diff, cmap="PuOr_r", vmin=-limit, vmax=limit, interpolation="nearest")
        _image_axes(axes[-1], "negative − positive", INK)
        fig.colorbar(im, ax=axes[-1], shrink=0.8, label="brightness difference")
    return fig


def _image_axes(ax: Axes, title: str, color: str) -> None:
    draw_centre_box(ax)
    ax.set_title(title, color=color, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


@styled
def intensity_figure(stats: list[GroupStats]) -> Figure:
    """Distributions of per-patch brightness and saturation by class, with the near-white level marked."""
    fig = Figure(figsize=(11, 3.0), layout="constrained")
    ax_b, ax_s = fig.subplots(1, 2)
    for s in stats:
        class_hist(ax_b, s.brightness, np.linspace(0, 255, 52), CLASS_COLORS[s.label])
        class_hist(ax_s, s.saturation, np.linspace(0, 1, 51), CLASS_COLORS[s.label])
    ax_b.axvline(NEAR_WHITE, color=INK, linestyle="--", linewidth=1)
    ax_b.annotate(
        "near-white",
        (NEAR_WHITE, 1),
        xycoords=("data", "axes fraction"),
        xytext=(-4, -4),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=8,
    )
    ax_b.set(title="brightness (mean RGB per patch)", xlabel="mean value", ylabel="density", xlim=(0, 255))
    ax_s.set(title="saturation (mean per patch)", xlabel="mean saturation", xlim=(0, 1))
    class_legend(fig, [s.label for s in stats])
    return fig
