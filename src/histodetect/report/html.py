"""A tiny, dependency-free HTML page builder shared by the EDA, evaluation and comparison reports.

A :class:`Page` is a title, a row of headline cards and a list of sections; a section holds text, tables and
figures. Every figure is saved as a PNG beside the page (to reuse in slides) *and* embedded as base64, so the
page stays complete when it is mailed or moved on its own. All text is HTML-escaped: ids, file names and
problem details come from data and must not be able to break the page. The page is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from histodetect.io import atomic_write_bytes, atomic_write_text
from histodetect.report.figures import INK, NEG_COLOR, POS_COLOR, UNLABELED_COLOR

DPI = 130

CSS = f"""
:root {{
  --pos: {POS_COLOR}; --neg: {NEG_COLOR}; --unl: {UNLABELED_COLOR}; --ink: {INK};
  --muted: #52606D; --line: #E4E7EB; --bg: #F5F7FA; --card: #FFFFFF; --warn: #B7791F; --good: #2F855A;
}}
* {{ box-sizing: border-box; }}
body {{ margin: 0; background: var(--bg); color: var(--ink); line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }}
main {{ max-width: 1180px; margin: 0 auto; padding: 32px 24px 64px; }}
header h1 {{ margin: 0 0 4px; font-size: 28px; letter-spacing: -0.01em; }}
header p {{ margin: 0 0 20px; color: var(--muted); }}
section {{ background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  padding: 20px 24px 12px; margin: 20px 0; box-shadow: 0 1px 2px rgba(16, 24, 40, .04); }}
section h2 {{ margin: 0 0 4px; font-size: 19px; }}
section > p.intro {{ margin: 0 0 14px; color: var(--muted); max-width: 75ch; }}
.blocks {{ display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }}
.block {{ flex: 1 1 100%; min-width: 0; }}
figure.block {{ flex: 1 1 440px; margin: 0; }}
figure.wide {{ flex-basis: 100%; }}
figure img {{ max-width: 100%; height: auto; display: block; margin: 0 auto; }}
figcaption, .caption {{ color: var(--muted); font-size: 13.5px; margin-top: 6px; max-width: 80ch; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }}
.card {{ background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 14px 16px;
  border-top: 4px solid var(--line); }}
