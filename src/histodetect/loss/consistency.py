"""A loss that asks for the same prediction on a patch and on its re-staining (``train --stain-consistency``).

Augmentation alone shows the model other labs' colours but leaves it free to score them differently; what a user
loses on another lab's slides is exactly that difference. Penalising it directly is AugMix's Jensen-Shannon
consistency (Hendrycks et al. 2020), here for one binary output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def paired_divergence(logits: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats) between the Bernoulli predictions of the first and second halves of
    ``logits`` ``(2N,)``: patch ``i`` and its re-staining ``N + i``, as :func:`~histodetect.data.augment.stain_pairs`
    lays them out. Bounded by log 2, symmetric, and zero only when each pair agrees.
    """
    if logits.dim() != 1 or logits.shape[0] % 2:
        raise ValueError(f"expected (2N,) logits of N pairs, got {tuple(logits.shape)}")
    a, b = logits.float().chunk(2)
    # log p and log(1 - p) of each prediction, and of their mean m, from log-sigmoids: no log(0) at any logit
    log_p, log_q = torch.stack([F.logsigmoid(a), F.logsigmoid(-a)]), torch.stack([F.logsigmoid(b), F.logsigmoid(-b)])
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(0)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(0)
    return ((kl_pm + kl_qm) / 2).mean()
