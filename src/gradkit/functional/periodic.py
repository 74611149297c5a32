"""Periodic (sine) binarisation of weights and the ApproxSign activation binariser (paper slug: ``biper``).

Vargas et al., "BiPer: Binary Neural Networks using a Periodic Function" (CVPR 2024, arXiv 2404.01278).
BiPer binarises a latent weight with a square wave of frequency ``freq`` (omega_0) and uses the sine
of the same period as the surrogate in the backward pass::

    stage 1 (soft):  w_b = sin(freq * w)                          (real-valued, plain autograd)
    stage 2 (hard):  w_b = sign(sin(freq * w))                    forward
                     dw_b/dw := freq * cos(freq * w)              backward (identity through sign,
                                                                  true derivative of the sine)

Activations use the Bi-Real "ApproxSign": forward ``sign(a)``, backward ``max(0, 2 - 2|a|)``.

As everywhere in gradkit, ``sign(0) := +1`` so outputs are exactly +-1 (``torch.sign(0)`` is 0; the
sine has exact zeros at ``w = k pi / freq``). Importing this module registers the estimator
``"biper"`` (``fn(x, param)`` with ``param`` the frequency) in
:data:`gradkit.functional.straight_through.ESTIMATORS`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validate import boolean, is_int, real_in, real_scalar, tensor
from .straight_through import register_estimator, sign_pm1

__all__ = ["BiPerSign", "ApproxSign", "NormApproxSign", "biper_binarize", "biper_derivative", "approx_sign",
           "approx_sign_derivative", "norm_approx_sign", "check_freq", "ACT_NORM_EPS"]

ACT_NORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------- validation
def check_freq(freq: Any) -> float:
    """Validate BiPer's frequency omega_0: a finite real number (or one-element tensor) > 0."""
    f = real_scalar("freq", freq)
    if f <= 0.0:
        raise ValueError(f"freq must be > 0 (the square wave's angular frequency omega_0), got {f}")
    return f


def _work(x: Tensor) -> Tensor:
    # trigonometry in at least float32: sin(20 * w) in bfloat16 misplaces the square wave's edges
    wd = torch.promote_types(x.dtype, torch.float32)
    return x if x.dtype == wd else x.to(wd)


# ---------------------------------------------------------------------------------------- math
def biper_derivative(w: Tensor, freq: Any) -> Tensor:
    """BiPer's surrogate derivative ``freq * cos(freq * w)`` of the square wave (paper slug: biper).

    Equation: d sign(sin(f w)) / dw := f cos(f w)  (the derivative of the stage-1 sine).

    >>> biper_derivative(torch.tensor([0.0, 3.14159265 / 20]), 20.0)
    tensor([ 20., -20.])
    """
    tensor("w", w, floating=True)
    return _biper_derivative(w, check_freq(freq))


def _biper_derivative(w: Tensor, f: float) -> Tensor:
    d = torch.cos(_work(w.detach()) * f).mul_(f)
    return d if d.dtype == w.dtype else d.to(w.dtype)


def approx_sign_derivative(x: Tensor) -> Tensor:
    """Bi-Real's ApproxSign surrogate derivative ``max(0, 2 - 2|x|)`` (paper slug: biper, activations).

    Equation: d sign(x)/dx := 2 - 2|x| for |x| < 1, else 0 (derivative of the piecewise quadratic
    2x + x|x| clipped to [-1, 1]).

    >>> approx_sign_derivative(torch.tensor([0.0, 0.5, 1.0, 2.0]))
    tensor([2., 1., 0., 0.])
    """
    tensor("x", x, floating=True)
    return _approx_sign_derivative(x)


def _approx_sign_derivative(x: Tensor) -> Tensor:
    return x.detach().abs().mul(-2.0).add_(2.0).clamp_(min=0.0)


