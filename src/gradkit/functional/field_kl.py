"""Exact KL divergence between two binary-weight field distributions, with its analytic gradient.

Paper slug: ``continual-binary``. For q(w) propto exp(beta theta w), w in {-1, +1}, m = tanh(beta theta):
KL(q_theta || q_theta') = sum_i [ beta (theta_i - theta'_i) m_i - log cosh(beta theta_i) + log cosh(beta theta'_i) ],
dKL/dtheta_i = beta^2 (theta_i - theta'_i) (1 - m_i^2).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .._validate import positive

__all__ = ["log_cosh", "FieldKL", "binary_field_kl"]


def log_cosh(x: Tensor) -> Tensor:
    """log(cosh(x)) without overflow: |x| + softplus(-2|x|) - log 2 (exact for every finite x)."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


class FieldKL(torch.autograd.Function):
    """Summed binary KL(q_theta || q_ref) whose backward is the closed form beta^2 (theta - ref) (1 - m^2).

    Paper slug: continual-binary. The reference fields and beta get no gradient. The backward is written in
    differentiable ops, so second derivatives work too.

    >>> theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    >>> FieldKL.apply(theta, torch.zeros(6, dtype=torch.float64), 2.0).backward()
    """

    @staticmethod
    def forward(theta: Tensor, ref: Tensor, beta: float) -> Tensor:
        bt, br = beta * theta, beta * ref
        return ((bt - br) * torch.tanh(bt) - log_cosh(bt) + log_cosh(br)).sum()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        theta, ref, beta = inputs
        ctx.beta = beta
        ctx.save_for_backward(theta, ref)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        theta, ref = ctx.saved_tensors
        b = ctx.beta
        m = torch.tanh(b * theta)
        return grad_out * (b * b) * (theta - ref) * (1.0 - m * m), None, None


def binary_field_kl(theta: Tensor, ref: Tensor, beta: float = 1.0) -> Tensor:
    """KL(q_theta || q_ref) summed over all weights (paper slug: continual-binary); ``ref`` is a constant.

    >>> theta = torch.zeros(3, requires_grad=True)
    >>> binary_field_kl(theta, torch.zeros(3)).item()
    0.0
    """
    beta = positive("beta", beta)
    if not isinstance(theta, Tensor) or not isinstance(ref, Tensor):
        raise TypeError(f"theta and ref must be torch.Tensors, got {type(theta).__name__} and {type(ref).__name__}")
    if theta.shape != ref.shape:
        raise ValueError(f"ref must have shape {tuple(theta.shape)} like theta, got {tuple(ref.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got dtype {theta.dtype}")
    return FieldKL.apply(theta, ref.detach().to(device=theta.device, dtype=theta.dtype), beta)
