"""Straight-through estimators for binarisation: clipped STE and ReSTE (paper slug: ``reste``).

Every estimator here has the forward ``b = sign(x)`` with ``sign(0) := +1`` (so outputs are exactly
``+-1``; ``torch.sign`` would give 0 at 0) and a surrogate derivative in the backward:

- clipped STE:  d/dx = 1 if |x| <= clip else 0
- ReSTE (rectified power surrogate ``f_o(x) = sign(x) |x|^(1/o)``, t = 1.5, m = interval = 0.1)::

      d/dx = 0                            if |x| > t
             (1/o) |x|^((1-o)/o)          if m < |x| <= t     (= f_o'(x))
             m^(1/o - 1)                  if |x| <= m         (slope of the chord of f_o over [0, m])

  ``o = 1`` is exactly the clipped STE with ``clip = t``; larger ``o`` hugs ``sign`` more closely.

:data:`ESTIMATORS` maps names to binary estimators with the common signature ``fn(x, param) -> tensor``
(``param`` is the binary layer's estimator parameter ``o``; estimators without one ignore it), so that
binary layers can take ``estimator="reste"`` or any registered name.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..registry import Registry
from .._validate import real_scalar

__all__ = [
    "binarize_sign", "sign_pm1", "power_surrogate", "reste_derivative", "ste_derivative", "ReSTESign", "STESign",
    "reste_sign", "ste_sign", "Estimator", "ESTIMATORS", "get_estimator", "register_estimator",
]

Estimator = Callable[[Tensor, float], Tensor]
"""A binary estimator: ``fn(x, param) -> sign-like tensor`` with a surrogate backward."""

RESTE_T = 1.5
RESTE_INTERVAL = 0.1


# ---------------------------------------------------------------------------------------- validation
def _check_x(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def _reste_params(o: Any, t: Any, interval: Any) -> tuple[float, float, float]:
    o, t, interval = real_scalar("o", o), real_scalar("t", t), real_scalar("interval", interval)
    if o < 1.0:
        raise ValueError(f"o must be >= 1 (o = 1 is the clipped STE), got {o}")
    if t <= 0.0:
        raise ValueError(f"t must be > 0, got {t}")
    if not 0.0 < interval <= t:
        raise ValueError(f"interval must be in (0, t] = (0, {t}], got {interval}")
    return o, t, interval


def _clip_param(clip: Any) -> float:
    clip = real_scalar("clip", clip)
    if clip <= 0.0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return clip


# ---------------------------------------------------------------------------------------- math
def sign_pm1(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) := +1``, unchecked and not detached: the shared kernel of the binarisers.

    Outputs exactly +-1 (NaN stays NaN, +-inf gives +-1). Callers validate ``x``; users want
    :func:`binarize_sign`.
    """
    # sign(2 sign(x) + 1) maps -1 -> -1, 0 -> +1, +1 -> +1 (arithmetic is faster than masked_fill on CPU);
    # adding 0 * clamp(x, -1, 1) keeps NaN as NaN (torch.sign(nan) is 0) and leaves +-inf at +-1
    s = torch.sign(x).mul_(2.0).add_(1.0).sign_()
    return s.add_(x.detach().clamp(-1.0, 1.0).mul_(0.0))


