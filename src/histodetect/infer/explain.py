"""``histodetect explain``: Grad-CAM heatmaps showing which part of a patch drove the tumour score.

The label is about the centre 32x32 pixels only, so the first thing to check in a heatmap is whether the
evidence lies inside the outlined centre box or in the outer ring (which would mean the model learned
something the label does not say). The target is the logit of the positive class: it is the sigmoid's
argument, so it ranks evidence the same way as the probability, without the vanishing gradients of a saturated
sigmoid on confident patches. CAMs are computed in fp32 (gradients through bf16 autocast are too coarse for a
3x3 map).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from histodetect.data.augment import to_float
from histodetect.data.store import Store
from histodetect.infer.engine import InferError, choose_stain
from histodetect.infer.sources import PatchSet, StoreRows, is_store, open_source, store_patches
from histodetect.io import atomic_path
from histodetect.models import Classifier
from histodetect.report.figures import CLASS_COLORS, CLASS_NAMES, draw_centre_box, patch_grid, styled
from histodetect.runs import load_model
from histodetect.runs.layout import run_stain

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
MAX_LIMIT = 256  # patches from a folder or store: more takes minutes of figures and makes no readable grid
CAM_BATCH = 32  # patches per backward pass: bounds the activations kept for the gradients
HEAT_WEIGHT = 0.5  # share of the patch in the overlay; the rest is the heatmap


class _LogitColumn(nn.Module):
    """The classifier with its logit as a ``(B, 1)`` column: the shape pytorch_grad_cam's targets index
    into."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(1)


def explain(
    run: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "gradcam",
    limit: int = 16,
    stain_norm: str | None = None,
    stain_reference: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write one overlay PNG per patch and ``grid.png`` of all of them into ``out``; returns the paths
    written.

    ``images``: image files (each one), folders of images (the first ``limit``) or stores (the first ``limit``
    labeled patches, half of each class where the store has enough, so both kinds of evidence are shown).
    Patches are stain-normalised as the run's :class:`~histodetect.infer.engine.Predictor` would (``stain_norm``,
    ``stain_reference``), and shown as the model saw them.
    """
    if method not in METHODS:
        raise InferError(f"--method {method!r}: choose from {', '.join(METHODS)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise InferError(f"--limit {limit}: must be 1..{MAX_LIMIT} (a figure per patch, and a grid of them all)")
    if not images:
        raise InferError("no images given: pass image files or a store")
    model, config = load_model(run)
    selected = [_select(Path(path), limit) for path in images]
    ids = np.concatenate([s.ids for s in selected])
    labels = np.concatenate([s.labels for s in selected])
    pixels = np.concatenate([s.patches[:] for s in selected])
    stain = choose_stain([(str(run), config.stain_norm, run_stain(Path(run)))], stain_norm, stain_reference)
    if stain is not None:
        pixels = stain(torch.from_numpy(pixels)).numpy()
    heat, probabilities = cams(model, pixels, method)
    overlays = np.stack([overlay(patch, cam) for patch, cam in zip(pixels, heat, strict=True)])
    out = Path(out)
    written = []
    for i, (id_, label, p) in enumerate(zip(ids, labels, probabilities, strict=True)):
        written.append(
            _save(
                _patch_figure(pixels[i], overlays[i], str(id_), int(label), float(p), method),
                out / f"{i:03d}_{id_}.png",
            )
        )
    captions = [f"p={p:.3f}\n{str(id_)[:10]}" for id_, p in zip(ids, probabilities, strict=True)]
    grid = patch_grid(
        overlays,
        captions=captions,
        frame_colors=[CLASS_COLORS[int(c)] for c in labels],
        legend=sorted({int(c) for c in labels}),
    )
    written.append(_save(grid, out / "grid.png"))
    return written


def cams(model: Classifier, pixels: np.ndarray, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps ``(n, H, W)`` in ``[0, 1]`` (each scaled to its own maximum) and probabilities ``(n,)`` for
    uint8 ``(n, H, W, 3)`` patches, from ``model.cam_layer``."""
    model = model.float().eval()
    heat, logits = [], []
    with METHODS[method](model=_LogitColumn(model), target_layers=[model.cam_layer]) as cam:
        for start in range(0, len(pixels), CAM_BATCH):
            x = to_float(torch.from_numpy(np.ascontiguousarray(pixels[start : start + CAM_BATCH])))
            heat.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(x)))
            logits.append(cam.outputs[:, 0].detach().float())
    return np.concatenate(heat), torch.sigmoid(torch.cat(logits)).numpy()


def _select(path: Path, limit: int) -> PatchSet:
    """An image file; the first ``limit`` images of a folder; ``limit`` patches of a store (see below)."""
    if is_store(path):
        return _store_selection(Store(path), limit)
    found = open_source(path)
    return found if path.is_file() else _first(found, limit)


def _first(patch_set: PatchSet, limit: int) -> PatchSet:
    return patch_set.take(np.arange(min(limit, len(patch_set))))


def _store_selection(store: Store, limit: int) -> PatchSet:
    """The first ``limit`` labeled patches, balanced between the classes as far as the store allows; the first
    ``limit`` patches of the default split when the store has no labels."""
    labeled = store.rows(labeled=True)
    if len(labeled) == 0:
        return _first(store_patches(store), limit)
    positives = labeled[store.labels[labeled] == 1]
    negatives = labeled[store.labels[labeled] == 0]
    n_pos = min(len(positives), max(limit - len(negatives), limit // 2))
    n_neg = min(len(negatives), limit - n_pos)
    rows = np.sort(np.concatenate([positives[:n_pos], negatives[:n_neg]]))
    return PatchSet(store.ids[rows], store.labels[rows], StoreRows(store, rows), str(store.path))


def overlay(patch: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The uint8 patch under its heatmap, as every explain figure (and the web app) shows it."""
    return show_cam_on_image(patch.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=HEAT_WEIGHT)


@styled
def _patch_figure(patch: np.ndarray, overlay: np.ndarray, id_: str, label: int, p: float, method: str) -> Figure:
    """The patch beside its heatmap, centre box on both, titled with the probability (and the label if
    known)."""
    fig = Figure(figsize=(4.4, 2.5), layout="constrained")
    for ax, image, name in zip(fig.subplots(1, 2), (patch, overlay), ("patch", method), strict=True):
        ax.imshow(image, interpolation="nearest")
        draw_centre_box(ax, size=image.shape[0])
        ax.set_axis_off()
        ax.set_title(name, fontsize=8, loc="center")
    truth = f" · label {label} ({CLASS_NAMES[label]})" if label in (0, 1) else ""
    fig.suptitle(f"p(tumour) = {p:.3f}{truth}\n{id_}", fontsize=8)
    return fig


def _save(fig: Figure, target: Path) -> Path:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return target
