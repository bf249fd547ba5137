"""The stain-consistency loss: the Jensen-Shannon divergence of each patch's prediction and its re-staining's."""

from __future__ import annotations

import math

import pytest
import torch

from histodetect.loss import paired_divergence


def _bernoulli_js(p: float, q: float) -> float:
    m = (p + q) / 2

    def kl(a: float) -> float:
        return a * math.log(a / m) + (1 - a) * math.log((1 - a) / (1 - m))

    return (kl(p) + kl(q)) / 2


def test_it_is_the_mean_jensen_shannon_divergence_of_the_pairs() -> None:
    first, second = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([-1.0, -2.5, 1.0])
    pairs = zip(torch.sigmoid(first).tolist(), torch.sigmoid(second).tolist(), strict=True)
    expected = sum(_bernoulli_js(p, q) for p, q in pairs) / 3
    assert paired_divergence(torch.cat([first, second])).item() == pytest.approx(expected, rel=1e-5)
    assert paired_divergence(torch.cat([second, first])).item() == pytest.approx(expected, rel=1e-5)  # symmetric


def test_agreeing_pairs_cost_nothing_and_opposite_certainties_cost_log_2() -> None:
    logits = torch.tensor([0.0, 3.0, -7.0])
    assert abs(paired_divergence(torch.cat([logits, logits])).item()) < 1e-6
    # no log(0): certain and opposite predictions give the bound, and a finite gradient
    extreme = torch.tensor([80.0, -80.0], requires_grad=True)
    loss = paired_divergence(extreme)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)
    assert torch.isfinite(extreme.grad).all()


def test_unpaired_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="pairs"):
        paired_divergence(torch.zeros(3))
