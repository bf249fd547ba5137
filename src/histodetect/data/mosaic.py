"""Slides built from real patches, for the demo, the tests and the benchmarks: whole-slide code needs whole slides,
and the only real pixels at hand are 96x96 patches.

:func:`write_pyramid` writes an image as a scanner writes a slide (a tiled pyramidal TIFF, or an Aperio SVS, with its
microns per pixel), so the slide code reads it through OpenSlide as it would a real scan. :func:`build_cohort`
writes a Camelyon16-style cohort: slides of normal tissue (real normal patches, each turned by a random dihedral
transform, laid edge to edge on a blob of tissue surrounded by glass), some with 1-3 lesions of real tumour patches,
outlined in ASAP XML as Camelyon16's annotations are (``Tumor`` group, level-0 pixels), and a ``reference.csv``
(``image,type``, no header, as the challenge's own file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import shapely

PATCH = 96
GLASS = 242  # near-white, as scanned glass is


def write_pyramid(
    path: str | os.PathLike[str],
    image: np.ndarray,
    mpp: float | None,
    *,
    aperio: bool = False,
    compression: str = "jpeg",
    levels: int = 3,
    tile: int = 128,
) -> Path:
    """A tiled pyramidal TIFF of ``image`` (uint8 RGB): level 0, then levels halved each time as further pages.
    ``aperio``: an Aperio SVS (OpenSlide takes its mpp from the ImageDescription); otherwise a generic TIFF with the
    resolution in its tags (``mpp`` None: none recorded)."""
    import tifffile
    from PIL import Image

    path = Path(path)
    height, width = image.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            pixels = image if k == 0 else np.asarray(Image.fromarray(image).reduce(2**k))
            options: dict[str, Any] = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
            if aperio:
                options["description"] = (
                    f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                    f"JPEG/RGB Q=90|AppMag = 10|MPP = {mpp}"
                    if k == 0
                    else f"Aperio Image Library v12.0.15\r\nlevel {k}"
                )
            elif mpp is not None:
                options.update(resolution=(1e4 / mpp / 2**k, 1e4 / mpp / 2**k), resolutionunit="CENTIMETER")
            if k:
                options["subfiletype"] = 1
            tif.write(pixels, metadata=None, **options)
    return path


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a built cohort: its file, its outlines (None for a normal slide) and its lesions' squares."""

    name: str
    path: Path
    annotations: Path | None
    lesions: list[list[tuple[int, int]]]  # per lesion, the (row, col) of its tumour patches in the patch grid


