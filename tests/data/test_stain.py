"""Stain normalisation on real patches: the batched normaliser agrees with torchstain patch by patch, undoes a
re-staining, leaves glass as it is (and counts it), and references are read from images and stain.json files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from histodetect.data import stain as stain_module
from histodetect.data.augment import STAIN_SHIFTS
from histodetect.data.stain import (
    StainError,
    StainFit,
    StainNormalizer,
    fit_stains,
    read_reference,
    reference_patches,
    write_reference,
)
from histodetect.errors import UserError


@pytest.fixture(scope="module")
def patches(sample_dir: Path) -> np.ndarray:
    """48 real sample patches, uint8 ``(48, 96, 96, 3)``."""
    files = sorted((sample_dir / "train").glob("*.tif"))[:48]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def reference(patches: np.ndarray) -> StainFit:
    return fit_stains(reference_patches(patches))


@pytest.mark.slow
def test_macenko_matches_torchstain_patch_by_patch(
    patches: np.ndarray, reference: StainFit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stain_module, "FIT_STRIDE", 1)  # torchstain fits on every pixel
    monkeypatch.setattr(stain_module, "KEEP_RESIDUAL", False)  # and keeps only what the two stains explain
    normaliser = StainNormalizer("macenko", reference)
    ours = normaliser(torch.from_numpy(patches)).numpy().astype(int)
    theirs = TorchMacenkoNormalizer()
    theirs.HERef = torch.tensor(reference.stains, dtype=torch.float32)
    theirs.maxCRef = torch.tensor(reference.max_concentrations)
    compared = 0
    for patch, mine in zip(patches, ours, strict=True):
        if np.array_equal(mine, patch):  # left as it is (a fallback): torchstain would fit it anyway
            continue
        expected, _, _ = theirs.normalize(torch.from_numpy(patch).permute(2, 0, 1), Io=240, alpha=1, beta=0.15)
        # ours leaves out torchstain's +1 on every pixel; percentile ranks may differ by one pixel
        assert np.abs(expected.numpy().clip(0, 255) - 1 - mine).max() <= 2
        compared += 1
    assert compared >= 0.7 * len(patches)
    assert normaliser.patches == len(patches) and normaliser.fallbacks == len(patches) - compared


def test_reinhard_matches_torchstain_patch_by_patch(patches: np.ndarray, reference: StainFit) -> None:
    ours = StainNormalizer("reinhard", reference)(torch.from_numpy(patches[:8])).numpy().astype(int)
    theirs = TorchReinhardNormalizer()
    theirs.target_means = torch.tensor(reference.lab_mean)
    theirs.target_stds = torch.tensor(reference.lab_std)
    for patch, mine in zip(patches[:8], ours, strict=True):
        expected = theirs.normalize(torch.from_numpy(patch).permute(2, 0, 1).contiguous()).numpy().astype(int)
        assert np.abs(expected - mine).max() <= 2


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_patch_set_mapped_with_its_own_fit_comes_back_as_it_was(
    patches: np.ndarray, reference: StainFit, method: str
) -> None:
    restored = StainNormalizer(method, reference)(torch.from_numpy(patches), reference).numpy()
    assert np.abs(restored.astype(int) - patches).mean() < 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_undoes_most_of_a_restaining(patches: np.ndarray, reference: StainFit, method: str) -> None:
    """Pale slides fitted as a set (as a slide is) and mapped to the reference come back near what the untouched
    patches normalise to."""
    pale = STAIN_SHIFTS["pale"](patches)
    normaliser = StainNormalizer(method, reference)
    restored = normaliser(torch.from_numpy(pale), fit_stains(pale)).numpy().astype(int)
    target = normaliser(torch.from_numpy(patches), fit_stains(patches)).numpy().astype(int)
    before = np.abs(pale.astype(int) - patches).mean()
    assert np.abs(restored - target).mean() < 0.5 * before


def test_glass_and_flat_patches_are_left_as_they_are_and_counted(patches: np.ndarray, reference: StainFit) -> None:
    glass = np.clip(patches[:2].astype(int) // 8 + 232, 0, 255).astype(np.uint8)  # faint tissue on bright glass
    flat = np.full((1, 96, 96, 3), (200, 120, 180), dtype=np.uint8)  # one colour: one stain, no spread
    batch = torch.from_numpy(np.concatenate([glass, flat, patches[:1]]))
    for method in ("macenko", "reinhard"):
        normaliser = StainNormalizer(method, reference)
        out = normaliser(batch).numpy()
        assert np.array_equal(out[:2], glass)
        assert np.isfinite(out.astype(float)).all()
        assert normaliser.fallbacks >= 2 and normaliser.patches == 4
        assert not np.array_equal(out[3], patches[0])  # the tissue patch was normalised
    with pytest.raises(StainError, match="too little tissue"):
        fit_stains(glass)


def test_references_are_read_from_images_and_json_and_bad_ones_refused(
    patches: np.ndarray, reference: StainFit, tmp_path: Path
) -> None:
    region = np.concatenate(list(patches[:4]), axis=1)  # a 96 x 384 region of the target lab
    Image.fromarray(region).save(tmp_path / "lab.png")
    from_image = read_reference(tmp_path / "lab.png")
    assert from_image.pixels == 96 * 384 and np.allclose(from_image.stains, fit_stains(region).stains, atol=1e-6)
    write_reference(tmp_path / "stain.json", reference, source="test")
    assert json.loads((tmp_path / "stain.json").read_text())["source"] == "test"
    again = read_reference(tmp_path / "stain.json")
    assert np.allclose(again.stains, reference.stains, atol=1e-5) and again.pixels == reference.pixels
    (tmp_path / "bad.json").write_text('{"stains": [[1, 2]]}')
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for bad in ("bad.json", "bad.png", "missing.png"):
        with pytest.raises(UserError, match=bad):
            read_reference(tmp_path / bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_runs_on_the_gpu_as_on_the_cpu(patches: np.ndarray, reference: StainFit, method: str) -> None:
    pixels = torch.from_numpy(patches)
    on_gpu = StainNormalizer(method, reference)(pixels.cuda())
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu().int() - StainNormalizer(method, reference)(pixels).int()).abs().float().mean() < 0.5


def test_percentile_ranks_match_a_sort_of_the_kept_values() -> None:
    """The stain vectors' 1st and 99th percentile angles, by ``topk`` from the nearer end, are the nearest-rank
    percentiles of a full sort (torchstain's), whatever share of each row is kept."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(200, 576, generator=generator)
    kept = torch.rand(200, 576, generator=generator) < torch.linspace(0.01, 1, 200).unsqueeze(1)
    kept[0] = False  # a row with nothing kept gives a value and is refused by its caller
    count = kept.sum(dim=1)
    for q in (1, 50, 99):
        got = stain_module._nth(values, kept, count, q)
        for row in range(1, 200):
            ordered = values[row][kept[row]].sort().values
            assert got[row] == ordered[round(q / 100 * (len(ordered) - 1))]


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_bf16_training_step_normalises_as_float32(patches: np.ndarray, reference: StainFit, method: str) -> None:
    """Training normalises inside its autocast; the normaliser's matrix products stay float32 there."""
    pixels = torch.from_numpy(patches[:4])
    plain = StainNormalizer(method, reference)(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = StainNormalizer(method, reference)(pixels)
    assert inside.dtype == torch.uint8 and torch.equal(inside, plain)
