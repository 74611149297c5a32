"""How the InfoNCE gradient weights the negatives: their softmax probabilities p_n and the share of the
negatives' mass in the hardest few (paper slug: hard-negative-mixing).

For L = -log softmax([q.k, q.n_1, ..]/tau)[0] the gradient w.r.t. q is

    dL/dq = -(1/tau) (1 - p_k) k + (1/tau) sum_n p_n n

so negative n pulls on q with weight p_n; when a few p_n dominate, most of a large queue contributes nothing.

>>> q = F.normalize(torch.randn(8, 16), dim=1); queue = F.normalize(torch.randn(256, 16), dim=1)
>>> w = negative_weight_stats(q, q, queue, tau=0.2)
>>> w.p_neg.shape, 0.0 <= w.top_share(0.05) <= 1.0
(torch.Size([8, 256]), True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import real_in
from ..nn.hard_negative_mixing import queue_logits

__all__ = ["NegativeWeights", "negative_weight_stats"]


@dataclass(frozen=True)
class NegativeWeights:
    """Softmax probabilities of one batch: ``p_pos`` (B,) of the positive, ``p_neg`` (B, K + S) of the negatives
    (queue first, then the S synthetic ones), ``n_queue`` = K."""

    p_pos: Tensor
    p_neg: Tensor
    n_queue: int

    def top_share(self, fraction: float) -> float:
        """Mean over queries of the share of the negatives' mass on the top ``fraction`` (0, 1] of negatives."""
        fraction = real_in("fraction", fraction, 0.0, 1.0, low_open=True)
        n = max(1, math.ceil(fraction * self.p_neg.shape[1]))
        top = self.p_neg.topk(n, dim=1).values.sum(1)
        return float((top / self._mass()).mean())

    @property
    def synthetic_share(self) -> float:
        """Mean over queries of the share of the negatives' mass on the synthetic negatives (0 without them)."""
        return float((self.p_neg[:, self.n_queue:].sum(1) / self._mass()).mean())

    def _mass(self) -> Tensor:
        return self.p_neg.sum(1).clamp_min(torch.finfo(self.p_neg.dtype).tiny)


@torch.no_grad()
def negative_weight_stats(q: Tensor, k: Tensor, queue, tau: float = 0.2,
                          synthetic: Tensor | None = None) -> NegativeWeights:
    """Softmax weights of the positive and of every negative for queries q (B, d), keys k (B, d), a (K, d)
    queue (or ``MemoryQueue``) and optional (B, S, d) synthetic negatives. q and k are L2-normalised here.

    >>> q = torch.eye(4)
    >>> round(negative_weight_stats(q, q, -torch.eye(4), tau=0.1).p_pos.mean().item(), 3)
    1.0
    """
    logits = queue_logits(F.normalize(q, dim=1), F.normalize(k, dim=1), queue, tau, synthetic)
    p = logits.softmax(1)
    return NegativeWeights(p[:, 0], p[:, 1:], logits.shape[1] - 1 - (0 if synthetic is None else synthetic.shape[1]))
