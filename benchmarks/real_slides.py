"""Slides built from a run's held-out real patches, mostly normal tissue with a few tumour lesions (for the slide
benchmarks: ``slide_cascade.py``, ``slide_vs_wsinfer.py``).

A slide is a disc of tissue on white glass: a grid of 96 px patches (the run's ``test`` patches of ``split.csv``,
never seen in training; each drawn at random and turned by a random dihedral transform, so a slide larger than the
test set does not repeat a patch as it is), shifted by ``offset`` pixels so the 96 px grid of ``slide --cell 96``
(and WSInfer's) does not fall on the patches' edges; ``lesions`` discs of tumour patches, of 1 to ``max_radius``
patches' radius, make the tumour. Written as a JPEG-compressed Aperio SVS pyramid at 0.972 um/px (the model's
scale), which OpenSlide, TiffSlide and so WSInfer read with its resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodetect.data.store import Store
from histodetect.runs.layout import read_split

MPP = 0.972
PATCH = 96
TILE = 256


@dataclass(frozen=True)
class RealSlide:
    path: Path
    image_shape: tuple[int, int]
    tumour_patches: int
    normal_patches: int


def held_out(run: Path, store: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The run's ``test`` patches split by label: (normal, tumour), uint8 ``(n, 96, 96, 3)``."""
    opened = Store(store or json.loads((run / "store.json").read_text())["path"])
    rows = read_split(run, opened)["test"]
    labels = opened.labels[rows]
    return opened.read(rows[labels == 0]), opened.read(rows[labels == 1])


def build_image(
    normal: np.ndarray,
    tumour: np.ndarray,
    *,
    patches: int,
    lesions: int,
    max_radius: float,
    offset: int,
    seed: int,
) -> tuple[np.ndarray, int, int]:
    """The slide's pixels: a disc of ``patches`` across; returns (image, tumour patches, normal patches)."""
    rng = np.random.default_rng(seed)
    margin = PATCH + offset
    side = patches * PATCH + 2 * margin
    image = np.full((side, side, 3), 255, dtype=np.uint8)
    r, c = np.mgrid[:patches, :patches] + 0.5
    centre = patches / 2
    tissue = (r - centre) ** 2 + (c - centre) ** 2 <= centre**2
    lesion = np.zeros_like(tissue)
    inside = np.argwhere(tissue)
    for _ in range(lesions):
        lr, lc = inside[rng.integers(len(inside))] + 0.5
        radius = rng.uniform(0.5, max_radius)
        lesion |= (r - lr) ** 2 + (c - lc) ** 2 <= radius**2
    lesion &= tissue
    for (i, j), is_tumour in zip(inside, lesion[tissue], strict=True):
        source = tumour if is_tumour else normal
        patch = source[rng.integers(len(source))]
        k = int(rng.integers(8))
        patch = np.rot90(patch, k % 4)
        patch = patch[:, ::-1] if k >= 4 else patch
        y, x = margin + i * PATCH, margin + j * PATCH
        image[y : y + PATCH, x : x + PATCH] = patch
    return image, int(lesion.sum()), int(tissue.sum() - lesion.sum())


def write_svs(path: Path, image: np.ndarray, levels: int = 3) -> Path:
    """``image`` as a tiled JPEG Aperio SVS at ``MPP``, levels halving."""
    import tifffile
    from PIL import Image

    height, width = image.shape[:2]
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k in range(levels):
            pixels = image if k == 0 else np.asarray(Image.fromarray(image).reduce(2**k))
            description = (
                f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
                f"JPEG/RGB Q=90|AppMag = 10|MPP = {MPP}"
                if k == 0
                else f"Aperio Image Library v12.0.15\r\nlevel {k}"
            )
            tif.write(
                pixels, tile=(TILE, TILE), photometric="rgb", compression="jpeg", description=description,
                subfiletype=1 if k else 0, metadata=None,
            )  # fmt: skip
    return path


def make_slide(path: Path, normal: np.ndarray, tumour: np.ndarray, **layout: int | float) -> RealSlide:
    image, n_tumour, n_normal = build_image(normal, tumour, **layout)  # type: ignore[arg-type]
    write_svs(path, image)
    return RealSlide(path, image.shape[:2], n_tumour, n_normal)
