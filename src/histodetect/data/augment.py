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
from dataclasses import dataclass

import numpy as np
import torch

DIHEDRAL = range(8)
# dihedral(dihedral(x, k), _INVERSE[k]) == x: rotations undo by the opposite turn, reflections by themselves.
_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)

# Ruifrok & Johnston (2001) stain vectors, rows haematoxylin, eosin, DAB, as in skimage.color.rgb2hed.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
# A cast that is neither stain: yellowing (an aged slide, old mounting medium) absorbs blue most. A unit vector in
# RGB optical density.
YELLOW = torch.tensor([0.10, 0.35, 0.93]) / torch.tensor([0.10, 0.35, 0.93]).norm()
# Half the samples keep their colours: the yellow cast is one-sided (never below none), so re-staining every sample
# would leave untouched patches at the edge of what the model sees, not at its centre.
STAIN_JITTER_P = 0.5
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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in ``[0, 1]`` -> uint8 ``(B, H, W, 3)`` rounded, as a scanner writes it: the inverse of
    :func:`to_float`, for re-stainings that must come back as patches."""
    return (x * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


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
    """Random dihedral transform, H&E stain jitter, another lab's staining, brightness and contrast, each per
    sample; 0/False = off.

    ``hed``: each stain amount is scaled by ``1 + U(-hed, hed)`` and shifted by ``U(-hed, hed)`` (Tellez et
    al. 2018), in natural-log optical density (the Ruifrok & Johnston stain basis).
    ``stain``: the stronger, lab-like re-staining of :func:`stain_jitter` (``train --stain-aug``).
    ``brightness``: pixels times ``1 + U(-b, b)``. ``contrast``:
    distance from the patch's mean grey times ``1 + U(-c, c)``. Values are clamped to ``[0, 1]`` after each
    colour op.
    """

    def __init__(
        self,
        *,
        dihedral: bool = True,
        hed: float = 0.0,
        stain: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
    ) -> None:
        for name, value in (("hed", hed), ("stain", stain), ("brightness", brightness), ("contrast", contrast)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} strength must be in [0, 1), not {value}")
        self.dihedral = dihedral
        self.hed = hed
        self.stain = stain
        self.brightness = brightness
        self.contrast = contrast

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float ``(B, 3, H, W)`` batch in ``[0, 1]``: a new tensor of the same shape and layout."""
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        if self.dihedral:
            x = random_dihedral(x, generator)
        if self.hed:
            x = hed_jitter(x, _uniform(generator, (x.shape[0], 2, 3), self.hed, x.device))
        if self.stain:
            x = stain_jitter(x, self.stain, generator)
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
    return restain(
        x, torch.diag_embed(1 + params[:, 0].float()), params[:, 1].float() @ RGB_FROM_HED.to(x.device).float()
    )


