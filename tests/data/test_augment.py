"""Batch augmentation on real patches: each op changes what it should, nothing else, and reproducibly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histodetect.data.augment import (
    DIHEDRAL,
    RGB_FROM_HED,
    STAIN_SHIFTS,
    BatchAugment,
    StainShift,
    dihedral,
    dihedral_inverse,
    hed_jitter,
    mix_batch,
    random_dihedral,
    restain,
    stain_jitter,
    stain_pairs,
    to_float,
)

CENTRE = slice(32, 64)  # the 32x32 region of a 96 px patch that decides its label


@pytest.fixture(scope="module")
def raw(sample_dir: Path) -> torch.Tensor:
    """Eight sample patches as stored: uint8 ``(8, 96, 96, 3)``."""
    with (sample_dir / "train_labels.csv").open() as f:
        ids = [row["id"] for row in csv.DictReader(f)][:8]
    images = [np.asarray(Image.open(sample_dir / "train" / f"{i}.tif").convert("RGB")) for i in ids]
    return torch.from_numpy(np.stack(images))


@pytest.fixture(scope="module")
def x(raw: torch.Tensor) -> torch.Tensor:
    return to_float(raw)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_float(raw: torch.Tensor) -> None:
    x = to_float(raw)
    assert x.shape == (8, 3, 96, 96) and x.dtype == torch.float32
    assert torch.equal(x[3, 1, 10, 20], raw[3, 10, 20, 1].float() / 255)
    assert x.is_contiguous()
    assert to_float(raw, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        to_float(raw.float())


def test_dihedral_gives_eight_distinct_invertible_transforms(x: torch.Tensor) -> None:
    patch = x[:1]
    outputs = [dihedral(patch, k) for k in DIHEDRAL]
    assert torch.equal(outputs[0], patch)
    assert len({o.numpy().tobytes() for o in outputs}) == 8
    for k, out in zip(DIHEDRAL, outputs, strict=True):
        assert torch.equal(dihedral_inverse(out, k), patch)
    with pytest.raises(ValueError):
        dihedral(patch, 8)


def test_random_dihedral_applies_one_symmetry_per_sample(x: torch.Tensor) -> None:
    out = random_dihedral(x, _gen())
    chosen = []
    for original, transformed in zip(x, out, strict=True):
        matches = [k for k in DIHEDRAL if torch.equal(dihedral(original, k), transformed)]
        assert len(matches) == 1
        chosen.append(matches[0])
    assert len(set(chosen)) > 2  # per sample, not one choice for the batch


@pytest.mark.parametrize(
    "settings",
    [
        {"dihedral": True},
        {"dihedral": False, "hed": 0.05},
        {"dihedral": False, "hed": 0.05, "stain": 0.5},
        {"dihedral": False, "brightness": 0.2},
        {"dihedral": False, "contrast": 0.2},
        {"dihedral": True, "hed": 0.05, "brightness": 0.1, "contrast": 0.1},
    ],
)
def test_each_op_changes_the_batch_within_range_and_reproducibly(x: torch.Tensor, settings: dict[str, float]) -> None:
    augment = BatchAugment(**settings)
    out = augment(x, _gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.sum() >= 6  # per sample: at most an unlucky one or two draw ~nothing (or the identity)
    assert torch.equal(augment(x, _gen(1)), out)
    assert not torch.equal(augment(x, _gen(2)), out)


def test_everything_off_is_the_identity(x: torch.Tensor) -> None:
    generator = _gen()
    state = generator.get_state()
    assert torch.equal(BatchAugment(dihedral=False)(x, generator), x)
    assert torch.equal(generator.get_state(), state)  # nothing drawn: switching ops off keeps the stream


def test_channels_last_layout_is_kept(raw: torch.Tensor) -> None:
    x = to_float(raw, channels_last=True)
    out = BatchAugment(dihedral=True, hed=0.05, contrast=0.1)(x, _gen())
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_hed_jitter_acts_on_stains(x: torch.Tensor) -> None:
    """Zero perturbation is the identity, and a pixel of pure haematoxylin only responds to the H channel."""
    torch.testing.assert_close(hed_jitter(x, torch.zeros(8, 2, 3)), x, atol=1e-5, rtol=0)
    amount = 0.05  # in skimage's rgb2hed units
    haematoxylin = torch.exp(amount * RGB_FROM_HED[0].float() * np.log(1e-6)).view(1, 3, 1, 1)
    scale_e_and_d = torch.tensor([[[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]])
    scale_h = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(hed_jitter(haematoxylin, scale_e_and_d), haematoxylin)
    assert (hed_jitter(haematoxylin, scale_h) < haematoxylin - 0.05).all()  # more stain: darker everywhere


def test_stain_shifts_restain_as_documented(raw: torch.Tensor) -> None:
    """No change is the identity (up to rounding to uint8); more of a stain darkens, a yellow cast takes blue."""
    pixels = raw.numpy()
    assert np.abs(StainShift()(pixels).astype(int) - pixels).max() <= 1
    assert STAIN_SHIFTS["dark"](pixels).mean() < pixels.mean() < STAIN_SHIFTS["pale"](pixels).mean()
    yellowed = StainShift(yellow=0.2)(pixels).reshape(-1, 3).mean(0) - pixels.reshape(-1, 3).mean(0)
    assert yellowed[2] < yellowed[1] < yellowed[0] <= 0


def test_stain_jitter_is_hed_jitter_in_general(x: torch.Tensor) -> None:
    """hed_jitter is restain with a diagonal stain matrix and an offset along the stain vectors."""
    params = torch.rand(8, 2, 3, generator=_gen(4)) * 0.1 - 0.05
    expected = restain(x, torch.diag_embed(1 + params[:, 0]), params[:, 1] @ RGB_FROM_HED.float())
    torch.testing.assert_close(hed_jitter(x, params), expected)
    out = stain_jitter(x, 0.5, _gen(5))
    assert out.shape == x.shape and torch.equal(out, stain_jitter(x, 0.5, _gen(5)))


def test_stain_jitter_keeps_about_half_the_patches_as_they_are(x: torch.Tensor) -> None:
    """Untouched colours stay at the centre of what a model trained with ``--stain-aug`` sees."""
    batch = x.repeat(8, 1, 1, 1)
    out = stain_jitter(batch, 0.5, _gen(6))
    change = (out - batch).abs().flatten(1).amax(1)
    kept = change < 1e-3  # restain's identity round-trips through log and exp
    assert 0.3 < kept.float().mean() < 0.7
    assert (change[~kept] > 0.02).all()


def test_stain_pairs_follow_the_batch_with_its_restainings(x: torch.Tensor) -> None:
    """``--stain-consistency``'s batches: patch i and its re-staining i + B, every copy re-stained."""
    batch, labels = x.repeat(2, 1, 1, 1)[:15], torch.arange(15.0)
    pairs, y = stain_pairs(batch, labels, 0.5, _gen(7))
    assert pairs.shape == (30, *batch.shape[1:]) and torch.equal(y, torch.cat([labels, labels]))
    assert torch.equal(pairs[:15], batch)
    assert ((pairs[15:] - batch).abs().flatten(1).amax(1) > 0.02).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_batch_device_with_the_same_randomness(x: torch.Tensor) -> None:
    augment = BatchAugment(dihedral=True, hed=0.05, stain=0.5, brightness=0.1, contrast=0.1)
    on_gpu = augment(x.cuda(), _gen(3))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), augment(x, _gen(3)), atol=1e-4, rtol=0)


