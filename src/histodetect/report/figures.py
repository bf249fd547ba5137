"""Plot conventions shared by every report: one colour per class, one figure style, one patch grid.

Colours are defined here once so that "positive" looks the same in the EDA histograms, the ROC page and the
HTML cards. They come from the Okabe–Ito palette, which stays distinguishable under the common colour-vision
deficiencies. Figures are built with :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so nothing
is registered globally, no GUI backend is touched and figures are freed as soon as the page has saved them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke

NEG_COLOR = "#0072B2"  # Okabe–Ito blue: no tumour in the centre
POS_COLOR = "#D55E00"  # Okabe–Ito vermillion: tumour in the centre
UNLABELED_COLOR = "#8A8A8A"  # no label known (e.g. the competition's test split)
INK = "#1F2933"  # text and neutral strokes

UNLABELED = -1
CLASS_NAMES: dict[int, str] = {0: "negative", 1: "positive", UNLABELED: "unlabeled"}
CLASS_COLORS: dict[int, str] = {0: NEG_COLOR, 1: POS_COLOR, UNLABELED: UNLABELED_COLOR}

CENTRE = 32  # the label describes the central 32x32 pixels of a 96x96 patch

STYLE: dict[str, object] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 9,
    "axes.edgecolor": "#9AA5B1",
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#E4E7EB",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "xtick.color": "#52606D",
    "ytick.color": "#52606D",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "figure.facecolor": "white",
    "text.color": INK,
}

P = ParamSpec("P")
R = TypeVar("R")


def styled(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a plotting function under :data:`STYLE` without changing the caller's global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def class_legend(fig: Figure, classes: Sequence[int], extra: Sequence[Artist] = ()) -> None:
    """One legend above the figure naming the classes by colour (for panels that share the encoding).

    ``extra`` handles (e.g. threshold lines) join the same row. Needs a figure with ``layout="constrained"``,
    which makes room for an "outside" legend.
    """
    handles = [Patch(facecolor=CLASS_COLORS[c], label=CLASS_NAMES[c]) for c in classes] + list(extra)
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles))


def class_hist(
    ax: Axes, values: np.ndarray, bins: np.ndarray, color: str, label: str | None = None, density: bool = True
) -> None:
    """A histogram as a light fill under a solid outline, so overlapping classes stay readable."""
    ax.hist(values, bins=bins, density=density, histtype="stepfilled", alpha=0.22, color=color)
    ax.hist(values, bins=bins, density=density, histtype="step", color=color, linewidth=1.3, label=label)


def draw_centre_box(ax: Axes, size: int = 96, centre: int = CENTRE, origin: tuple[float, float] = (0, 0)) -> None:
    """Outline the central ``centre`` x ``centre`` pixels of a ``size`` patch drawn at ``origin`` (x, y).

    This is the only region the label speaks about. A thin dark line inside a white halo stays visible on dark
    nuclei and on white background alike.
    """
    start = (size - centre) / 2 - 0.5  # pixel i covers [i - 0.5, i + 0.5] in imshow coordinates
    box = Rectangle((origin[0] + start, origin[1] + start), centre, centre, fill=False, edgecolor=INK, linewidth=1.1)
    box.set_path_effects([withStroke(linewidth=2.6, foreground="white")])
    ax.add_patch(box)


GAP = 6  # white pixels between tiles of a patch grid
FRAME = 4  # pixels of coloured frame around a tile
CAPTION_LINE = 10  # pixels of height per caption line (7.5 pt text at the grid's scale)


@styled
def patch_grid(
    patches: np.ndarray,
    *,
    captions: Sequence[str] | None = None,
    frame_colors: Sequence[str] | None = None,
    ncols: int = 8,
    legend: Sequence[int] = (),
    tile_inches: float = 1.15,
) -> Figure:
    """Show uint8 patches ``(n, H, W, 3)`` in a grid with the centre region outlined on each.

    ``frame_colors`` colours each tile's border (e.g. by true class) and ``legend`` names the classes those
    colours stand for; ``captions`` (one or more lines) go under the tiles. The tiles are painted into one
    mosaic image shown on a single axes: one axes per tile would make every report several times slower.
    """
    if len(patches) == 0:
        raise ValueError("patch_grid needs at least one patch")
    n, h, w = patches.shape[:3]
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    frame = FRAME if frame_colors is not None else 0
    lines = max((c.count("\n") + 1 for c in captions), default=0) if captions is not None else 0
    cell_w, cell_h = w + 2 * frame + GAP, h + 2 * frame + GAP + lines * CAPTION_LINE
    mosaic = np.full((nrows * cell_h, ncols * cell_w, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(mosaic.shape[1] / w * tile_inches, mosaic.shape[0] / w * tile_inches), layout="constrained")
    ax = fig.subplots()
    for i in range(n):
        top, left = (i // ncols) * cell_h, (i % ncols) * cell_w
        if frame:
            rgb = np.round(np.array(to_rgb(frame_colors[i])) * 255).astype(np.uint8)
            mosaic[top : top + h + 2 * frame, left : left + w + 2 * frame] = rgb
        mosaic[top + frame : top + frame + h, left + frame : left + frame + w] = patches[i]
        draw_centre_box(ax, size=w, origin=(left + frame, top + frame))
        if captions is not None:
            ax.text(
                left + frame + w / 2,
                top + h + 2 * frame + 1,
                captions[i],
                ha="center",
                va="top",
                fontsize=7.5,
            )
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    if legend:
        class_legend(fig, legend)
    return fig
