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
    od = _optical_density(flat.float())
    stained = int((od >= BETA).all(dim=-1).sum())
    if stained < max(16, MIN_STAINED * len(flat)):
        raise StainError(
            f"{stained} of {len(flat)} pixels are stained (optical density >= {BETA} in every channel): "
            "too little tissue to fit stains on"
        )
    image = flat.T.reshape(3, 1, -1)  # torchstain's (C, H, W)
    macenko = TorchMacenkoNormalizer()
    macenko.fit(image, Io=LIGHT, alpha=ALPHA, beta=BETA)
    lab = _lab(flat.float().T.reshape(1, 3, 1, -1) / 255).reshape(3, -1)
    stains = macenko.HERef.double()
    if not torch.isfinite(stains).all() or not (macenko.maxCRef > 0).all():
        raise StainError("the stains could not be separated (the pixels hold one stain, or none)")
    return StainFit(
        stains=tuple((float(a), float(b)) for a, b in stains.tolist()),
        max_concentrations=(float(macenko.maxCRef[0]), float(macenko.maxCRef[1])),
        lab_mean=tuple(lab.mean(dim=1).tolist()),  # type: ignore[arg-type]
        lab_std=tuple(lab.std(dim=1).tolist()),  # type: ignore[arg-type]
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
    od = _optical_density(torch.from_numpy(np.ascontiguousarray(patches)).float())
    stained = (od >= BETA).all(dim=-1).float().mean(dim=(1, 2)).numpy()
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
        out, ok = normalise(pixels.float(), self.reference, source)
        self.patches += len(pixels)
        self.fallbacks += int((~ok).sum())
        return out


# ---------------------------------------------------------------------------------------------- Macenko
def _optical_density(x: torch.Tensor) -> torch.Tensor:
    """torchstain's optical density of float RGB in 0..255: ``-log((I + 1) / Io)`` (in place on a new tensor)."""
    return (x + 1).log_().neg_().add_(math.log(LIGHT))


def _macenko(x: torch.Tensor, reference: StainFit, source: StainFit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``(B, H, W, 3)`` in 0..255 -> (normalised uint8, which patches were fitted; the others come back as
    they were: their mapping is the identity)."""
    b, h, w, _ = x.shape
    ref_stains = torch.tensor(reference.stains, dtype=torch.float32, device=x.device)  # (3, 2)
    ref_max = torch.tensor(reference.max_concentrations, dtype=torch.float32, device=x.device)
    if source is not None:
        stains = torch.tensor(source.stains, dtype=torch.float32, device=x.device).expand(b, 3, 2)
        max_c = torch.tensor(source.max_concentrations, dtype=torch.float32, device=x.device).expand(b, 2)
        ok = torch.ones(b, dtype=torch.bool, device=x.device)
    else:
        sample = _optical_density(x[:, ::FIT_STRIDE, ::FIT_STRIDE]).reshape(b, -1, 3)
        stains, ok = _stain_vectors(sample)
        max_c = _percentile(torch.linalg.pinv(stains) @ sample.transpose(1, 2), MAX_PERCENTILE)  # (B, 2)
        ok &= torch.isfinite(max_c).all(dim=1) & (max_c > 1e-3).all(dim=1)
    # concentrations in the patch's own stains, each rescaled to the reference's amount, recomposed in its stains
    unmix = torch.linalg.pinv(stains)  # (B, 2, 3): optical density -> the two stains' concentrations
    mapping = ref_stains @ ((ref_max / max_c)[:, :, None] * unmix)  # (B, 3, 3) on OD
    if KEEP_RESIDUAL:  # what the two stains do not explain stays as it was
        mapping = mapping + torch.eye(3, device=x.device) - stains @ unmix
    mapping = torch.where(ok.view(-1, 1, 1), mapping, torch.eye(3, device=x.device))
    # LIGHT * exp(-M od) with od = log(LIGHT) - log(1 + I) is exp(M log(1 + I) + log(LIGHT) (1 - M 1)): two passes
    # over the pixels fewer. Less torchstain's +1 (which brightens every pixel by one level) and rounded, so the
    # identity mapping gives a patch back exactly.
    offset = math.log(LIGHT) * (1 - mapping.sum(dim=2))  # (B, 3)
    log_light = x.reshape(b, -1, 3).log1p_()
    out = (log_light @ mapping.transpose(1, 2)).add_(offset.unsqueeze(1)).exp_().sub_(0.5)
    return out.clamp_(0, 255).to(torch.uint8).reshape(b, h, w, 3), ok


def _stain_vectors(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's Macenko stain matrix ``(B, 3, 2)`` (haematoxylin first) from its optical density ``(B, N, 3)``,
    and whether it could be fitted (enough stained pixels, two distinct stains)."""
    n_pixels = od.shape[1]
    stained = (od >= BETA).all(dim=-1)  # (B, N)
    count = stained.sum(dim=1)
    ok = count >= max(3, int(MIN_STAINED * n_pixels))
    weight = stained.unsqueeze(-1).float()
    mean = (od * weight).sum(dim=1) / count.clamp(min=1).unsqueeze(-1)
    centred = (od - mean.unsqueeze(1)) * weight
    cov = centred.transpose(1, 2) @ centred / (count - 1).clamp(min=1).view(-1, 1, 1)
    cov = torch.where(ok.view(-1, 1, 1), cov, torch.eye(3, device=od.device))  # keeps eigh away from empty patches
    _, vectors = torch.linalg.eigh(cov)
    plane = vectors[:, :, 1:3]  # (B, 3, 2): the two largest eigenvalues
    projected = od @ plane  # (B, N, 2)
    angle = torch.atan2(projected[..., 1], projected[..., 0]).masked_fill(~stained, float("inf"))
    ordered = angle.sort(dim=1).values
    low = _nth(ordered, count, ALPHA)
    high = _nth(ordered, count, 100 - ALPHA)
    v_min = (plane @ torch.stack((low.cos(), low.sin()), dim=1).unsqueeze(-1)).squeeze(-1)  # (B, 3)
    v_max = (plane @ torch.stack((high.cos(), high.sin()), dim=1).unsqueeze(-1)).squeeze(-1)
    first = (v_min[:, 0] > v_max[:, 0]).view(-1, 1, 1)
    stains = torch.where(first, torch.stack((v_min, v_max), dim=2), torch.stack((v_max, v_min), dim=2))
    cosine = (v_min * v_max).sum(dim=1) / (v_min.norm(dim=1) * v_max.norm(dim=1)).clamp(min=1e-12)
    ok &= torch.isfinite(stains).all(dim=(1, 2)) & (cosine.abs() < MAX_STAIN_COSINE)
    return torch.where(ok.view(-1, 1, 1), stains, torch.eye(3, 2, device=od.device)), ok


def _nth(ordered: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of each row's first ``count`` sorted values, torchstain's way (nearest rank)."""
    index = (q / 100 * (count - 1).clamp(min=0).double()).round().long()
    return ordered.gather(1, index.unsqueeze(1)).squeeze(1)


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (nearest rank, as torchstain) along the last axis: the ``n - k + 1``-th largest, by
    ``topk`` (a few of 576 values; ``torch.quantile`` also refuses more than 2^24 values, a GPU batch)."""
    n = values.shape[-1]
    k = 1 + round(q / 100 * (n - 1))
    return values.topk(n - k + 1, dim=-1).values[..., -1]


# ---------------------------------------------------------------------------------------------- Reinhard
def _reinhard(x: torch.Tensor, reference: StainFit, source: StainFit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``(B, H, W, 3)`` in 0..255 -> (normalised uint8, which patches were mapped; the others as they were)."""
    b = x.shape[0]
    lab = _lab(x.permute(0, 3, 1, 2) / 255)  # (B, 3, H, W)
    target_mean = torch.tensor(reference.lab_mean, device=x.device).view(1, 3, 1, 1)
    target_std = torch.tensor(reference.lab_std, device=x.device).view(1, 3, 1, 1)
    if source is not None:
        mean = torch.tensor(source.lab_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(source.lab_std, device=x.device).view(1, 3, 1, 1)
        ok = torch.ones(b, dtype=torch.bool, device=x.device)
    else:
        mean = lab.mean(dim=(2, 3), keepdim=True)
        std = lab.flatten(2).std(dim=2).view(b, 3, 1, 1)
        stained = (_optical_density(x) >= BETA).all(dim=-1).float().mean(dim=(1, 2))
        ok = (stained >= MIN_STAINED) & (std > 1e-3).all(dim=1).view(-1)
        std = torch.where(ok.view(-1, 1, 1, 1), std, torch.ones_like(std))
    rgb = _rgb((lab - mean) / std * target_std + target_mean)
    out = (rgb * 255).permute(0, 2, 3, 1).to(torch.uint8)  # truncated, as torchstain
    return torch.where(ok.view(-1, 1, 1, 1), out, x.to(torch.uint8)), ok


def _lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``(B, 3, H, W)`` -> CIE L*a*b* (L in 0..100), torchstain's (and OpenCV's) formulas."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _XYZ_FROM_RGB.to(rgb.device), linear) / _WHITE.to(rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack((116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])), dim=1)


def _rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* ``(B, 3, H, W)`` -> sRGB in [0, 1], the inverse of :func:`_lab` (clipped to the gamut)."""
    y = (lab[:, 0] + 16) / 116
    f = torch.stack((lab[:, 1] / 500 + y, y, y - lab[:, 2] / 200), dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab.device).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", _RGB_FROM_XYZ.to(lab.device), xyz)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055, linear * 12.92).clamp(
        0, 1
    )