def binarize_sign(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) := +1`` (outputs exactly +-1; NaN stays NaN). No custom gradient."""
    _check_x(x)
    return sign_pm1(x.detach())


def _work_dtype(x: Tensor) -> torch.dtype:
    # powers in at least float32 (bf16/fp16 inputs), float64 stays float64
    return torch.promote_types(x.dtype, torch.float32)


def power_surrogate(x: Tensor, o: float) -> Tensor:
    """ReSTE's surrogate forward ``f_o(x) = sign(x) |x|^(1/o)`` (plain autograd; paper slug: reste).

    Equation: f_o(x) = sign(x) * |x|^(1/o); o = 1 is the identity, o -> inf approaches sign(x).
    For o > 1 the slope at x = 0 is infinite; autograd returns 0 there (the convention sign uses),
    never NaN. ReSTE's backward does not use this slope but :func:`reste_derivative`.

    >>> x = torch.tensor([-0.25, 0.0, 0.25])
    >>> power_surrogate(x, 2.0)
    tensor([-0.5000,  0.0000,  0.5000])
    """
    _check_x(x)
    o = real_scalar("o", o)
    if o <= 0.0:
        raise ValueError(f"o must be > 0, got {o}")
    a = x.abs()
    # |0|^(1/o) has an infinite slope: evaluate the power on a positive stand-in there, where sign(x) = 0
    # zeroes the product anyway, so the gradient is 0 * finite instead of 0 * inf = NaN
    return torch.sign(x) * torch.where(a > 0, a, torch.ones_like(a)).pow(1.0 / o)


def reste_derivative(x: Tensor, o: float, t: float = RESTE_T, interval: float = RESTE_INTERVAL) -> Tensor:
    """The rectified derivative ReSTE uses in the backward of sign (paper slug: reste).

    Equation: 0 if |x| > t; (1/o)|x|^((1-o)/o) if interval < |x| <= t; interval^(1/o - 1) if |x| <= interval.

    >>> reste_derivative(torch.tensor([0.05, 1.0, 2.0]), o=1.0)
    tensor([1., 1., 0.])
    """
    _check_x(x)
    o, t, m = _reste_params(o, t, interval)
    return _reste_derivative(x, o, t, m)


def _reste_derivative(x: Tensor, o: float, t: float, m: float) -> Tensor:
    x = x.detach()
    wd = _work_dtype(x)
    a = (x if x.dtype == wd else x.to(wd)).abs()
    f = (a <= t).to(wd)  # clip: 0 beyond t
    if o != 1.0:  # o == 1: slope 1 everywhere inside t (|x|^0 = m^0 = 1), the clipped STE exactly
        # max(|x|, m)^((1-o)/o) is |x|^e in the middle region and m^e (= the chord slope m^(1/o-1)) in the
        # inner one; only the middle region carries the factor 1/o. Mask arithmetic beats where/masked_fill
        # (both several times slower than a comparison on CPU).
        f.mul_((a <= m).to(wd).mul_(1.0 - 1.0 / o).add_(1.0 / o))
        f.mul_(a.clamp_(min=m).pow_((1.0 - o) / o))
    return f if f.dtype == x.dtype else f.to(x.dtype)


def ste_derivative(x: Tensor, clip: float = 1.0) -> Tensor:
    """The clipped straight-through derivative: 1 where ``|x| <= clip``, else 0 (paper slug: reste).

    >>> ste_derivative(torch.tensor([0.5, 1.0, 1.5]))
    tensor([1., 1., 0.])
    """
    _check_x(x)
    return _ste_derivative(x, _clip_param(clip))


def _ste_derivative(x: Tensor, clip: float) -> Tensor:
    return (x.detach().abs() <= clip).to(x.dtype)


# ---------------------------------------------------------------------------------------- Functions
class ReSTESign(torch.autograd.Function):
    """sign(x) (with sign(0) = +1) whose backward is the rectified power derivative (paper slug: reste).

    Equation: forward b = sign(x); backward grad_x = grad_b * d(x), with d = 0 for |x| > t,
    (1/o)|x|^((1-o)/o) for m < |x| <= t, and m^(1/o-1) for |x| <= m (m = interval).
    ``o`` (float or 0-dim tensor, >= 1), ``t`` and ``interval`` get no gradient.

    >>> x = torch.randn(4, requires_grad=True)
    >>> ReSTESign.apply(x, 3.0).sum().backward()
    >>> bool(torch.isfinite(x.grad).all())
    True
    """

    @staticmethod
    def forward(x: Tensor, o: Any, t: Any = RESTE_T, interval: Any = RESTE_INTERVAL) -> Tensor:
        _check_x(x)
        _reste_params(o, t, interval)
        return sign_pm1(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, o = inputs[0], inputs[1]
        t = inputs[2] if len(inputs) > 2 else RESTE_T
        interval = inputs[3] if len(inputs) > 3 else RESTE_INTERVAL
        ctx.params = _reste_params(o, t, interval)
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None):
        if grad_out is None:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        return grad_out * _reste_derivative(x, *ctx.params), None, None, None


class STESign(torch.autograd.Function):
    """sign(x) (with sign(0) = +1) whose backward is the clipped identity (paper slug: reste, baseline).

    Equation: forward b = sign(x); backward grad_x = grad_b * 1[|x| <= clip].

    >>> x = torch.tensor([-2.0, 0.5], requires_grad=True)
    >>> STESign.apply(x, 1.0).sum().backward()
    >>> x.grad
    tensor([0., 1.])
    """

    @staticmethod
    def forward(x: Tensor, clip: Any = 1.0) -> Tensor:
        _check_x(x)
        _clip_param(clip)
        return sign_pm1(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.clip = _clip_param(inputs[1] if len(inputs) > 1 else 1.0)
        ctx.save_for_backward(inputs[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None):
        if grad_out is None:
            return None, None
        (x,) = ctx.saved_tensors
        return grad_out * _ste_derivative(x, ctx.clip), None


def reste_sign(x: Tensor, o: Any, t: Any = RESTE_T, interval: Any = RESTE_INTERVAL) -> Tensor:
    """Binarise with sign (0 -> +1) and backpropagate ReSTE's rectified power derivative (paper slug: reste).

    Equation: forward sign(x); backward (1/o)|x|^((1-o)/o) on m < |x| <= t, m^(1/o-1) on |x| <= m, 0 beyond t.

    >>> w = torch.randn(8, requires_grad=True)
    >>> b = reste_sign(w, o=3.0)   # exactly +-1
    >>> b.sum().backward()         # w.grad = rectified derivative of sign(w)|w|^(1/3)
    """
    return ReSTESign.apply(x, o, t, interval)


def ste_sign(x: Tensor, clip: Any = 1.0) -> Tensor:
    """Binarise with sign (0 -> +1) and the clipped straight-through gradient (paper slug: reste baseline).

    Equation: forward sign(x); backward grad * 1[|x| <= clip].

    >>> a = torch.randn(8, requires_grad=True)
    >>> b = ste_sign(a)            # exactly +-1
    >>> b.sum().backward()         # a.grad = 1 where |a| <= 1
    """
    return STESign.apply(x, clip)


# ---------------------------------------------------------------------------------------- registry
def _ste_estimator(x: Tensor, o: float = 1.0) -> Tensor:
    """Clipped STE (clip = 1, as the official ReSTE baseline); the parameter is ignored."""
    return STESign.apply(x, 1.0)


def _reste_estimator(x: Tensor, o: float = 1.0) -> Tensor:
    """ReSTE with the official t = 1.5, interval = 0.1 and the layer's power ``o``."""
    return ReSTESign.apply(x, o, RESTE_T, RESTE_INTERVAL)


ESTIMATORS: Registry[Estimator] = Registry("binary estimator")
ESTIMATORS.add("ste", _ste_estimator)
ESTIMATORS.add("reste", _reste_estimator)


def register_estimator(name: str, fn: Estimator) -> Estimator:
    """Register a binary estimator ``fn(x, param) -> tensor`` under ``name`` (duplicates raise)."""
    if not callable(fn):
        raise TypeError(f"estimator {name!r} must be callable fn(x, param), got {type(fn).__name__}")
    return ESTIMATORS.add(name, fn)


def get_estimator(spec: str | Estimator) -> Estimator:
    """The estimator registered under ``spec`` (e.g. ``"ste"``, ``"reste"``), or ``spec`` if callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS.names()} or a callable, got {spec!r}")
        return ESTIMATORS.get(spec)
    raise TypeError(f"estimator must be a registered name ({', '.join(ESTIMATORS.names())}) or a callable "
                    f"fn(x, param), got {spec!r}")
