"""Augmentation of whole batches as tensors, on whatever device the batch is on.

Per-image Python augmentation would starve a GPU that eats thousands of 96 px patches a second, so each op
draws its random numbers for the whole batch and applies them all at once. All randomness comes from a CPU
``torch.Generator`` the caller owns (drawn on CPU, then moved to the batch's device), so a run is reproducible
and can resume with its augmentation stream where it stopped.

Why these transforms: a patch has no canonical orientation, so all 8 flips/rotations (the dihedral group)
are equally real; colour varies with each lab's staining, so colour jitter acts on the stain amounts (HED
space) rather than on hue; and the label depends on the centre 32x32 pixels only, which shapes CutMix's
labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DIHEDRAL = range(8)
# dihedral(dihedral(x, k), _INVERSE[k]) == x: rotations undo by the opposite turn, reflections by themselves.
_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)

# Ruifrok & Johnston (2001) stain vectors, rows haematoxylin, eosin, DAB, as in skimage.color.rgb2hed.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_EPS = 1e-6  # skimage's floor for intensities before the log; it also sets the unit of stain amounts

# The label of a patch says whether its centre 32x32 pixels (the middle third of 96) contain tumour.
CENTRE_FRACTION = 1 / 3


def to_float(batch: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` as stored -> float ``(B, 3, H, W)`` in ``[0, 1]``, the input every model takes.

    ``channels_last`` keeps the NHWC memory layout (free here: it is the stored one), which is faster for conv
    nets on GPUs with tensor cores and on CPUs with bf16.
    """
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {batch.dtype} {tuple(batch.shape)}")
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th of the 8 symmetries of the square on ``(..., H, W)``: ``k % 4`` quarter turns counter-
    clockwise, then a left-right flip when ``k >= 4``. ``k = 0`` is the identity."""
    if k not in DIHEDRAL:
        raise ValueError(f"k must be in 0..7, not {k}")
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo ``dihedral(·, k)``: maps a prediction made on a transformed patch (a CAM) back onto the patch."""
    return dihedral(x, _INVERSE[k])


class BatchAugment:
    """Random dihedral transform, H&E stain jitter, brightness and contrast, each per sample; 0/False = off.

    ``hed``: each stain amount is scaled by ``1 + U(-hed, hed)`` and shifted by ``U(-hed, hed)`` (Tellez et
    al. 2018), in natural-log optical density (the Ruifrok & Johnston stain basis).
    ``brightness``: pixels times ``1 + U(-b, b)``. ``contrast``:
    distance from the patch's mean grey times ``1 + U(-c, c)``. Values are clamped to ``[0, 1]`` after each
    colour op.
    """

    def __init__(
        self, *, dihedral: bool = True, hed: float = 0.0, brightness: float = 0.0, contrast: float = 0.0
    ) -> None:
        for name, value in (("hed", hed), ("brightness", brightness), ("contrast", contrast)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} strength must be in [0, 1), not {value}")
        self.dihedral = dihedral
        self.hed = hed
        self.brightness = brightness
        self.contrast = contrast

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float ``(B, 3, H, W)`` batch in ``[0, 1]``: a new tensor of the same shape and layout."""
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        if self.dihedral:
            x = random_dihedral(x, generator)
        if self.hed:
            x = hed_jitter(x, _uniform(generator, (x.shape[0], 2, 3), self.hed, x.device))
        if self.brightness:
            x = (x * (1 + _uniform(generator, (x.shape[0], 1, 1, 1), self.brightness, x.device))).clamp_(0, 1)
        if self.contrast:
            x = adjust_contrast(x, 1 + _uniform(generator, (x.shape[0], 1, 1, 1), self.contrast, x.device))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float, device: torch.device) -> torch.Tensor:
    """``U(-bound, bound)`` drawn on CPU from ``generator`` (its home), then moved to the batch's device."""
    return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(device)


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the 8 symmetries per sample, uniformly and branch-free: the three bits of k in 0..7 choose a
    transpose, a vertical and a horizontal flip, which together generate the whole group (square patches)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"random dihedral transforms need square images, not {tuple(x.shape[-2:])}")
    k = torch.randint(0, 8, (x.shape[0],), generator=generator).to(x.device)
    for bit, op in ((1, lambda t: t.transpose(-2, -1)), (2, lambda t: t.flip(-2)), (4, lambda t: t.flip(-1))):
        x = torch.where((k & bit).bool().view(-1, 1, 1, 1), op(x), x)
    return x


