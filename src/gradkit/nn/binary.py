"""Binary (1-bit weight and activation) layers with a pluggable straight-through estimator.

Paper slug: ``reste`` (the layers follow the official ReSTE binary conv: ``bw = sign(W) * mean(|W|)``,
``ba = sign(a)``, ``y = conv(ba, bw) + bias``; gradients reach ``W`` through both the sign surrogate
and the scale).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from ..functional.straight_through import Estimator, get_estimator
from .._validate import boolean, real_scalar

__all__ = ["BinaryModule", "BinaryLinear", "BinaryConv2d", "binary_modules", "set_estimator_param"]

_SCALES = ("mean_abs", None)


def _estimator_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None) or repr(spec)


class BinaryModule(nn.Module):
    """Mixin of the binary layers: estimator, its parameter ``o``, activation binarisation and scale."""

    def _init_binary(self, estimator: str | Estimator, binarize_act: bool, scale: str | None, o: float) -> None:
        self._estimator_fn = get_estimator(estimator)
        self.estimator = _estimator_name(estimator)
        boolean("binarize_act", binarize_act)
        if scale not in _SCALES:
            raise ValueError(f"scale must be 'mean_abs' or None, got {scale!r}")
        self.binarize_act = binarize_act
        self.scale = scale
        self.o = o

    @property
    def o(self) -> float:
        """The estimator parameter (ReSTE's power o; ignored by the STE). Scheduled from outside."""
        return self._o

    @o.setter
    def o(self, value: Any) -> None:
        self._o = real_scalar("o", value)

    def binary_weight(self) -> Tensor:
        """``sign(W)`` through the estimator, times ``mean(|W|)`` when ``scale='mean_abs'``."""
        w = self.weight
        bw = self._estimator_fn(w, self._o)
        if self.scale == "mean_abs":
            bw = bw * w.abs().mean()
        return bw

    def binary_input(self, x: Tensor) -> Tensor:
        return self._estimator_fn(x, self._o) if self.binarize_act else x

    def _binary_repr(self) -> str:
        return f"estimator={self.estimator}, o={self._o:.4g}, binarize_act={self.binarize_act}, scale={self.scale}"


class BinaryLinear(nn.Linear, BinaryModule):
    """Linear layer with binary weights (and activations) through a straight-through estimator.

    Paper slug: reste. Equation: y = sign(x) @ (sign(W) * mean|W|)^T + b, sign via ``estimator``
    ("reste": rectified power surrogate with power ``o``; "ste": clipped identity; or any registered
    name / callable ``fn(x, o)``). ``o`` is a plain attribute set by a schedule.

    >>> layer = BinaryLinear(16, 8, estimator="reste")
    >>> layer.o = 2.0
    >>> y = layer(torch.randn(4, 16))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 estimator: str | Estimator = "reste", binarize_act: bool = True,
                 scale: str | None = "mean_abs", o: float = 1.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_binary(estimator, binarize_act, scale, o)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.binary_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._binary_repr()}"


class BinaryConv2d(nn.Conv2d, BinaryModule):
    """2-D convolution with binary weights (and activations) through a straight-through estimator.

    Paper slug: reste. Equation: y = conv(sign(a), sign(W) * mean|W|) + b (the official ReSTE binary
    conv); ``estimator``, ``o``, ``binarize_act`` and ``scale`` as in :class:`BinaryLinear`.

    >>> conv = BinaryConv2d(3, 8, 3, padding=1, estimator="reste", o=3.0)
    >>> y = conv(torch.randn(2, 3, 8, 8))
    >>> y.shape
    torch.Size([2, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, estimator: str | Estimator = "reste",
                 binarize_act: bool = True, scale: str | None = "mean_abs", o: float = 1.0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_binary(estimator, binarize_act, scale, o)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.binary_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._binary_repr()}"


def binary_modules(model: nn.Module) -> list[tuple[str, BinaryModule]]:
    """``(name, module)`` of every binary layer in ``model`` (the model itself included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BinaryModule)]


def set_estimator_param(model: nn.Module, o: Any) -> int:
    """Set the estimator parameter ``o`` of every binary layer in ``model``; return how many were set.

    Paper slug: reste (o follows ``gradkit.schedules.reste.reste_power`` each epoch; a stale ``o`` on
    one layer is a silent bug, so all layers are walked).

    >>> model = nn.Sequential(BinaryLinear(4, 4), nn.BatchNorm1d(4), BinaryLinear(4, 2))
    >>> set_estimator_param(model, o=2.5)
    2
    """
    o = real_scalar("o", o)
    mods = binary_modules(model)
    for _, m in mods:
        m.o = o
    return len(mods)