# ---------------------------------------------------------------------------------------- Functions
class BiPerSign(torch.autograd.Function):
    """Square-wave binarisation ``sign(sin(freq * w))`` with the sine's derivative as backward.

    Paper slug: biper. Equation: forward b = sign(sin(f w)) (sign(0) := +1); backward
    grad_w = grad_b * f * cos(f w) (the official ``BinaryQuantize`` is the plain identity applied after
    ``sin``, so no clipping). ``freq`` (float or 0-dim tensor, > 0) gets no gradient. Prefer
    :func:`biper_binarize`, which also checks that ``w`` is finite.

    >>> w = torch.randn(4, requires_grad=True)
    >>> BiPerSign.apply(w, 20.0).sum().backward()
    >>> torch.allclose(w.grad, 20 * torch.cos(20 * w.detach()))
    True
    """

    @staticmethod
    def forward(w: Tensor, freq: Any) -> Tensor:
        tensor("w", w, floating=True)
        f = check_freq(freq)
        s = sign_pm1(torch.mul(_work(w), f).sin_())
        return s if s.dtype == w.dtype else s.to(w.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.freq = check_freq(inputs[1])
        ctx.save_for_backward(inputs[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None):
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None
        (w,) = ctx.saved_tensors
        if w.dtype == grad_out.dtype and w.dtype in (torch.float32, torch.float64):
            # f cos(f w) * grad in place on one temporary (the weight path runs every step)
            return torch.mul(w.detach(), ctx.freq).cos_().mul_(ctx.freq).mul_(grad_out), None
        return grad_out * _biper_derivative(w, ctx.freq), None


class ApproxSign(torch.autograd.Function):
    """``sign(x)`` (sign(0) := +1) with Bi-Real's triangle surrogate in the backward (paper slug: biper).

    Equation: forward b = sign(x); backward grad_x = grad_b * max(0, 2 - 2|x|).

    >>> x = torch.tensor([-2.0, -0.25, 0.0, 0.5], requires_grad=True)
    >>> ApproxSign.apply(x).sum().backward()
    >>> x.grad
    tensor([0.0000, 1.5000, 2.0000, 1.0000])
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        tensor("x", x, floating=True)
        return sign_pm1(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None):
        if grad_out is None:
            return None
        (x,) = ctx.saved_tensors
        return grad_out * _approx_sign_derivative(x)


def _check_dims(x: Tensor, dims: Any) -> tuple[int, ...]:
    if is_int(dims):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not dims or not all(is_int(d) for d in dims):
        raise TypeError(f"dims must be an int or a non-empty tuple of ints, got {dims!r}")
    nd = x.dim()
    if any(not -nd <= d < nd for d in dims):
        raise ValueError(f"dims {tuple(dims)} out of range for a tensor with {nd} dim(s) (shape {tuple(x.shape)})")
    norm = tuple(sorted({d % nd for d in dims}))
    if len(norm) != len(dims):
        raise ValueError(f"dims must not repeat a dimension, got {tuple(dims)}")
    return norm


def _group_size(x: Tensor, dims: tuple[int, ...]) -> int:
    n = math.prod(x.shape[d] for d in dims)
    if n < 2:
        raise ValueError(f"the variance over dims {dims} needs >= 2 elements per group, got {n} "
                         f"(shape {tuple(x.shape)})")
    return n


def _check_eps(eps: Any) -> float:
    return real_in("eps", eps, 0.0, low_open=True)


class NormApproxSign(torch.autograd.Function):
    """ApproxSign of ``a0 = x / sqrt(Var(x) + eps)`` in one Function (paper slug: biper, activations).

    Equation: forward sign(a0) = sign(x) (sign(0) := +1; the scale is positive); backward with
    s = (Var(x) + eps)^(-1/2) (unbiased variance over ``dims``, n elements, mean mu) and
    g0 = grad * max(0, 2 - 2|a0|):
    grad_x = s * g0 - s^3 (x - mu) * sum(g0 * x) / (n - 1)  -- the exact chain rule through the
    normalisation (the official layer's ``a / sqrt(a.var([1,2,3]) + 1e-5)`` then ApproxSign), without
    keeping ``a0`` alive. Statistics are computed in at least float32. Needs n >= 2.

    >>> x = torch.randn(4, 16, requires_grad=True)
    >>> NormApproxSign.apply(x, (1,), 1e-5).sum().backward()
    >>> x.grad.shape
    torch.Size([4, 16])
    """

    @staticmethod
    def forward(x: Tensor, dims: Any, eps: Any = ACT_NORM_EPS) -> Tensor:
        tensor("x", x, floating=True)
        return sign_pm1(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x = inputs[0]
        dims = _check_dims(x, inputs[1])
        eps = _check_eps(inputs[2] if len(inputs) > 2 else ACT_NORM_EPS)
        n = _group_size(x, dims)
        with torch.no_grad():
            xw = _work(x.detach())
            mu = xw.mean(dims, keepdim=True)
            xc = xw - mu  # two-pass variance: several times faster than aten::var on CPU, as stable
            s = xc.mul_(xc).sum(dims, keepdim=True).div_(n - 1).add_(eps).rsqrt_()
        ctx.dims, ctx.n = dims, n
        ctx.save_for_backward(x, mu, s)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None):
        if grad_out is None:
            return None, None, None
        x, mu, s = ctx.saved_tensors
        xw = _work(x)
        g0 = (xw * s).abs_().mul_(-2.0).add_(2.0).clamp_(min=0.0).mul_(grad_out)
        coef = (g0 * xw).sum(ctx.dims, keepdim=True).mul_(s.pow(3)).div_(ctx.n - 1)
        gx = g0.mul_(s).sub_((xw - mu).mul_(coef))
        return (gx if gx.dtype == x.dtype else gx.to(x.dtype)), None, None


# ---------------------------------------------------------------------------------------- function forms
def biper_binarize(w: Tensor, freq: Any = 20.0, hard: bool = True) -> Tensor:
    """BiPer's weight binariser: ``sin(freq*w)`` (stage 1) or its square wave (stage 2) (paper slug: biper).

    Equation: hard=False: w_b = sin(f w) (exact gradient f cos(f w));
    hard=True: w_b = sign(sin(f w)) forward (sign(0) := +1), gradient f cos(f w) * grad.

    >>> w = torch.randn(8, requires_grad=True) * 0.05
    >>> b = biper_binarize(w, freq=20.0)          # exactly +-1
    >>> s = biper_binarize(w, 20.0, hard=False)    # stage 1: sin(20 w)
    """
    tensor("w", w, floating=True, finite=True)
    f = check_freq(freq)
    boolean("hard", hard)
    if hard:
        return BiPerSign.apply(w, f)
    return torch.sin(w * f)


def approx_sign(x: Tensor) -> Tensor:
    """Binarise with sign (0 -> +1) and backpropagate Bi-Real's ApproxSign (paper slug: biper).

    Equation: forward sign(x); backward grad * max(0, 2 - 2|x|).

    >>> a = torch.randn(8, requires_grad=True)
    >>> b = approx_sign(a)         # exactly +-1
    >>> b.sum().backward()         # a.grad = max(0, 2 - 2|a|)
    """
    tensor("x", x, floating=True, finite=True)
    return ApproxSign.apply(x)


def norm_approx_sign(x: Tensor, dims: Any = -1, eps: Any = ACT_NORM_EPS) -> Tensor:
    """BiPer's training-mode activation binariser: ApproxSign of x / sqrt(Var(x) + eps) (paper slug: biper).

    Equation: forward sign(x); backward through a0 = x / sqrt(Var_dims(x) + eps) (unbiased variance) and
    max(0, 2 - 2|a0|). ``dims``: the per-sample dims (conv: (1, 2, 3); linear: -1).

    >>> a = torch.randn(8, 3, 4, 4, requires_grad=True)
    >>> b = norm_approx_sign(a, dims=(1, 2, 3))    # exactly +-1, = sign(a)
    >>> b.sum().backward()
    """
    tensor("x", x, floating=True, finite=True)
    dims = _check_dims(x, dims)
    _group_size(x, dims)
    return NormApproxSign.apply(x, dims, _check_eps(eps))


# ---------------------------------------------------------------------------------------- registry
def _biper_estimator(x: Tensor, freq: float = 1.0) -> Tensor:
    """BiPer's square wave with frequency = the binary layer's estimator parameter ``o``."""
    return BiPerSign.apply(x, freq)


register_estimator("biper", _biper_estimator)
