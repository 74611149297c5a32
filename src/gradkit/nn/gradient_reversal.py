"""Gradient reversal layer and domain-classifier head for domain-adversarial training (paper slug: ``dann``).

Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016 (arXiv 1505.07818)::

    E = (1/n) sum_src L_y(G_y(G_f(x_i)), y_i)
        - lambda [ (1/n) sum_src L_d(G_d(G_f(x_i)), 0) + (1/n') sum_tgt L_d(G_d(G_f(x_j)), 1) ]

minimised over the feature extractor ``G_f`` and label head ``G_y``, maximised over the domain
classifier ``G_d``. With :class:`GradientReversal` between ``G_f`` and ``G_d`` this saddle point
is reached by plain SGD on the sum of the two losses. Two ways to place ``lambda``:

- paper-exact (authors' numpy code): ``loss = L_y + lambda * domain_loss(G_d(R_1(f)))`` with a
  reversal coefficient of 1; ``G_d`` gets ``lambda dL_d``, ``G_f`` gets ``-lambda dL_d``.
- common port: ``loss = L_y + domain_loss(G_d(R_lambda(f)))``; same ``G_f`` update, ``G_d`` gets
  ``dL_d`` without ``lambda`` (a different discriminator learning rate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import boolean, is_int, positive_int
from ..functional.reversal import check_lambda, grad_reverse

__all__ = ["GradientReversal", "DomainClassifier", "domain_loss"]


class GradientReversal(nn.Module):
    """Gradient reversal layer: identity forward, ``-lambda_ * grad`` backward (paper slug: ``dann``).

    ``R(x) = x``, ``dR/dx = -lambda_ I``. ``lambda_`` is a plain, mutable attribute (a finite
    float or 0-dim tensor) so a schedule such as :func:`gradkit.schedules.dann_lambda` can set
    it between steps; it is validated on assignment.

    Example::

        >>> grl = GradientReversal(lambda_=0.0)
        >>> grl.lambda_ = dann_lambda(step / total_steps)   # each step
        >>> logits = head(grl(features))
    """

    def __init__(self, lambda_: float | Tensor = 1.0) -> None:
        super().__init__()
        self.lambda_ = lambda_

    @property
    def lambda_(self) -> float | Tensor:
        return self._lambda

    @lambda_.setter
    def lambda_(self, value: float | Tensor) -> None:
        self._lambda = check_lambda(value)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self._lambda)

    def extra_repr(self) -> str:
        lam = self._lambda
        return f"lambda_={lam.item() if isinstance(lam, Tensor) else lam:g}"


class DomainClassifier(nn.Module):
    """Domain-classifier head ``G_d``: (reversal) -> MLP -> one logit per sample (paper slug: ``dann``).

    ``G_d(f) = w2 . relu(W1 R(flatten(f)) + b1) + b2`` (or ``w . R(f) + b`` with ``hidden=None``,
    the logistic regressor of the paper's shallow experiments). ``R`` is a
    :class:`GradientReversal` (``self.grl``) when ``grl=True``; set ``self.grl.lambda_`` to
    schedule it. Returns logits of shape ``(N,)``; pair it with :func:`domain_loss`.

    Example::

        >>> head = DomainClassifier(1200, hidden=100)
        >>> logits = head(features)                       # (N,)
        >>> loss = label_loss + domain_loss(logits[:ns], logits[ns:])
    """

    def __init__(self, in_dim: int, hidden: int | None = 100, grl: bool = True,
                 lambda_: float | Tensor = 1.0) -> None:
        super().__init__()
        positive_int("in_dim", in_dim)
        if hidden is not None and not is_int(hidden, low=1):
            raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
        boolean("grl", grl)
        self.in_dim = in_dim
        self.hidden = hidden
        self.grl = GradientReversal(lambda_) if grl else None
        if hidden is None:
            self.net = nn.Linear(in_dim, 1)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() < 2:
            raise ValueError(f"features must have shape (N, ...), got {tuple(features.shape)}")
        f = features.flatten(1)
        if f.shape[1] != self.in_dim:
            raise ValueError(f"features have {f.shape[1]} values per sample, expected in_dim={self.in_dim}")
        if self.grl is not None:
            f = self.grl(f)
        return self.net(f).squeeze(1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden={self.hidden}, grl={self.grl is not None}"


def domain_loss(src_logits: Tensor, tgt_logits: Tensor, reduction: str = "per_domain") -> Tensor:
    """Logistic domain loss of both halves: source labelled 0, target labelled 1 (paper slug: ``dann``).

    ``reduction="per_domain"`` (the paper's objective)::

        L_d = mean_src BCE(d_i, 0) + mean_tgt BCE(d_j, 1)

    ``reduction="mean"``: one mean over the concatenated batch (the usual port,
    ``BCEWithLogits(cat[d_s, d_t], cat[0s, 1s])``; half the above when the halves are equal).

    Example::

        >>> d = head(torch.cat([f_src, f_tgt]))
        >>> ld = domain_loss(d[:len(f_src)], d[len(f_src):])
    """
    for name, t in (("src_logits", src_logits), ("tgt_logits", tgt_logits)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor of logits, got shape {tuple(t.shape)}")
    if reduction == "per_domain":
        return (F.binary_cross_entropy_with_logits(src_logits, torch.zeros_like(src_logits))
                + F.binary_cross_entropy_with_logits(tgt_logits, torch.ones_like(tgt_logits)))
    if reduction == "mean":
        logits = torch.cat([src_logits, tgt_logits])
        labels = torch.cat([torch.zeros_like(src_logits), torch.ones_like(tgt_logits)])
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"reduction must be 'per_domain' or 'mean', got {reduction!r}")
