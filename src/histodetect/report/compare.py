"""One table comparing training runs, built only from what each run folder holds.

Each row reads ``config.yaml`` (what was tried), ``summary.json`` (what training measured) and, when
``evaluate`` has been run on it, ``evaluation/val/metrics.json`` and ``evaluation/test/metrics.json`` (metrics on
the run's own validation and untouched test patches, with a bootstrap CI for ROC AUC, which tells whether two
runs are really apart). Only those two stand for a run: an evaluation on ``all`` or on a store split (mostly
patches it trained on) is never shown. Rows are ranked by validation ROC AUC, the competition's metric, and the
best is marked; the test AUC sits beside it and never ranks anything (choosing by it would spend the test set).
The table is written as Markdown (for the README or a pull request) and as HTML beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table

from histodetect.errors import ConfigError
from histodetect.io import atomic_write_text
from histodetect.report.figures import INK, styled
from histodetect.report.html import Page
from histodetect.runs.layout import CONFIG, EVALUATED, EVALUATION, SUMMARY, evaluation_file

PARTS = ("val", "test")  # the run's held-out parts: the only evaluations that stand for it
BEST_MARK = "★"
BEST_COLOR = "#009E73"  # Okabe–Ito bluish green, as the report's "good" accent
COLUMNS = [
    "run", "model", "freeze", "lr", "batch", "optimizer", "image", "dropout", "loss", "augment",
    "val acc", "val AUC", "test AUC", "epochs", "wall time", "images/s", "notes",
]  # fmt: skip
NUMERIC = {"lr", "batch", "image", "dropout", "val acc", "val AUC", "test AUC", "images/s"}


@dataclass
class RunRecord:
    """What one run folder says about itself; ``evaluations`` holds evaluate's metrics on the run's ``val`` and
    ``test`` parts, each once `evaluate` has scored it."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    evaluations: dict[str, dict[str, Any]]

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """evaluate's metrics on the validation patches, when it has scored them."""
        return self.evaluations.get("val")

    @property
    def auc(self) -> float:
        """Validation ROC AUC (what runs are ranked by): evaluate's when present (it has a CI), else the best
        epoch's from training."""
        return _finite((self.evaluation or {}).get("roc_auc", self.summary.get("best_val_auc")))

    @property
    def auc_ci(self) -> tuple[float, float] | None:
        return _ci(self.evaluation)

    @property
    def test_auc(self) -> float:
        """ROC AUC on the untouched test patches (evaluate --split test); never used to rank."""
        return _finite(self.evaluations.get("test", {}).get("roc_auc"))

    @property
    def accuracy(self) -> float | None:
        return (self.evaluation or {}).get("accuracy", self.summary.get("best_val_acc"))


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def _ci(evaluation: dict[str, Any] | None) -> tuple[float, float] | None:
    ci = (evaluation or {}).get("roc_auc_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def compare(runs: list[Path], out: Path) -> str:
    """Write the comparison of ``runs`` to ``out`` (Markdown) and beside it as .html; return the Markdown.

    Raises FileNotFoundError for a missing run folder or ``config.yaml`` and ConfigError (a ValueError the CLI
    reports in one line) for an unreadable file, each naming the path, so one bad argument does not silently
    shrink the table.
    """
    out = Path(out)
    if not runs:
        raise ValueError("compare needs at least one run folder")
    if out.suffix.lower() == ".html":
        raise ValueError(f"{out}: give the Markdown file to write (e.g. results.md); the .html goes beside it")
    records = read_runs(runs)
    table = results_table(records)
    markdown = to_markdown(table) + f"\n{BEST_MARK} best validation ROC AUC. {_FOOTNOTE}\n"
    atomic_write_text(out, markdown)
    _write_html(out, table, records)
    return markdown


def read_runs(runs: list[Path]) -> list[RunRecord]:
    """The runs, best validation AUC first (runs without one last)."""
    return sorted((read_run(Path(r)) for r in runs), key=lambda r: (math.isnan(r.auc), -np.nan_to_num(r.auc)))


TERMINAL_COLUMNS = ["run", "freeze", "val AUC", "test AUC", "val acc", "wall time", "images/s"]
# Left out in this order when the terminal is too narrow for every cell whole; run and val AUC always stay.
DROPPED_FIRST = ["images/s", "wall time", "freeze", "val acc", "test AUC"]
UNBOUNDED = 10_000  # columns: wider than any table here


def terminal_table(runs: list[Path], title: str = "Run comparison (best validation ROC AUC first)") -> FittedTable:
    """The key columns of the comparison for a terminal; the Markdown and HTML files hold all of them. It keeps to
    the console's width (80 columns in a plain terminal or a CI log) by moving the intervals under their AUC and
    then leaving columns out, never by cutting a cell."""
    return FittedTable(results_table(read_runs(runs))[TERMINAL_COLUMNS], title)


class FittedTable:
    """A rich renderable of ``frame`` that fits the width it is drawn at: every cell whole, on one line if it can,
    else with a cell's bracketed interval on its own line, else without the columns of ``DROPPED_FIRST``, one by
    one (a caption names them). rich itself would shorten cells to ``f…`` instead."""

    def __init__(self, frame: pd.DataFrame, title: str) -> None:
        self.frame, self.title = frame, title

    def _table(self, columns: list[str], folded: bool) -> Table:
        table = Table(title=self.title, title_justify="left", box=box.SIMPLE_HEAD, caption_justify="left")
        for column in columns:
            # Only a run's name may fold, in the narrowest rendering, when even that is too wide for it whole.
            justify = "right" if column in NUMERIC else "left"
            table.add_column(column, justify=justify, no_wrap=column != "run", overflow="fold")
        for row in self.frame[columns].itertuples(index=False):
            table.add_row(*(str(v).replace(" [", "\n[") if folded else str(v) for v in row))
        left_out = [c for c in self.frame.columns if c not in columns]
        if left_out:
            table.caption = f"left out at this width: {', '.join(left_out)}"
        return table

    def candidates(self) -> Iterator[Table]:
        """The renderings, widest first."""
        columns = list(self.frame.columns)
        yield self._table(columns, folded=False)
        for drop in [None, *DROPPED_FIRST]:
            columns = [c for c in columns if c != drop]
            yield self._table(columns, folded=True)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        unbounded = options.update(max_width=UNBOUNDED)  # the width each rendering wants, not what it would get
        table = None
        for table in self.candidates():
            if Measurement.get(console, unbounded, table).maximum <= options.max_width:
                break
        yield table


_FOOTNOTE = (
    "Ranked by val AUC: the run's validation patches, scored by `evaluate` when it was run on them ([95% bootstrap "
    "CI] shown), otherwise the best training epoch's. test AUC is `evaluate --split test` on the run's untouched "
    "test patches (train --test-fraction); it is shown, never ranked. Evaluations of other splits are left out."
)


def read_run(run: Path) -> RunRecord:
    """Read a run folder; ``summary.json`` may be missing (a run still training), ``config.yaml`` may not."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    config_path = run / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no {CONFIG})")
    config = _read_mapping(config_path, yaml.safe_load)
    summary_path = run / SUMMARY
    summary = _read_mapping(summary_path, json.loads) if summary_path.is_file() else {}
    evaluations = {}
    for part in PARTS:
        # where `evaluate` leaves metrics, in preference; the older single files count only when they name the part
        for path in (evaluation_file(run, part), run / EVALUATION / EVALUATED, run / EVALUATED):
            if path.is_file() and (found := _read_mapping(path, json.loads)).get("split") == part:
                evaluations[part] = found
                break
    return RunRecord(run, config, summary, evaluations)


def _read_mapping(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, found {type(data).__name__}")
    return data


def results_table(records: list[RunRecord]) -> pd.DataFrame:
    """One display row per run, in the order given; the first is marked best when it has an AUC."""
    names = [r.path.name for r in records]
    rows = []
    for i, r in enumerate(records):
        name = r.path.name if names.count(r.path.name) == 1 else str(r.path)  # same folder name in two places
        best = i == 0 and not math.isnan(r.auc)
        rows.append(_row(f"{BEST_MARK} {name}" if best else name, r))
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(name: str, r: RunRecord) -> dict[str, Any]:
    c, s = r.config, r.summary
    return {
        "run": name,
        "model": c.get("model", s.get("model", "")),
        "freeze": c.get("freeze", s.get("freeze", "")),
        "lr": _num(c.get("lr"), "g"),
        "batch": _num(c.get("batch_size"), "d"),
        "optimizer": c.get("optimizer", ""),
        "image": _num(s.get("image_size", c.get("image_size")), "d"),
        "dropout": _num(c.get("dropout"), "g"),
        "loss": loss_summary(c),
        "augment": augment_summary(c),
        "val acc": _num(r.accuracy, ".4f"),
        "val AUC": _num(r.auc, ".4f") + _interval(r.auc_ci),
        "test AUC": _num(r.test_auc, ".4f") + _interval(_ci(r.evaluations.get("test"))),
        "epochs": _epochs(s),
        "wall time": duration(s.get("wall_time_s")),
        "images/s": _num(s.get("train_images_per_s"), ",.0f"),
        "notes": notes(r),
    }


def _interval(ci: tuple[float, float] | None) -> str:
    return f" [{ci[0]:.4f}–{ci[1]:.4f}]" if ci else ""


def _num(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; "" when not a finite number (YAML may hold "1e-3" as text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    if isinstance(value, bool) or not math.isfinite(number):
        return ""
    return format(int(number) if spec == "d" else number, spec)


def loss_summary(config: dict[str, Any]) -> str:
    """The loss and the settings that change it: ``focal γ2 α0.25``, ``bce pos_weight 2 smooth 0.1``."""
    loss = str(config.get("loss", ""))
    parts = [loss]
    if loss == "focal":
        parts.append(f"γ{config.get('focal_gamma', '?')} α{config.get('focal_alpha', '?')}")
    if loss == "bce" and config.get("pos_weight") is not None:
        parts.append(f"pos_weight {config['pos_weight']}")
    if config.get("label_smoothing"):
        parts.append(f"smooth {config['label_smoothing']}")
    return " ".join(p for p in parts if p)


def augment_summary(config: dict[str, Any]) -> str:
    """The augmentations that are on, e.g. ``D4, HED 0.05, mixup 0.2``; ``none`` when all are off."""
    parts = ["D4"] if config.get("aug_dihedral") else []
    for key, label in (
        ("aug_hed", "HED"),
        ("aug_brightness", "bright"),
        ("aug_contrast", "contrast"),
        ("mixup", "mixup"),
        ("cutmix", "cutmix"),
    ):
        if config.get(key):
            parts.append(f"{label} {config[key]}")
    return ", ".join(parts) or "none"


def _epochs(summary: dict[str, Any]) -> str:
    run, best = summary.get("epochs_run"), summary.get("best_epoch")
    if run is None:
        return ""
    return f"{run}" + (f" (best {best})" if best is not None else "")


def duration(seconds: Any) -> str:
    """``1h 02m``, ``12m 30s`` or ``45s``: wall times span seconds (tests) to hours (full data on a CPU)."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return ""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def notes(r: RunRecord) -> str:
    """Context that changes how to read the row: hardware, how training stopped, where the AUC comes from."""
    s = r.summary
    parts = []
    if not s:
        parts.append(f"no {SUMMARY} (unfinished?)")
    if s.get("device"):
        parts.append(str(s["device"]) + (f", {s['precision']}" if s.get("precision") else ""))
    if s.get("weights") == "last_epoch":
        parts.append("no validation: last epoch's weights")
    if s.get("stopped_by") not in (None, "max_epochs"):
        parts.append(f"stopped by {s['stopped_by']}")
    if r.evaluation is None and not math.isnan(r.auc):
        parts.append(f"val AUC from training ({_monitored(s)})")
    for part, evaluation in r.evaluations.items():
        how = [f"{k} {evaluation[k]}" for k in ("tta", "numeric_precision") if evaluation.get(k)]
        parts.append(f"{part} AUC from evaluate" + (f" ({', '.join(how)})" if how else ""))
    if r.config.get("preset"):
        parts.append(f"preset {r.config['preset']}")
    if r.config.get("notes"):
        parts.append(str(r.config["notes"]))
    return "; ".join(parts)


def _monitored(summary: dict[str, Any]) -> str:
    """Which validation patches the best epoch was measured on."""
    monitored, held = summary.get("n_val_monitored"), summary.get("n_val")
    if monitored is not None and held is not None and monitored != held:
        return f"best epoch, {monitored:,} of {held:,} val patches"
    return "best epoch"


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table; numeric columns right-aligned, ``|`` in cells escaped."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---:" if c in NUMERIC else "---" for c in table.columns) + "|"
    body = [
        "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def _write_html(out: Path, table: pd.DataFrame, records: list[RunRecord]) -> Path:
    page = Page(out.parent, "Run comparison", f"{len(records)} run(s), best validation ROC AUC first")
    section = page.section("Results", _FOOTNOTE)
    best = [0] if records and not math.isnan(records[0].auc) else []
    section.table(table, highlight=best, numeric=sorted(NUMERIC))
    if any(not math.isnan(r.auc) for r in records):
        section.figure(
            auc_figure(table["run"].tolist(), records),
            f"{out.stem}_auc",
            "Validation ROC AUC per run (dots) with its 95% interval where evaluate measured one, and the test "
            "ROC AUC (open diamonds) where evaluate scored the untouched test patches. Runs whose intervals "
            "overlap are not told apart by this validation set.",
            wide=True,
        )
    return page.write(out.with_suffix(".html").name)


@styled
def auc_figure(names: list[str], records: list[RunRecord]) -> Figure:
    """A dot per run at its AUC (value written beside it) with the CI as a bar, best at the top.

    Runs without an AUC yet are left out; ``names`` are the table's labels, aligned with ``records``.
    """
    shown = [(name, r) for name, r in zip(names, records, strict=True) if not math.isnan(r.auc)]
    fig = Figure(figsize=(7.5, 0.45 * len(shown) + 1.2), layout="constrained")
    ax = fig.subplots()
    for yi, (_, r) in enumerate(shown):
        color = BEST_COLOR if yi == 0 else INK
        if r.auc_ci:
            ax.plot(r.auc_ci, [yi, yi], color=color, linewidth=2.5, alpha=0.5, solid_capstyle="round")
        ax.plot([r.auc], [yi], "o", color=color, markersize=7)
        if not math.isnan(r.test_auc):
            ax.plot([r.test_auc], [yi], "D", color=color, markersize=6, markerfacecolor="none")
        ax.annotate(
            f"{r.auc:.4f}",
            (r.auc, yi),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=color,
        )
    ax.set_yticks(range(len(shown)), [name for name, _ in shown])
    ax.set_ylim(len(shown) - 0.5, -0.7)  # best on top, room for its label
    ax.set_xlabel("ROC AUC (● validation, ◇ test)")
    ax.grid(axis="y", visible=False)
    return fig
