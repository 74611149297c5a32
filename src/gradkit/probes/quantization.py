"""BiPer's quantisation error: how far the sine surrogate is from its square wave (paper slug: ``biper``).

Official ``compute_QE``: QE = sum over binary layers of mean |sin(freq W) - sign(sin(freq W))|.
For latent weights spread over many periods sin(freq W) is close to uniform in phase and the per-layer
QE tends to 1 - 2/pi ~= 0.363; for freq |W| << 1 the sine is near 0 and QE is close to 1. ``sign``
maps 0 to +1 like the layers' forward (a measure-zero set).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import tensor
from ..functional.periodic import check_freq
from ..functional.straight_through import sign_pm1
from ..nn.periodic import periodic_layers

__all__ = ["QE_UNIFORM", "quantization_error", "biper_quantization_error"]

QE_UNIFORM = 1.0 - 2.0 / math.pi
"""Per-layer QE when the phase freq*W is uniform over whole periods: E|sin| = 2/pi, so 1 - 2/pi."""


@torch.no_grad()
def quantization_error(w: Tensor, freq: Any) -> float:
    """mean |sin(freq w) - sign(sin(freq w))| of one weight tensor (paper slug: biper).

    Equation: QE(w) = mean_i |sin(f w_i) - sign(sin(f w_i))| = 1 - mean_i |sin(f w_i)|.

    >>> w = torch.linspace(-3.14159265, 3.14159265, 100001)
    >>> round(quantization_error(w, 50.0), 3)   # 50 whole periods: 1 - 2/pi
    0.363
    """
    tensor("w", w, floating=True, finite=True)
    f = check_freq(freq)
    if w.numel() == 0:
        raise ValueError("w must have at least one element, got an empty tensor")
    s = torch.sin(w.detach().to(torch.promote_types(w.dtype, torch.float32)) * f)
    return float((s - sign_pm1(s)).abs().mean())


@torch.no_grad()
def biper_quantization_error(model: nn.Module, freq: Any = None, reduction: str = "sum") -> float | dict[str, float]:
    """BiPer's QE of a model: the sum over its periodic binary layers of their per-layer QE (paper slug: biper).

    Each layer uses its own frequency (``freq`` overrides it for all). ``reduction``: ``"sum"`` (official
    ``compute_QE``), ``"mean"`` (per-layer average) or ``"none"`` (``{layer name: QE}``).

    >>> model = nn.Sequential(BiPerLinear(64, 64, freq=20.0))   # from gradkit.nn.periodic
    >>> qe = biper_quantization_error(model)
    >>> 0.0 < qe < 1.0
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    f_all = None if freq is None else check_freq(freq)
    layers = periodic_layers(model)
    if not layers:
        raise ValueError("model has no BiPer (periodic) binary layers: use gradkit.nn.periodic.BiPerLinear / "
                         "BiPerConv2d, or a binary layer with estimator='biper'")
    per = {}
    for name, m, f in layers:
        try:
            per[name or "<model>"] = quantization_error(m.weight, f if f_all is None else f_all)
        except ValueError as e:
            raise ValueError(f"layer {name or '<model>'!r}: {e}") from None
    if reduction == "none":
        return per
    total = sum(per.values())
    return total if reduction == "sum" else total / len(per)
