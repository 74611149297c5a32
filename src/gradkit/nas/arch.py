"""Architecture parameters of a differentiable search and their samplers: DARTS, DrNAS, GDAS (paper slug: tanglenas).

``alpha`` holds one logit per candidate (last dim); :class:`ArchParams` turns it into candidate weights::

    darts:  a = softmax(alpha)                                   (deterministic, soft)
    drnas:  a ~ Dirichlet(softplus(alpha)) by rsample            (reparameterised; eval: the Dirichlet mean)
            regulariser reg_scale * ||softplus(alpha)||^2
    gdas:   a = onehot(argmax(alpha + g)) + soft - soft.detach(), soft = softmax((alpha + g) / tau),
            g ~ Gumbel(0, 1)                                     (hard forward, soft gradient; eval: onehot(argmax))

Several independent choices on one op combine by outer product (``combine``): a[i, j] = a1[i] * a2[j].

Example::

    ch, k = ArchParams(3), ArchParams(3, sampler="gdas")
    a = ArchParams.combine(ch(), k())              # (3, 3), sums to 1
    conv_out = entangled_conv(x, a)                 # gradkit.nas.entangled.EntangledConv2d
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import ArgumentError, choice, is_int, optional_generator, positive, real_scalar

SAMPLERS = ("darts", "drnas", "gdas")


class ArchParams(nn.Module):
    """Learnable logits ``alpha`` of shape ``shape`` (candidates on the last dim) and a sampler (tanglenas).

    ``forward()`` returns candidate weights of the same shape, summing to 1 over the last dim.
    sampler: ``"darts"`` | ``"drnas"`` | ``"gdas"``; tau: GDAS temperature; reg_scale: DrNAS's l2
    weight on the concentrations (:meth:`regularizer`); init_std: alpha ~ N(0, init_std^2) (0: zeros).
    In eval mode the stochastic samplers return their deterministic summary (Dirichlet mean, argmax).

    >>> ap = ArchParams((2, 3))
    >>> ap().sum(-1)
    tensor([1., 1.], grad_fn=<SumBackward1>)
    """

    def __init__(self, shape: int | Sequence[int], sampler: str = "darts", tau: float = 1.0,
                 reg_scale: float = 1e-3, init_std: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        dims = (shape,) if is_int(shape) else tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
        if not dims or not all(is_int(d, low=1) for d in dims):
            raise ArgumentError(f"shape must be a positive int or a non-empty sequence of positive ints, got {shape!r}")
        self.sampler = choice("sampler", sampler, SAMPLERS)
        self.tau = positive("tau", tau)
        self.reg_scale = real_scalar("reg_scale", reg_scale, nonneg=True)
        std = real_scalar("init_std", init_std, nonneg=True)
        self.generator = optional_generator(generator)
        self.alpha = nn.Parameter(torch.randn(*dims, generator=generator) * std)

    @property
    def num_candidates(self) -> int:
        return self.alpha.shape[-1]

    def forward(self) -> torch.Tensor:
        """Candidate weights a (same shape as alpha), sampled afresh on every call for drnas/gdas in training."""
        alpha = self.alpha
        if self.sampler == "darts":
            return F.softmax(alpha, dim=-1)
        if self.sampler == "drnas":
            conc = F.softplus(alpha) + 1e-4
            if not self.training:
                return conc / conc.sum(-1, keepdim=True)
            return torch.distributions.Dirichlet(conc).rsample()
        if not self.training:
            return F.one_hot(alpha.argmax(-1), alpha.shape[-1]).to(alpha.dtype)
        u = torch.empty_like(alpha).exponential_(generator=self.generator)
        logits = (alpha - u.log()) / self.tau                  # -log(Exp(1)) ~ Gumbel(0, 1)
        soft = F.softmax(logits, dim=-1)
        hard = F.one_hot(soft.argmax(-1), alpha.shape[-1]).to(soft.dtype)
        return hard + soft - soft.detach()

    def regularizer(self) -> torch.Tensor:
        """DrNAS: reg_scale * sum(softplus(alpha)^2); zero for the other samplers."""
        if self.sampler != "drnas":
            return self.alpha.new_zeros(())
        return self.reg_scale * (F.softplus(self.alpha) + 1e-4).pow(2).sum()

    def argmax(self) -> torch.Tensor:
        """Index of the chosen candidate along the last dim (discretisation)."""
        return self.alpha.detach().argmax(-1)

    @staticmethod
    def combine(*weights: torch.Tensor) -> torch.Tensor:
        """Outer product of independent choices' weights over their last dims: (..., n1), (..., n2) -> (..., n1, n2)."""
        if not weights:
            raise ArgumentError("combine needs at least one weight tensor, got none")
        for k, w in enumerate(weights):
            if not isinstance(w, torch.Tensor) or w.dim() < 1:
                raise ArgumentError(f"weights[{k}] must be a tensor with a candidate dim, got "
                                    f"{type(w).__name__ if not isinstance(w, torch.Tensor) else tuple(w.shape)}")
            if w.shape[:-1] != weights[0].shape[:-1]:
                raise ArgumentError(f"weights[{k}] must share the leading dims {tuple(weights[0].shape[:-1])}, "
                                    f"got shape {tuple(w.shape)}")
        out = weights[0]
        for w in weights[1:]:
            out = out.unsqueeze(-1)
            out = out * w.reshape(*w.shape[:-1], *([1] * (out.dim() - w.dim())), w.shape[-1])
        return out

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}, sampler={self.sampler!r}, tau={self.tau:g}"


__all__ = ["ArchParams", "SAMPLERS"]
