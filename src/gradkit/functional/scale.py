"""Gradient scaling: identity forward, ``k * grad`` backward (paper slug: ``agm``).

- :func:`grad_scale` / :class:`GradScale`: ``y = x``, ``dL/dx = k dL/dy`` for one tensor (``k = -1`` is a
  gradient reversal; the module form is :class:`gradkit.nn.GradientScale`).
- :func:`modulated_fusion` / :class:`ModulatedFusion`: forward the fused output ``f(all)``, backward
  ``k_m * grad`` into each per-modality output ``phi_m`` (AGM's modulation; ``sum_m phi_m = f(all)``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .._validate import real_scalar, tensor
from .reversal import check_lambda

__all__ = ["GradScale", "grad_scale", "ModulatedFusion", "modulated_fusion"]


class GradScale(torch.autograd.Function):
    """Autograd Function: identity forward (a view), ``k * grad`` backward (paper slug: ``agm``).

    ``GradScale.apply(x, k)``; no gradient for ``k``. Prefer :func:`grad_scale` (validates).
    """

    @staticmethod
    def forward(x: Tensor, k: float | Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, k = inputs
        ctx.k = k.detach().clone() if isinstance(k, Tensor) else k

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None
        k = ctx.k
        if isinstance(k, Tensor):
            k = k.to(device=grad.device, dtype=grad.dtype)
        elif k == 1.0:
            return grad, None  # exactly the joint-training gradient
        return grad * k, None


def grad_scale(x: Tensor, k: float | Tensor = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``k`` in the backward pass.

    Paper: ``agm`` (shared by any method that reweights a branch's gradient). ``y = x``,
    ``dL/dx = k * dL/dy``. ``k``: finite float or 0-dim tensor (value at call time; no gradient
    w.r.t. it). ``k = 1`` returns the incoming gradient unchanged (bit-for-bit); ``k = -1`` is a
    gradient reversal.

    Example::

        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_scale(x, 2.5).sum().backward()
        >>> x.grad
        tensor([2.5000, 2.5000, 2.5000])
    """
    tensor("x", x)
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return GradScale.apply(x, check_lambda(k, name="k"))


class ModulatedFusion(torch.autograd.Function):
    """Forward: the full-input output ``f(all)``; backward: ``k_m * grad`` into each ``phi_m``.

    Paper slug: ``agm``. ``ModulatedFusion.apply(full, ks, *phis)`` with ``ks`` a tuple of floats.
    Numerically the same as ``sum_m grad_scale(phi_m, k_m)`` (``sum_m phi_m = f(all)``) but the
    forward value is ``f(all)`` exactly, so with every ``k_m = 1`` training is bit-identical to
    plain joint training. No gradient reaches ``full`` directly (it reaches it through the phis).
    """

    @staticmethod
    def forward(full: Tensor, ks: tuple[float, ...], *phis: Tensor) -> Tensor:
        return full.view_as(full)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.ks = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        outs: list[Tensor | None] = [None, None]
        for i, k in enumerate(ctx.ks):
            if not ctx.needs_input_grad[2 + i]:
                outs.append(None)
            else:
                outs.append(grad if k == 1.0 else grad * k)
        return tuple(outs)


def modulated_fusion(full: Tensor, phis: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """Fused output for the loss: value ``full`` (= ``sum_m phi_m``), gradient ``k_m * g`` into ``phi_m``.

    Paper slug: ``agm``: ``L(sum_m phi_m)`` with the gradient reaching ``phi_m`` scaled by ``k_m``.
    ``full`` must be ``f(all)`` (``sum(phis)`` up to rounding; not re-checked).

    Example::

        >>> outs = subset_outputs(model, [a, v]); phis = shapley_outputs(...)
        >>> loss = F.cross_entropy(modulated_fusion(outs[-1], phis, [k_a, k_v]), y)
    """
    tensor("full", full)
    if isinstance(phis, Tensor) or not isinstance(phis, (list, tuple)) or len(phis) == 0:
        raise ValueError("phis must be a non-empty list of tensors, one per modality")
    if isinstance(coefficients, Tensor) or not isinstance(coefficients, Sequence) or len(coefficients) != len(phis):
        raise ValueError(f"coefficients must be a list of {len(phis)} floats (one per phi), got {coefficients!r}")
    for i, p in enumerate(phis):
        tensor(f"phis[{i}]", p)
        if p.shape != full.shape:
            raise ValueError(f"phis[{i}] has shape {tuple(p.shape)}, expected {tuple(full.shape)} like full")
    ks = tuple(real_scalar(f"coefficients[{i}]", k, tensor_ok=False) for i, k in enumerate(coefficients))
    return ModulatedFusion.apply(full, ks, *phis)