def build_cohort(
    out: str | os.PathLike[str],
    patches: np.ndarray,
    labels: np.ndarray,
    *,
    tumour_slides: int,
    normal_slides: int,
    grid: tuple[int, int] = (16, 20),
    lesion_patches: tuple[int, int] = (2, 12),
    mpp: float = 0.972,
    seed: int = 0,
    compression: str = "jpeg",
) -> list[CohortSlide]:
    """``out/slides/<name>.tif``, ``out/annotations/<name>.xml`` (tumour slides) and ``out/reference.csv``.

    Each slide is a ``grid`` (rows, cols) of patch places; tissue is an irregular blob over most of it. A tumour
    slide gets 1-3 lesions, each a connected blob of ``lesion_patches`` (min, max) tumour patches inside the tissue.
    Patches are drawn with replacement and turned by a random dihedral transform, so a few hundred real patches
    make a cohort of distinct-looking slides."""
    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    tumour_pool, normal_pool = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    slides = []
    names = [f"tumor_{k + 1:03d}" for k in range(tumour_slides)] + [f"normal_{k + 1:03d}" for k in range(normal_slides)]
    for name in names:
        tissue = _tissue_blob(rng, grid)
        lesions = _lesions(rng, tissue, lesion_patches) if name.startswith("tumor") else []
        tumour = np.zeros(grid, dtype=bool)
        for lesion in lesions:
            tumour[tuple(np.array(lesion).T)] = True
        image = np.full((grid[0] * PATCH, grid[1] * PATCH, 3), GLASS, dtype=np.uint8)
        for r, c in np.argwhere(tissue):
            pool = tumour_pool if tumour[r, c] else normal_pool
            patch = patches[rng.choice(pool)]
            patch = np.rot90(patch, int(rng.integers(4)))
            image[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = (
                patch[:, ::-1] if rng.random() < 0.5 else patch
            )
        path = write_pyramid(out / "slides" / f"{name}.tif", image, mpp, compression=compression)
        annotations = _write_asap(out / "annotations" / f"{name}.xml", lesions) if lesions else None
        slides.append(CohortSlide(name, path, annotations, lesions))
    rows = [f"{s.name}.tif,{'Tumor' if s.lesions else 'Normal'}" for s in slides]
    (out / "reference.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return slides


def _tissue_blob(rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    """An irregular ellipse of tissue covering most of the grid, one patch of glass at least around it."""
    rows, cols = grid
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    angle = np.arctan2(y - cy, x - cx)
    wobble = 1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi)) + 0.1 * np.cos(5 * angle + rng.uniform(0, 6))
    radius = np.hypot((y - cy) / (rows / 2 - 1), (x - cx) / (cols / 2 - 1))
    return radius <= 0.95 * wobble / (1 + 0.25)


def _lesions(rng: np.random.Generator, tissue: np.ndarray, size: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """1-3 connected blobs of tumour places inside the tissue, at least two places apart (so their outlines stay
    further apart than twice Camelyon16's 75 um margin, and each is a lesion of its own)."""
    taken = np.zeros_like(tissue)
    lesions = []
    for _ in range(int(rng.integers(1, 4))):
        near = _grow(taken, 2)
        free = np.argwhere(tissue & ~near)
        if not len(free):
            break
        blob = [tuple(free[rng.integers(len(free))])]
        target = int(rng.integers(size[0], size[1] + 1))
        for _ in range(50 * target):  # a blob hemmed in by glass or another lesion stays smaller
            if len(blob) >= target:
                break
            r, c = blob[int(rng.integers(len(blob)))]
            dr, dc = ((0, 1), (1, 0), (0, -1), (-1, 0))[int(rng.integers(4))]
            cell = (r + dr, c + dc)
            inside = 0 <= cell[0] < tissue.shape[0] and 0 <= cell[1] < tissue.shape[1]
            if inside and tissue[cell] and cell not in blob and not near[cell]:
                blob.append(cell)
        for cell in blob:
            taken[cell] = True
        lesions.append([(int(r), int(c)) for r, c in blob])
    return lesions


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, np.ones((3, 3), dtype=bool), iterations=steps) if mask.any() else mask


def lesion_outline(lesion: list[tuple[int, int]]) -> shapely.Geometry:
    """The union of a lesion's patch squares, in level-0 pixels."""
    squares = [shapely.box(c * PATCH, r * PATCH, (c + 1) * PATCH, (r + 1) * PATCH) for r, c in lesion]
    return shapely.union_all(squares)


def _write_asap(path: Path, lesions: list[list[tuple[int, int]]]) -> Path:
    """Camelyon16's ASAP XML: one ``Tumor`` annotation per polygon of each lesion's outline."""
    annotations = []
    k = 0
    for lesion in lesions:
        for polygon in shapely.get_parts(lesion_outline(lesion)):
            coords = list(polygon.exterior.coords)[:-1]
            points = "".join(f'<Coordinate Order="{i}" X="{x:g}" Y="{y:g}" />' for i, (x, y) in enumerate(coords))
            annotations.append(
                f'<Annotation Name={quoteattr(f"Annotation {k}")} Type="Polygon" PartOfGroup="Tumor" '
                f'Color="#F4FA58"><Coordinates>{points}</Coordinates></Annotation>'
            )
            k += 1
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(annotations)
        + '</Annotations><AnnotationGroups><Group Name="Tumor" PartOfGroup="None" Color="#00ff00">'
        "<Attributes /></Group></AnnotationGroups></ASAP_Annotations>\n",
        encoding="utf-8",
    )
    return path