def restain(x: torch.Tensor, stains: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Re-stain float ``(B, 3, H, W)`` patches in ``[0, 1]``: stain amounts (H, E, D: Ruifrok & Johnston) mixed by
    the per-sample ``(B, 3, 3)`` matrix ``stains`` (diagonal: each stain scaled), then ``offset`` ``(B, 3)`` added to
    each RGB channel's optical density (a cast no stain explains: yellowing, a scanner's white balance).

    Linear after the log: ``od' = R^T S M^T od + offset`` (``M = R^-1``), in natural-log optical density.
    """
    rgb_from_hed = RGB_FROM_HED.to(x.device, torch.float32)
    hed_from_rgb = HED_FROM_RGB.to(x.device, torch.float32)
    matrix = rgb_from_hed.T @ stains.float() @ hed_from_rgb.T  # (B, 3, 3)
    # Natural-log optical density, the unit of Tellez et al.'s shifts; skimage >= 0.19 divides it by -log(1e-6),
    # which would make a shift of 0.05 a 2x change of intensity instead of a few percent.
    od = -torch.log(x.float().clamp(min=_EPS))  # (B, 3, H, W)
    od = torch.einsum("bij,bjhw->bihw", matrix, od) + offset.float()[:, :, None, None]
    return torch.exp(-od).clamp_(0, 1).to(x.dtype)


def stain_jitter(
    x: torch.Tensor, strength: float, generator: torch.Generator, *, p: float = STAIN_JITTER_P
) -> torch.Tensor:
    """Another lab's staining for each sample with probability ``p`` (``stain_aug``): each stain's
    amount times ``exp(U(-s, s))`` (0.61-1.65x at s = 0.5), up to ``s / 5`` of each of H and E bleeding into the
    other (other stain hues), a yellow cast of up to ``s / 2`` optical density along :data:`YELLOW`, and a white
    balance of up to ``s / 4`` per RGB channel. The other samples keep their own lab's colours."""
    b, device = x.shape[0], x.device
    stains = torch.diag_embed(torch.exp(_uniform(generator, (b, 3), strength, device)))
    bleed = _uniform(generator, (b, 2), strength / 5, device)
    stains[:, 0, 1], stains[:, 1, 0] = bleed[:, 0], bleed[:, 1]
    yellow = (torch.rand((b, 1), generator=generator) * strength / 2).to(device) * YELLOW.to(device)
    offset = yellow + _uniform(generator, (b, 3), strength / 4, device)
    keep = (torch.rand((b,), generator=generator) >= p).to(device)
    stains = torch.where(keep.view(b, 1, 1), torch.eye(3, device=device), stains)
    offset = torch.where(keep.view(b, 1), torch.zeros((), device=device), offset)
    return restain(x, stains, offset)


def stain_pairs(
    x: torch.Tensor, y: torch.Tensor, strength: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch followed by the same patches, each re-stained by :func:`stain_jitter` as another lab's
    (``train --stain-consistency``): ``(2B, ...)`` images and their labels, so that a consistency loss can compare
    each patch's prediction with its re-staining's (:func:`histodetect.loss.paired_divergence`). A step costs twice
    what it did: the pairs are added, not put in place of half the batch, which saw half as many patches and lost
    more untouched AUC than it gained (docs/evaluation-and-prediction.md)."""
    return torch.cat([x, stain_jitter(x, strength, generator, p=1.0)]), torch.cat([y, y])


@dataclass(frozen=True)
class StainShift:
    """One fixed re-staining, as another lab's slides might look: ``h``, ``e`` scale the stain amounts, ``yellow``
    adds that much optical density along :data:`YELLOW`, ``white`` multiplies the R, G, B intensities."""

    h: float = 1.0
    e: float = 1.0
    yellow: float = 0.0
    white: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """The re-stained uint8 ``(N, H, W, 3)`` patches (rounded back to uint8, as a scanner writes them)."""
        x = to_float(torch.from_numpy(np.ascontiguousarray(pixels)))
        stains = torch.diag(torch.tensor([self.h, self.e, 1.0])).expand(len(x), 3, 3)
        offset = self.yellow * YELLOW - torch.log(torch.tensor(self.white))
        out = restain(x, stains, offset.expand(len(x), 3))
        return to_uint8(out)


# The re-stainings ``evaluate --stain-shifts`` scores: four labs' H&E (paler, darker, pinker, bluer) and two casts
# outside H&E (an aged, yellowed slide; a scanner's cool white balance). Chosen by hand, not tuned on any result.
STAIN_SHIFTS: dict[str, StainShift] = {
    "pale": StainShift(h=0.60, e=0.75),
    "dark": StainShift(h=1.40, e=1.35),
    "eosin-heavy": StainShift(h=0.85, e=1.55),
    "haematoxylin-heavy": StainShift(h=1.45, e=0.65),
    "yellowed": StainShift(e=0.9, yellow=0.12),
    "cool-white-balance": StainShift(white=(0.90, 0.97, 1.05)),
}


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
