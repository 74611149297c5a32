"""Gradient reversal: identity forward, ``-lambda_ * grad`` backward (paper slug: ``dann``).

Ganin et al., "Domain-Adversarial Training of Neural Networks" (JMLR 2016, arXiv 1505.07818;
the layer first appeared in arXiv 1409.7495)::

    forward:  R(x) = x
    backward: dR/dx = -lambda_ * I

Placed between a feature extractor ``G_f`` and a domain classifier ``G_d``, plain gradient descent
on ``L_y + L_d(G_d(R(G_f(x))))`` moves ``G_d`` to *minimise* the domain loss and ``G_f`` to
*maximise* it (scaled by ``lambda_``): the min-max of domain-adversarial training in one backward.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validate import real_scalar

__all__ = ["GradReverse", "grad_reverse", "check_lambda"]


def check_lambda(lambda_: Any, name: str = "lambda_") -> float | Tensor:
    """Validate a reversal coefficient: a finite real number or a finite real 0-dim tensor.

    Returns a Python float, or the tensor detached (no gradient flows into ``lambda_``).
    """
    if isinstance(lambda_, Tensor):
        if lambda_.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(lambda_.shape)}")
        if lambda_.is_complex() or lambda_.dtype == torch.bool:
            raise ValueError(f"{name} must be a real 0-dim tensor, got dtype {lambda_.dtype}")
        lam = lambda_.detach()
        if not bool(torch.isfinite(lam)):
            raise ValueError(f"{name} must be finite, got {lam.item()}")
        return lam
    return real_scalar(name, lambda_, tensor_ok=False)


class GradReverse(torch.autograd.Function):
    """Autograd Function of the gradient reversal layer (paper slug: ``dann``).

    ``GradReverse.apply(x, lambda_)``: forward returns ``x`` (a view, bit-identical), backward
    returns ``-lambda_ * grad`` for ``x`` and no gradient for ``lambda_``. Prefer
    :func:`grad_reverse`, which validates its arguments.
    """

    @staticmethod
    def forward(x: Tensor, lambda_: float | Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, lambda_ = inputs
        # keep the value of lambda_ at forward time, even if a tensor is edited in place later
        ctx.lambda_ = lambda_.detach().clone() if isinstance(lambda_, Tensor) else lambda_

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None
        lam = ctx.lambda_
        if isinstance(lam, Tensor):
            lam = lam.to(device=grad.device, dtype=grad.dtype)
        return grad * -lam, None


def grad_reverse(x: Tensor, lambda_: float | Tensor = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-lambda_`` in the backward pass.

    Paper: ``dann`` (Ganin et al., JMLR 2016). ``R(x) = x``, ``dR/dx = -lambda_ I``.
    ``lambda_``: a finite float or 0-dim tensor (its value at call time is used; no gradient
    w.r.t. it). ``lambda_ = 0`` cuts the gradient; ``lambda_ = -1`` is a plain identity.

    Example::

        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return GradReverse.apply(x, check_lambda(lambda_))