def hed_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Perturb stain amounts: ``params[:, 0]`` scales (as ``1 + p``) and ``params[:, 1]`` shifts H, E and D.

    RGB -> optical density -> stains is linear after the log, so the whole perturbation is one per-sample 3x3
    matrix and offset on optical density: ``od' = R^T diag(1 + a) M^T od + R^T b`` (``M = R^-1``).
    """
    rgb_from_hed = RGB_FROM_HED.to(x.device, torch.float32)
    hed_from_rgb = HED_FROM_RGB.to(x.device, torch.float32)
    scale, shift = 1 + params[:, 0].float(), params[:, 1].float()
    matrix = rgb_from_hed.T @ (scale[:, :, None] * hed_from_rgb.T)  # (B, 3, 3)
    offset = shift @ rgb_from_hed  # (B, 3), = R^T b per sample
    # Natural-log optical density, the unit of Tellez et al.'s shifts; skimage >= 0.19 divides it by -log(1e-6),
    # which would make a shift of 0.05 a 2x change of intensity instead of a few percent.
    od = -torch.log(x.float().clamp(min=_EPS))  # (B, 3, H, W)
    od = torch.einsum("bij,bjhw->bihw", matrix, od) + offset[:, :, None, None]
    return torch.exp(-od).clamp_(0, 1).to(x.dtype)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each patch's distance from its own mean grey level (as torchvision does) by its own factor."""
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(-2, -1)).view(-1, 1, 1, 1)
    return ((x - grey) * factor + grey).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------- mixing
def mix_batch(
    x: torch.Tensor, y: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix a batch with a random permutation of itself; returns images and soft float labels.

    With both alphas > 0 one of the two is picked per batch with p = 0.5 (as timm does); with both 0 the batch
    comes back unchanged, labels as float. Mixing ratios are ``Beta(alpha, alpha)``, one per batch.

    CutMix labels follow the centre, not the area: a patch's label only says whether its centre 32x32 pixels
    hold tumour, so a box pasted into the border carries tissue that decides nothing, while a box over the
    whole centre carries exactly what decided the other patch's label. The mixed label is therefore weighted
    by the fraction of the centre region the box covers (the paper's area rule would mislabel both cases).
    """
    y = y.float()
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, y
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator).item() < 0.5)
    lam = _beta(generator, cutmix_alpha if use_cutmix else mixup_alpha)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    if use_cutmix:
        return _cutmix(x, y, perm, lam, generator)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def _beta(generator: torch.Generator, alpha: float) -> float:
    """One ``Beta(alpha, alpha)`` draw. torch.distributions cannot take a generator, so numpy draws it from a
    seed taken from ``generator``: still one reproducible stream."""
    seed = int(torch.randint(0, 2**62, (), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _cutmix(
    x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one box (area ``1 - lam`` before clipping at the border, centred uniformly) from the permuted
    batch; the label weight is the share of the centre region the clipped box covers."""
    height, width = x.shape[-2:]
    box_h, box_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    weight = _centre_overlap((top, bottom, left, right), height, width)
    return mixed, (1 - weight) * y + weight * y[perm]


def _centre_overlap(box: tuple[int, int, int, int], height: int, width: int) -> float:
    """Fraction of the centre region (the middle third each way: 32x32 of 96x96) that ``box`` covers."""
    top, bottom, left, right = box
    c_top, c_bottom = _centre_span(height)
    c_left, c_right = _centre_span(width)
    overlap_h = max(0, min(bottom, c_bottom) - max(top, c_top))
    overlap_w = max(0, min(right, c_right) - max(left, c_left))
    return overlap_h * overlap_w / ((c_bottom - c_top) * (c_right - c_left))


def _centre_span(size: int) -> tuple[int, int]:
    start = round(size * (1 - CENTRE_FRACTION) / 2)
    return start, size - start
