"""Equilibrium indicators of binary networks: estimating error and gradient stability.

Paper slug: ``reste``. Both are sums over the binary layers' latent weights (the official code sums
over the binary convs):

- estimating error  EE = sum_layers || f_o(w) - sign(w) ||_2,  f_o(w) = sign(w) |w|^(1/o)
- gradient stability GS = sum_layers Var(|dL/dw|)   (unbiased variance; higher = less stable)
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import real_scalar
from ..functional.straight_through import binarize_sign, power_surrogate
from ..nn.binary import BinaryModule, binary_modules

__all__ = ["estimating_error", "gradient_stability"]


def _layers(model: nn.Module) -> list[tuple[str, BinaryModule]]:
    mods = binary_modules(model)
    if not mods:
        raise ValueError("model has no binary layers (gradkit.nn.binary.BinaryLinear / BinaryConv2d)")
    return mods


@torch.no_grad()
def estimating_error(model: nn.Module, o: float) -> float:
    """Sum over binary layers of ||f_o(w) - sign(w)||_2 with f_o(w) = sign(w)|w|^(1/o) (paper slug: reste).

    ``sign`` maps 0 to +1 like the layers' forward. The official code evaluates it at o = o_end.

    >>> model = nn.Sequential(BinaryLinear(8, 8))  # from gradkit.nn.binary
    >>> ee3, ee1 = estimating_error(model, 3.0), estimating_error(model, 1.0)
    >>> ee3 < ee1
    True
    """
    o = real_scalar("o", o)
    if o < 1.0:
        raise ValueError(f"o must be >= 1, got {o}")
    total = 0.0
    for _, m in _layers(model):
        w = m.weight.detach().reshape(-1)
        total += float(torch.linalg.vector_norm(power_surrogate(w, o) - binarize_sign(w)))
    return total


@torch.no_grad()
def gradient_stability(model: nn.Module) -> float:
    """Sum over binary layers of Var(|dL/dw|) of the latent weights' gradients (paper slug: reste).

    Call after ``loss.backward()`` (e.g. in ``fit``'s ``before_step`` hook). Unbiased variance, as in
    the official code.

    >>> model = nn.Sequential(BinaryLinear(8, 8))  # from gradkit.nn.binary
    >>> model(torch.randn(4, 8)).square().sum().backward()
    >>> gs = gradient_stability(model)
    """
    total = 0.0
    for name, m in _layers(model):
        g = m.weight.grad
        if g is None:
            raise ValueError(f"binary layer {name or '<model>'!r} has no weight gradient; call backward() first")
        if g.numel() < 2:
            raise ValueError(f"binary layer {name or '<model>'!r} has {g.numel()} weight; variance needs >= 2")
        total += float(torch.var(g.detach().abs().reshape(-1)))
    return total