.card .label {{ color: var(--muted); font-size: 12.5px; text-transform: uppercase; letter-spacing: .04em; }}
.card .value {{ font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }}
.card .sub {{ color: var(--muted); font-size: 12.5px; }}
.card.pos {{ border-top-color: var(--pos); }} .card.neg {{ border-top-color: var(--neg); }}
.card.warn {{ border-top-color: var(--warn); }} .card.good {{ border-top-color: var(--good); }}
.card.warn .value {{ color: var(--warn); }}
.tablewrap {{ overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }}
th {{ color: var(--muted); font-weight: 600; background: #FAFBFC; }}
td.num, th.num {{ text-align: right; }}
tr.highlight td {{ background: #FFF8E6; font-weight: 600; }}
.note {{ padding: 10px 14px; border-radius: 8px; background: #EEF4FB; border-left: 4px solid var(--neg); }}
.note.warn {{ background: #FDF6E7; border-left-color: var(--warn); }}
.note.good {{ background: #EDF7F1; border-left-color: var(--good); }}
table.sortable th {{ cursor: pointer; user-select: none; }}
table.sortable th[aria-sort="ascending"]::after {{ content: " \\25B2"; }}
table.sortable th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
code {{ font-size: 12.5px; background: #F0F2F5; padding: 1px 5px; border-radius: 4px; }}
footer {{ color: var(--muted); font-size: 12.5px; margin-top: 28px; }}
"""


# Sorts a table.sortable by the clicked column: numbers as numbers (a dash last), text as text; a second click reverses.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach((table) => {
  table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
    const up = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    const key = (row) => {
      const text = row.children[col].textContent.trim();
      const number = parseFloat(text.replace(/,/g, ""));
      return text === "\u2014" ? null : (isNaN(number) || !/^[-+.\\d]/.test(text) ? text : number);
    };
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
      return up ? order : -order;
    });
    rows.forEach((row) => body.appendChild(row));
  }));
});
"""


@dataclass
class Card:
    """A headline number. ``tone`` picks the accent: pos, neg, warn, good or "" (neutral)."""

    label: str
    value: str
    note: str = ""
    tone: str = ""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_table(frame: pd.DataFrame, highlight: Sequence[int] = (), numeric: Sequence[str] = ()) -> str:
    """A DataFrame as an HTML table: numbers right-aligned, missing values as a dash, rows optionally marked.

    Numeric columns are found by dtype; ``numeric`` names more (numbers already formatted as text).

    Written by hand rather than with ``DataFrame.to_html`` so numeric columns get their own class (alignment)
    and chosen rows can be highlighted without pulling in jinja2 for pandas' Styler.
    """
    right = [c in numeric or pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    cls = [' class="num"' if r else "" for r in right]
    head = "".join(f"<th{c}>{_esc(name)}</th>" for name, c in zip(frame.columns, cls, strict=True))
    rows = []
    marked = set(highlight)
    for i, values in enumerate(frame.itertuples(index=False)):
        cells = "".join(f"<td{c}>{'—' if _missing(v) else _esc(v)}</td>" for v, c in zip(values, cls, strict=True))
        rows.append(f"<tr{' class=highlight' if i in marked else ''}>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="tablewrap">{table}</div>'


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


@dataclass
class Section:
    """A card on the page holding blocks in order; figures sit side by side when there is room."""

    page: Page
    title: str
    intro: str = ""
    blocks: list[str] = field(default_factory=list)

    def note(self, text: str, tone: str = "") -> Section:
        """A highlighted remark; tone "warn" for something to act on, "good" for a clean bill."""
        self.blocks.append(f'<div class="block note {_esc(tone)}">{_esc(text)}</div>')
        return self

    def table(
        self,
        frame: pd.DataFrame,
        caption: str = "",
        highlight: Sequence[int] = (),
        numeric: Sequence[str] = (),
        sortable: bool = False,
    ) -> Section:
        """A table; ``sortable``: a click on a column's header sorts the rows by it (a small inline script)."""
        caption_html = f'<div class="caption">{_esc(caption)}</div>' if caption else ""
        table = render_table(frame, highlight, numeric)
        if sortable:
            table = table.replace("<table>", '<table class="sortable">', 1)
            self.page.script = SORT_SCRIPT
        self.blocks.append(f'<div class="block">{table}{caption_html}</div>')
        return self

    def figure(self, fig: Figure, name: str, caption: str, wide: bool = False) -> Section:
        """Save ``fig`` as ``<name>.png`` beside the page and embed the same bytes in it."""
        return self.image(self.page.save_png(fig, name), caption, wide)

    def image(self, png: bytes, caption: str, wide: bool = False) -> Section:
        """Embed a PNG already made (e.g. a slide's heatmap.png)."""
        data = base64.b64encode(png).decode("ascii")
        self.blocks.append(
            f'<figure class="block{" wide" if wide else ""}"><img src="data:image/png;base64,{data}" '
            f'alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'
        )
        return self

    def render(self) -> str:
        intro = f'<p class="intro">{_esc(self.intro)}</p>' if self.intro else ""
        blocks = f'<div class="blocks">{"".join(self.blocks)}</div>'
        return f"<section><h2>{_esc(self.title)}</h2>{intro}{blocks}</section>"


def _render_cards(cards: Sequence[Card]) -> str:
    items = "".join(
        f'<div class="card {_esc(c.tone)}"><div class="label">{_esc(c.label)}</div>'
        f'<div class="value">{_esc(c.value)}</div><div class="sub">{_esc(c.note)}</div></div>'
        for c in cards
    )
    return f'<div class="cards">{items}</div>'


class Page:
    """One self-contained HTML report in ``out_dir`` (created if needed), its figures as PNGs beside it."""

    def __init__(self, out_dir: str | Path, title: str, subtitle: str = ""):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.subtitle = subtitle
        self.headline: list[Card] = []
        self.sections: list[Section] = []
        self.script = ""  # inline JavaScript, if a block needs one (the page loads nothing from elsewhere)

    def cards(self, cards: Sequence[Card]) -> None:
        """Headline numbers shown under the title."""
        self.headline.extend(cards)

    def section(self, title: str, intro: str = "") -> Section:
        section = Section(self, title, intro)
        self.sections.append(section)
        return section

    def save_png(self, fig: Figure, name: str) -> bytes:
        """Render ``fig`` once, write it atomically as ``<name>.png`` and return the bytes."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        png = buffer.getvalue()
        atomic_write_bytes(self.out_dir / f"{name}.png", png)
        return png

    def render(self) -> str:
        subtitle = f"<p>{_esc(self.subtitle)}</p>" if self.subtitle else ""
        cards = _render_cards(self.headline) if self.headline else ""
        body = "".join(s.render() for s in self.sections)
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(self.title)}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>{_esc(self.title)}</h1>{subtitle}</header>{cards}{body}"
            "<footer>Written by histodetect. Figures are embedded; the same PNGs are saved beside this page."
            f"</footer></main>{f'<script>{self.script}</script>' if self.script else ''}</body></html>\n"
        )

    def write(self, name: str = "index.html") -> Path:
        return atomic_write_text(self.out_dir / name, self.render())