def test_bad_strengths_are_refused() -> None:
    with pytest.raises(ValueError, match="hed"):
        BatchAugment(hed=1.5)


# ---------------------------------------------------------------------------------------------- mixing
def _constant_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch i is uniformly grey at level i/(n-1) and labelled with that level, so any mixed patch can be
    checked against its mixed label by looking at its pixels."""
    levels = torch.linspace(0, 1, n)
    return levels.view(n, 1, 1, 1).expand(n, 3, 96, 96).contiguous(), levels.clone()


def test_no_mixing_returns_the_batch_with_float_labels(x: torch.Tensor) -> None:
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    out, y = mix_batch(x, labels, 0.0, 0.0, _gen())
    assert out is x and y.dtype == torch.float32 and torch.equal(y, labels.float())


def test_mixup_mixes_labels_as_it_mixes_pixels() -> None:
    images, levels = _constant_batch()
    for seed in range(5):
        out, y = mix_batch(images, levels, 0.4, 0.0, _gen(seed))
        assert not torch.equal(out, images)
        torch.testing.assert_close(y, out.mean(dim=(1, 2, 3)))


def test_cutmix_labels_follow_the_centre_region() -> None:
    images, levels = _constant_batch()
    borders_only = 0
    for seed in range(40):
        out, y = mix_batch(images, levels, 0.0, 1.0, _gen(seed))
        torch.testing.assert_close(y, out[:, :, CENTRE, CENTRE].mean(dim=(1, 2, 3)))
        pasted = not torch.equal(out, images)
        borders_only += pasted and torch.equal(y, levels)
    assert borders_only > 0  # boxes that miss the centre change pixels but not labels


def test_with_both_one_method_is_picked_per_batch() -> None:
    images, levels = _constant_batch()
    kinds = set()
    for seed in range(20):
        out, y = mix_batch(images, levels, 0.4, 1.0, _gen(seed))
        uniform = bool((out == out[:, :1, :1, :1]).all())
        kinds.add("mixup" if uniform else "cutmix")
        assert y.min() >= 0 and y.max() <= 1
    assert kinds == {"mixup", "cutmix"}
    first = mix_batch(images, levels, 0.4, 1.0, _gen(7))
    again = mix_batch(images, levels, 0.4, 1.0, _gen(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
