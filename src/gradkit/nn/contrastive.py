"""Contrastive losses on two batches of views: spectral contrastive loss and InfoNCE (paper slug: projection-head).

Spectral contrastive loss with in-batch negatives, for views h1, h2 of shape (N, d)::

    L = -2 * mean_i <h1_i, h2_i>  +  mean_{i != j} <h1_i, h2_j>^2

computed in O(N d^2) as sum_{i,j} <h1_i, h2_j>^2 = sum((h1^T h1) * (h2^T h2)), without the N x N matrix.
InfoNCE (SimCLR's NT-Xent) over the 2N views, cosine similarity at temperature tau::

    L = mean_a -log( exp(s(a, a+) / tau) / sum_{b != a} exp(s(a, b) / tau) )

>>> h1, h2 = torch.randn(32, 8), torch.randn(32, 8)
>>> spectral_contrastive_loss(h1, h2).shape, info_nce_loss(h1, h2, tau=0.5).shape
(torch.Size([]), torch.Size([]))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import ArgumentError, positive, tensor

__all__ = ["spectral_contrastive_loss", "info_nce_loss"]


def _views(h1: Tensor, h2: Tensor) -> None:
    tensor("h1", h1, floating=True)
    tensor("h2", h2, floating=True)
    if h1.dim() != 2 or h1.shape != h2.shape:
        raise ArgumentError(f"h1 and h2 must be (N, d) matrices of the same shape, got {tuple(h1.shape)} and "
                            f"{tuple(h2.shape)}")
    if h1.shape[0] < 2:
        raise ArgumentError(f"h1 and h2 need at least 2 rows (in-batch negatives), got {h1.shape[0]}")


def spectral_contrastive_loss(h1: Tensor, h2: Tensor) -> Tensor:
    """Spectral contrastive loss of two views (rows of ``h1`` and ``h2`` are paired); see the module docstring.

    Unnormalised embeddings, as in the paper's linear analysis. Returns a 0-dim tensor.

    >>> h = torch.randn(16, 4)
    >>> bool(spectral_contrastive_loss(h, h) < 0)
    True
    """
    _views(h1, h2)
    n = h1.shape[0]
    pos = (h1 * h2).sum(dim=1)
    total = ((h1.T @ h1) * (h2.T @ h2)).sum()  # sum over all pairs (i, j) of <h1_i, h2_j>^2
    return -2.0 * pos.mean() + (total - pos.pow(2).sum()) / (n * (n - 1))


def info_nce_loss(h1: Tensor, h2: Tensor, tau: float = 0.5) -> Tensor:
    """SimCLR's InfoNCE (NT-Xent) over 2N views with cosine similarity at temperature ``tau``.

    Each of the 2N views is classified against its partner among the other 2N - 1 views. Returns a 0-dim tensor.

    >>> x = torch.randn(16, 4)
    >>> bool(info_nce_loss(x, x, tau=0.1) < info_nce_loss(x, torch.randn(16, 4), tau=0.1))
    True
    """
    _views(h1, h2)
    tau = positive("tau", tau)
    n = h1.shape[0]
    z = F.normalize(torch.cat([h1, h2]), dim=1)
    sim = (z @ z.T) / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
