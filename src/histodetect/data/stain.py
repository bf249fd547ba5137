"""Stain normalisation of whole batches as tensors (Macenko, Reinhard), on whatever device the batch is on.

A model trained on one lab's H&E meets another lab's slides fainter, darker, pinker or bluer. Normalisation maps a
patch's stains onto a reference's: Macenko (2009) estimates the patch's haematoxylin and eosin vectors in optical
density and rescales each stain's amount to the reference's; Reinhard (2001) matches the mean and spread of each
channel in CIE L*a*b*.

The maths is torchstain's (a maintained implementation; its defaults ``Io=240, alpha=1, beta=0.15``): its fit
estimates one image's statistics, and is used here for the reference and for a slide's tissue; its normalisers take
one image at a time, which would cost a Python loop per patch, so :class:`StainNormalizer` does the same per-patch
fit and mapping for a whole batch at once (tests check that it agrees with torchstain patch by patch), except that
Macenko keeps what the two stains do not explain (:data:`KEEP_RESIDUAL`). Given a
``source`` fit (a slide's, fitted once on its tissue) every patch is mapped with that one fit instead: neighbouring
windows are normalised alike and the cost is a 3x3 matrix per pixel.

A patch with too little stain to fit (glass, a near-white border) or whose two stain vectors come out nearly the
same (a patch of one stain: pure stroma) is left as it is and counted in ``fallbacks``: normalising it would
invent a second stain or divide by almost nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodetect.errors import UserError
from histodetect.io import atomic_write_json

METHODS = ("none", "macenko", "reinhard")
LIGHT = 240.0  # torchstain's Io: the transmitted light intensity; brighter pixels are glass
ALPHA = 1.0  # Macenko: the stain vectors are the alpha-th and (100 - alpha)-th percentile angles
BETA = 0.15  # optical density below this in any channel is transparent and left out of a fit
MAX_PERCENTILE = 99.0  # a stain's amount is measured by this percentile of its concentrations
# A channel's optical density is >= BETA at levels up to this one: -log((I + 1) / LIGHT) >= BETA
STAINED_LEVEL = math.floor(LIGHT * math.exp(-BETA) - 1)
MIN_STAINED = 0.05  # share of a patch's pixels that must be stained for a fit of its own; else it is left as it is
MAX_STAIN_COSINE = 0.98  # H and E vectors closer than this (about 11 degrees) are one stain: left as it is
# Per-patch fits look at every 4th pixel each way (576 of a 96 px patch's 9,216): the fit's percentiles move by
# about 1% and it costs a quarter of a stride of 2; the mapping applies to every pixel.
FIT_STRIDE = 4
# What the two stains do not explain (the optical density off their plane) stays as it was; torchstain drops it. On the
# CPU preset's held-out patches (a model trained without normalisation, one fit per set as for a slide) dropping it
# cost 0.030 ROC AUC on the untouched patches, keeping it 0.0007. With it, a patch mapped with its own fit comes back
# as it was.
KEEP_RESIDUAL = True
REFERENCE_PATCHES = 512  # training patches the run's own reference is fitted on
STAIN_FILE = "stain.json"  # in a run folder: the reference the run recorded from its training patches

# sRGB (D65) <-> XYZ and the reference white, as torchstain's rgb2lab/lab2rgb (and OpenCV).
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


class StainError(UserError):
    """A stain reference that cannot be read or used."""


@dataclass(frozen=True)
class StainFit:
    """The stain statistics of one image (a reference, a slide's tissue): both methods' at once, so one reference
    serves either. ``stains``: Macenko's 3x2 stain matrix (RGB optical density; columns haematoxylin, eosin);
    ``max_concentrations``: the 99th percentile amount of each; ``lab_mean``/``lab_std``: per L*a*b* channel
    (L in 0..100); ``pixels``: how many pixels it was fitted on."""

    stains: tuple[tuple[float, float], ...]
    max_concentrations: tuple[float, float]
    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    pixels: int

    def to_dict(self) -> dict[str, Any]:
        return {key: _rounded(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> StainFit:
        try:
            fit = cls(
                stains=tuple((float(a), float(b)) for a, b in data["stains"]),
                max_concentrations=(float(data["max_concentrations"][0]), float(data["max_concentrations"][1])),
                lab_mean=tuple(float(v) for v in data["lab_mean"]),  # type: ignore[arg-type]
                lab_std=tuple(float(v) for v in data["lab_std"]),  # type: ignore[arg-type]
                pixels=int(data["pixels"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StainError(f"{source}: not a stain reference ({exc!r})") from None
        if len(fit.stains) != 3 or len(fit.lab_mean) != 3 or len(fit.lab_std) != 3:
            raise StainError(f"{source}: not a stain reference (expected a 3x2 stain matrix and 3 L*a*b* channels)")
        values = [*np.ravel(fit.stains), *fit.max_concentrations, *fit.lab_mean, *fit.lab_std]
        if not np.isfinite(values).all() or min(fit.max_concentrations) <= 0 or min(fit.lab_std) <= 0:
            raise StainError(f"{source}: the stain reference holds non-finite or non-positive statistics")
        return fit


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, tuple | list):
        return [_rounded(v) for v in value]
    return value


def fit_stains(pixels: np.ndarray | torch.Tensor) -> StainFit:
    """The stain statistics of uint8 ``(..., 3)`` RGB pixels taken together (patches, a slide's tissue windows), by
    torchstain's own fits. Raises :class:`StainError` when they hold too little stain to fit."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    flat = torch.as_tensor(np.array(pixels)).reshape(-1, 3)  # its own copy: decoded images may be read-only
    if flat.dtype != torch.uint8:
        raise StainError(f"stain fits need uint8 RGB pixels, not {flat.dtype}")
    stained = int(_stained(flat).sum())
    if stained < max(16, MIN_STAINED * len(flat)):
        raise StainError(
            f"{stained} of {len(flat)} pixels are stained (optical density >= {BETA} in every channel): "
            "too little tissue to fit stains on"
        )
    image = flat.T.reshape(3, 1, -1)  # torchstain's (C, H, W)
    macenko = TorchMacenkoNormalizer()
    macenko.fit(image, Io=LIGHT, alpha=ALPHA, beta=BETA)
    lab_mean, lab_std = _lab_statistics(_cie_f(flat.unsqueeze(0)))
    stains = macenko.HERef.double()
    if not torch.isfinite(stains).all() or not (macenko.maxCRef > 0).all():
        raise StainError("the stains could not be separated (the pixels hold one stain, or none)")
    return StainFit(
        stains=tuple((float(a), float(b)) for a, b in stains.tolist()),
        max_concentrations=(float(macenko.maxCRef[0]), float(macenko.maxCRef[1])),
        lab_mean=tuple(lab_mean[0].tolist()),  # type: ignore[arg-type]
        lab_std=tuple(lab_std[0].tolist()),  # type: ignore[arg-type]
        pixels=len(flat),
    )


def read_reference(path: str | os.PathLike[str]) -> StainFit:
    """A stain reference from ``path``: a ``stain.json`` (a run's, or one written by :func:`write_reference`) or
    an image of the target lab (a patch or a region: PNG, JPEG, TIFF), fitted here."""
    path = Path(path)
    if not path.is_file():
        raise StainError(f"--stain-reference {path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StainError(f"{path}: unreadable stain reference ({exc})") from None
        return StainFit.from_dict(data.get("reference", data) if isinstance(data, dict) else {}, source=str(path))
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise StainError(f"--stain-reference {path}: not a readable image ({exc})") from None
    try:
        return fit_stains(pixels)
    except StainError as exc:
        raise StainError(f"--stain-reference {path}: {exc}") from None


def write_reference(path: str | os.PathLike[str], reference: StainFit, *, source: str) -> Path:
    """Record a reference (``stain.json`` in a run folder): its statistics and where they came from."""
    return atomic_write_json(path, {"source": source, "reference": reference.to_dict()})


def reference_patches(patches: np.ndarray) -> np.ndarray:
    """The patches (uint8 ``(N, H, W, 3)``) with stain on at least half their pixels, or all of them when none
    has: a reference describes tissue, not glass."""
    stained = _stained(torch.from_numpy(np.ascontiguousarray(patches))).float().mean(dim=(1, 2)).numpy()
    return patches[stained >= 0.5] if (stained >= 0.5).any() else patches


def spread(n: int, limit: int = REFERENCE_PATCHES) -> np.ndarray:
    """Up to ``limit`` indices spread evenly over ``range(n)``, sorted."""
    return np.unique(np.linspace(0, n - 1, min(limit, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


class StainNormalizer:
    """Maps uint8 ``(B, H, W, 3)`` batches onto ``reference`` by ``method`` (``macenko`` or ``reinhard``).

    ``patches`` and ``fallbacks`` count what went through and what was left as it is; they are plain counters,
    approximate when several threads share one normaliser.
    """

    def __init__(self, method: str, reference: StainFit, *, reference_source: str = "") -> None:
        if method not in METHODS or method == "none":
            raise StainError(f"--stain-norm {method!r}: choose from {', '.join(METHODS)}")
        self.method = method
        self.reference = reference
        self.reference_source = reference_source
        self.patches = 0
        self.fallbacks = 0

    def describe(self) -> dict[str, Any]:
        """What a run, an evaluation or a slide records about its normalisation."""
        return {
            "method": self.method,
            "reference_source": self.reference_source,
            "reference": self.reference.to_dict(),
            "patches": self.patches,
            "fallbacks": self.fallbacks,
        }

    def __call__(self, pixels: torch.Tensor, source: StainFit | None = None) -> torch.Tensor:
        """The normalised uint8 batch, same shape and device. ``source``: map every patch with this one fit (a
        slide's) instead of fitting each patch on its own."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
        if not len(pixels):
            return pixels
        normalise = _macenko if self.method == "macenko" else _reinhard
        with torch.autocast(pixels.device.type, enabled=False):  # float32 even inside a bf16 training step
            out, ok = normalise(pixels, self.reference, source)
        self.patches += len(pixels)
        self.fallbacks += int((~ok).sum())
        return out


def _stained(pixels: torch.Tensor) -> torch.Tensor:
    """Which uint8 RGB pixels ``(..., 3)`` are stained: optical density >= BETA in every channel, i.e. no level
    above STAINED_LEVEL (compared on the levels: a third of the time of the optical density's log)."""
    brightest = torch.maximum(torch.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])
    return brightest <= STAINED_LEVEL


# ---------------------------------------------------------------------------------------------- Macenko
def _optical_density(x: torch.Tensor) -> torch.Tensor:
    """torchstain's optical density of float RGB in 0..255: ``-log((I + 1) / Io)`` (in place on a new tensor)."""
    return (x + 1).log_().neg_().add_(math.log(LIGHT))


def _macenko(pixels: torch.Tensor, reference: StainFit, source: StainFit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(B, H, W, 3)`` -> (normalised uint8, which patches were fitted; the others come back as they were:
    their mapping is the identity)."""
    b, h, w, _ = pixels.shape
    device = pixels.device
    ref_stains = torch.tensor(reference.stains, dtype=torch.float32, device=device)  # (3, 2)
    ref_max = torch.tensor(reference.max_concentrations, dtype=torch.float32, device=device)
    if source is not None:
        stains = torch.tensor(source.stains, dtype=torch.float32, device=device).expand(b, 3, 2)
        unmix = torch.linalg.pinv(stains)  # (B, 2, 3): optical density -> the two stains' concentrations
        max_c = torch.tensor(source.max_concentrations, dtype=torch.float32, device=device).expand(b, 2)
        ok = torch.ones(b, dtype=torch.bool, device=device)
    else:
        sub = pixels[:, ::FIT_STRIDE, ::FIT_STRIDE]
        sample = _optical_density(sub.float()).reshape(b, -1, 3)
        stains, ok = _stain_vectors(sample, _stained(sub).reshape(b, -1))
        unmix = torch.linalg.pinv(stains)
        max_c = _percentile(unmix @ sample.transpose(1, 2), MAX_PERCENTILE)  # (B, 2)
        ok &= torch.isfinite(max_c).all(dim=1) & (max_c > 1e-3).all(dim=1)
    # concentrations in the patch's own stains, each rescaled to the reference's amount, recomposed in its stains
    mapping = ref_stains @ ((ref_max / max_c)[:, :, None] * unmix)  # (B, 3, 3) on OD
    if KEEP_RESIDUAL:  # what the two stains do not explain stays as it was
        mapping = mapping + torch.eye(3, device=device) - stains @ unmix
    mapping = torch.where(ok.view(-1, 1, 1), mapping, torch.eye(3, device=device))
    # LIGHT * exp(-M od) with od = log(LIGHT) - log(1 + I) is exp(M log(1 + I) + log(LIGHT) (1 - M 1)): two passes
    # over the pixels fewer. Less torchstain's +1 (which brightens every pixel by one level) and rounded, so the
    # identity mapping gives a patch back exactly. log(I + 1) is exact in float32 for I in 0..255 and half the time
    # of log1p on a CPU.
    # Channels first, so that the per-channel offset is added along contiguous rows (across the 3 channels of each
    # pixel it took three times as long).
    offset = math.log(LIGHT) * (1 - mapping.sum(dim=2))  # (B, 3)
    log_light = _channels_first(pixels).add_(1).log_()
    out = torch.bmm(mapping, log_light).add_(offset.unsqueeze(2)).exp_().sub_(0.5)
    return _to_uint8(out).transpose(1, 2).reshape(b, h, w, 3), ok


def _channels_first(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, H * W)``, contiguous, in one pass."""
    b = pixels.shape[0]
    out = torch.empty((b, 3, pixels[0, ..., 0].numel()), dtype=torch.float32, device=pixels.device)
    return out.copy_(pixels.reshape(b, -1, 3).transpose(1, 2))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float levels -> uint8, truncated after clamping to 0..255. On a CPU through NumPy: its conversion takes a
    quarter of torch's (a batch of 64 patches of 96 px, one thread)."""
    x = x.clamp_(0, 255)
    return torch.from_numpy(x.numpy().astype(np.uint8)) if x.device.type == "cpu" else x.to(torch.uint8)


def _stain_vectors(od: torch.Tensor, stained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's Macenko stain matrix ``(B, 3, 2)`` (haematoxylin first) from its optical density ``(B, N, 3)``
    and which of its pixels are stained ``(B, N)`` (:func:`_stained`), and whether it could be fitted (enough stained
    pixels, two distinct stains)."""
    n_pixels = od.shape[1]
    count = stained.sum(dim=1)
    ok = count >= max(3, int(MIN_STAINED * n_pixels))
    weight = stained.unsqueeze(-1).float()
    mean = (od * weight).sum(dim=1) / count.clamp(min=1).unsqueeze(-1)
    centred = (od - mean.unsqueeze(1)) * weight
    cov = centred.transpose(1, 2) @ centred / (count - 1).clamp(min=1).view(-1, 1, 1)
    cov = torch.where(ok.view(-1, 1, 1), cov, torch.eye(3, device=od.device))  # keeps eigh away from empty patches
    _, vectors = torch.linalg.eigh(cov)
    plane = vectors[:, :, 1:3]  # (B, 3, 2): the two largest eigenvalues
    projected = plane.transpose(1, 2) @ od.transpose(1, 2)  # (B, 2, N): contiguous rows for atan2
    angle = torch.atan2(projected[:, 1], projected[:, 0])
    low = _nth(angle, stained, count, ALPHA)
    high = _nth(angle, stained, count, 100 - ALPHA)
    v_min = (plane @ torch.stack((low.cos(), low.sin()), dim=1).unsqueeze(-1)).squeeze(-1)  # (B, 3)
    v_max = (plane @ torch.stack((high.cos(), high.sin()), dim=1).unsqueeze(-1)).squeeze(-1)
    first = (v_min[:, 0] > v_max[:, 0]).view(-1, 1, 1)
    stains = torch.where(first, torch.stack((v_min, v_max), dim=2), torch.stack((v_max, v_min), dim=2))
    cosine = (v_min * v_max).sum(dim=1) / (v_min.norm(dim=1) * v_max.norm(dim=1)).clamp(min=1e-12)
    ok &= torch.isfinite(stains).all(dim=(1, 2)) & (cosine.abs() < MAX_STAIN_COSINE)
    return torch.where(ok.view(-1, 1, 1), stains, torch.eye(3, 2, device=od.device)), ok


def _nth(values: torch.Tensor, kept: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of each row's ``kept`` values (``count`` of them), torchstain's way (nearest rank),
    by ``topk`` from the nearer end: the 1st and 99th of 576 values are the 7th from either end, a sort of the
    whole row took 15 times longer."""
    rank = (q / 100 * (count - 1).clamp(min=0).double()).round().long()  # from the bottom, among the kept
    from_top = q > 50
    if from_top:
        rank = (count - 1).clamp(min=0) - rank
    hidden = float("-inf") if from_top else float("inf")
    k = min(int(rank.max()) + 1, values.shape[1])
    nearest = values.masked_fill(~kept, hidden).topk(k, dim=1, largest=from_top).values
    return nearest.gather(1, rank.clamp(max=k - 1).unsqueeze(1)).squeeze(1)


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (nearest rank, as torchstain) along the last axis: the ``n - k + 1``-th largest, by
    ``topk`` (a few of 576 values; ``torch.quantile`` also refuses more than 2^24 values, a GPU batch)."""
    n = values.shape[-1]
    k = 1 + round(q / 100 * (n - 1))
    return values.topk(n - k + 1, dim=-1).values[..., -1]


# ---------------------------------------------------------------------------------------------- Reinhard
# CIE L*a*b* is an affine map of f = (f(X/Xn), f(Y/Yn), f(Z/Zn)), f a cube root near white: L = 116 fy - 16,
# a = 500 (fx - fy), b = 200 (fy - fz). Reinhard's per-channel rescaling in L*a*b* is therefore an affine map of f
# too, so a batch is mapped in f without ever holding its L*a*b*, and its statistics come from f's mean and 3x3
# covariance. With the lookup of linear light and the knees below, a 64-patch batch fitted patch by patch took a
# third of the time of converting to L*a*b* and back (0.53 against 1.6 ms a patch, one thread).
_LAB_FROM_F = torch.tensor([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64)
_LAB_OFFSET = torch.tensor([-16.0, 0.0, 0.0], dtype=torch.float64)
_F_FROM_LAB = torch.linalg.inv(_LAB_FROM_F)
_F_KNEE = 0.2068966  # f at the cube root's knee (6/29): below it f is linear in XYZ
# sRGB levels 0..255 -> linear light (D65), as torchstain's rgb2lab; one lookup instead of a power per pixel
_LEVELS = torch.arange(256, dtype=torch.float64) / 255
_LINEAR = torch.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92).float()


def _cie_f(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(B, N, 3)`` -> f ``(B, 3, N)`` (channels first), torchstain's (and OpenCV's) formulas."""
    linear = _LINEAR.to(pixels.device).take(pixels.transpose(1, 2).long())
    xyz = (_XYZ_FROM_RGB / _WHITE.view(3, 1)).to(pixels.device) @ linear
    return _kneed(xyz, 0.008856, 7.787, lambda v: v.log_().div_(3).exp_())  # exp(log / 3): a third of ** (1 / 3)


def _srgb_from_f(f: torch.Tensor) -> torch.Tensor:
    """f ``(B, 3, N)`` -> sRGB levels ``(B, 3, N)``, float, not yet clipped to 0..255: the inverse of
    :func:`_cie_f`."""
    xyz = _kneed(f, _F_KNEE, 1 / 7.787, lambda v: v.mul(v).mul_(v))
    linear = (_RGB_FROM_XYZ * _WHITE).to(f.device) @ xyz
    return _kneed(linear, 0.0031308, 12.92, lambda v: v.log_().div_(2.4).exp_().mul_(1.055).sub_(0.055)).mul_(255)


def _kneed(x: torch.Tensor, knee: float, slope: float, curve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``curve(x)`` above ``knee`` and the line of ``slope`` through it below, as sRGB's and CIE's piecewise
    formulas are (they meet at the knee): ``curve(max(x, knee)) + min(slope (x - knee), 0)``. The same as a
    ``torch.where`` on ``x > knee``, without the comparison and the branch per value, which took most of the
    conversion's time on a CPU. ``curve`` may work in place on the tensor it is given."""
    return curve(x.clamp(min=knee)).add_(x.sub(knee).mul_(slope).clamp_(max=0))


def _lab_statistics(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's L*a*b* mean and (unbiased) standard deviation, ``(B, 3)`` each, from its f ``(B, 3, N)``."""
    n = f.shape[2]
    mean_f = f.mean(dim=2)
    centred = f - mean_f.unsqueeze(2)
    centred = centred.double()  # float32 sums of millions of squares (a fit on a slide) drift by 0.3%
    cov = centred @ centred.transpose(1, 2) / max(n - 1, 1)  # (B, 3, 3)
    lab_from_f = _LAB_FROM_F.to(f.device)
    mean = mean_f.double() @ lab_from_f.T + _LAB_OFFSET.to(f.device)
    std = torch.diagonal(lab_from_f @ cov @ lab_from_f.T, dim1=1, dim2=2).clamp(min=0).sqrt()
    return mean, std


def _reinhard(pixels: torch.Tensor, reference: StainFit, source: StainFit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(B, H, W, 3)`` -> (normalised uint8, which patches were mapped; the others as they were)."""
    b, h, w, _ = pixels.shape
    device = pixels.device
    f = _cie_f(pixels.reshape(b, -1, 3))
    target_mean = torch.tensor(reference.lab_mean, dtype=torch.float64, device=device)
    target_std = torch.tensor(reference.lab_std, dtype=torch.float64, device=device)
    if source is not None:
        mean = torch.tensor(source.lab_mean, dtype=torch.float64, device=device).expand(b, 3)
        std = torch.tensor(source.lab_std, dtype=torch.float64, device=device).expand(b, 3)
        ok = torch.ones(b, dtype=torch.bool, device=device)
    else:
        mean, std = _lab_statistics(f)
        stained = _stained(pixels).float().mean(dim=(1, 2))
        ok = (stained >= MIN_STAINED) & (std > 1e-3).all(dim=1)
        std = torch.where(ok.unsqueeze(1), std, torch.ones_like(std))  # finite; the patch is put back below
    # lab' = s (lab - mean) + target, s = target_std / std, with lab = A f + c: f' = A^-1 s A f + A^-1 (s (c - mean)
    # + target - c), one 3x3 matrix and offset per patch
    lab_from_f, f_from_lab, offset = _LAB_FROM_F.to(device), _F_FROM_LAB.to(device), _LAB_OFFSET.to(device)
    scale = target_std / std
    matrix = f_from_lab @ (scale.unsqueeze(2) * lab_from_f)
    shift = (scale * (offset - mean) + target_mean - offset) @ f_from_lab.T
    mapped = (matrix.float() @ f).add_(shift.float().unsqueeze(2))
    out = _to_uint8(_srgb_from_f(mapped)).transpose(1, 2).reshape(b, h, w, 3)  # truncated, as torchstain
    out[~ok] = pixels[~ok]  # exactly as they were, not converted there and back
    return out, ok
