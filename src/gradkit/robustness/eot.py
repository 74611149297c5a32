"""Random input transformations for expectation over transformations (EOT; Athalye et al.) (boundary-tilting).

EOT attacks a randomised model (or crafts examples robust to a random transformation t) by following
the expected gradient:

    g = grad_delta E_t[ L(f(t(x + delta)), y) ]  ~  (1/K) sum_{k=1..K} grad_delta L(f(t_k(x + delta)), y)

:func:`gradkit.robustness.pgd.pgd_attack` does this with ``transform=`` and ``eot_samples=K`` (one batched
forward of K*N inputs). A transform is any callable ``(x, generator) -> x`` that draws independently for
every row; the two here are differentiable in x and draw on the generator's device.

>>> attack = PGD(eps=0.1, steps=10, transform=GaussianNoise(0.05), eot_samples=8)
>>> x_adv = attack(model.eval(), x, y)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import integer, optional_generator, real_scalar


def _draw(kind: str, shape: tuple, like: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = like.device if generator is None else generator.device
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(shape, generator=generator, dtype=like.dtype, device=dev).to(like.device)


@dataclass(frozen=True)
class GaussianNoise:
    """t(x) = x + sigma * n, n ~ N(0, I), a fresh draw per row (boundary-tilting).

    >>> GaussianNoise(0.1)(torch.zeros(2, 3), torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3])
    """

    sigma: float

    def __post_init__(self) -> None:
        real_scalar("sigma", self.sigma, nonneg=True)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        optional_generator(generator)
        return x + self.sigma * _draw("normal", tuple(x.shape), x, generator)


@dataclass(frozen=True)
class RandomShift:
    """t(x) = x shifted by (dy, dx) pixels, |dy|, |dx| <= max_shift, zero fill; per row (boundary-tilting).

    For images (N, ..., H, W). Implemented as a gather, so it is differentiable in x.

    >>> RandomShift(1)(torch.rand(4, 1, 8, 8), torch.Generator().manual_seed(0)).shape
    torch.Size([4, 1, 8, 8])
    """

    max_shift: int

    def __post_init__(self) -> None:
        integer("max_shift", self.max_shift, low=0)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        optional_generator(generator)
        if x.dim() < 3:
            raise ValueError(f"x must be images shaped (N, ..., H, W), got shape {tuple(x.shape)}")
        n, (h, w), k = x.shape[0], x.shape[-2:], self.max_shift
        if k == 0:
            return x
        u = _draw("uniform", (n, 2), x, generator)
        s = (u * (2 * k + 1)).floor().long().clamp(max=2 * k) - k            # integer shifts in [-k, k]
        rows = torch.arange(h, device=x.device)[None, :] - s[:, :1]            # (n, h) source row
        cols = torch.arange(w, device=x.device)[None, :] - s[:, 1:]            # (n, w) source col
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        ri, ci = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        flat = x.reshape(n, -1, h, w)
        idx = (ri[:, :, None] * w + ci[:, None, :]).reshape(n, 1, h * w).expand(-1, flat.shape[1], -1)
        out = flat.reshape(n, flat.shape[1], h * w).gather(2, idx).reshape(flat.shape)
        return (out * valid[:, None].to(x.dtype)).reshape(x.shape)


__all__ = ["GaussianNoise", "RandomShift"]
