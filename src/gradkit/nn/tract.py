"""TrAct first layers: Linear/Conv2d whose weight gradient is TrAct's ridge-fit update (paper slug: tract).

Wrap only the first layer of a model (the paper's setting): ``model.conv1 = tract(model.conv1)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validate import real_scalar
from ..functional.tract import check_solver, tract_conv2d, tract_linear

__all__ = ["TrActLinear", "TrActConv2d", "tract", "TrActModule"]


class TrActModule(nn.Module):
    """Mixin of the TrAct layers: the ridge strength ``lambda_`` and the linear-system ``solver``."""

    @property
    def lambda_(self) -> float:
        """Ridge strength of the weight fit (>= 0; relative to the input's second moments). A plain attribute."""
        return self._lambda

    @lambda_.setter
    def lambda_(self, value: Any) -> None:
        self._lambda = real_scalar("lambda_", value, nonneg=True)

    @property
    def solver(self) -> str:
        return self._solver

    @solver.setter
    def solver(self, value: Any) -> None:
        self._solver = check_solver(value)

    def _tract_repr(self) -> str:
        return f"lambda_={self._lambda:g}, solver={self._solver!r}"


class TrActLinear(nn.Linear, TrActModule):
    """``nn.Linear`` trained with TrAct: its weight gradient is G^T X (X^T X / b + lambda_ I)^-1.

    Paper slug: tract. Forward, input gradient and bias gradient are those of ``nn.Linear``; every
    leading index of the input is a row of X (b = their product). Parameters, ``state_dict`` keys and
    init are ``nn.Linear``'s, so it works with any optimizer. ``lambda_`` (default 0.1, the paper's)
    assumes unit-variance inputs.

    >>> layer = TrActLinear(8, 5, lambda_=0.1)
    >>> layer(torch.randn(16, 8)).square().sum().backward()
    >>> layer.weight.grad.shape
    torch.Size([5, 8])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lambda_: float = 0.1, *,
                 solver: str = "solve", device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lambda_ = lambda_
        self.solver = solver

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return tract_linear(x, self.weight, self.bias, self._lambda, self._solver)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._tract_repr()}"


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Numeric zero padding of a conv layer (``'valid'`` -> 0, ``'same'`` with odd kernels -> k // 2)."""
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(f"TrActConv2d supports padding='same' only with odd kernel sizes, got kernel "
                             f"{conv.kernel_size}")
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return (int(p[0]), int(p[1]))


class TrActConv2d(nn.Conv2d, TrActModule):
    """``nn.Conv2d`` trained with TrAct: weight gradient G^T X (X^T X / b + lambda_ I)^-1, X = unfolded patches.

    Paper slug: tract. b = N * H_out * W_out patch rows of C * kh * kw values; forward, input and bias
    gradients are ``nn.Conv2d``'s. Only ``groups=1``, ``dilation=1`` and ``padding_mode='zeros'``
    (as in the official code). ``lambda_`` (default 0.1) assumes unit-variance pixels.

    >>> conv = TrActConv2d(3, 16, 3, padding=1, lambda_=0.1)
    >>> conv(torch.randn(4, 3, 8, 8)).mean().backward()
    >>> conv.weight.grad.shape
    torch.Size([16, 3, 3, 3])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 lambda_: float = 0.1, *, solver: str = "solve", device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        _check_conv_supported(self)
        self._num_padding = _conv_padding(self)
        self.lambda_ = lambda_
        self.solver = solver

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return F.conv2d(x, self.weight, self.bias, self.stride, self._num_padding)
        return tract_conv2d(x, self.weight, self.bias, self.stride, self._num_padding, self._lambda, self._solver)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._tract_repr()}"


def _check_conv_supported(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ValueError(f"TrAct supports groups=1 only, got groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        raise ValueError(f"TrAct supports dilation=1 only, got dilation={conv.dilation}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"TrAct supports padding_mode='zeros' only, got {conv.padding_mode!r}")
    _conv_padding(conv)


def tract(layer: nn.Module, lambda_: float = 0.1, *, solver: str = "solve") -> TrActLinear | TrActConv2d:
    """Convert an ``nn.Linear`` / ``nn.Conv2d`` (a model's first layer) to its TrAct version (paper slug: tract).

    The returned module holds the *same* Parameter objects (optimizer state and references stay valid),
    the same ``state_dict`` keys and the same training mode; only the weight gradient changes to
    G^T X (X^T X / b + lambda_ I)^-1. A TrAct layer gets a fresh wrapper with the new ``lambda_``/``solver``.

    Example::

        model.conv1 = tract(model.conv1, lambda_=0.1)       # before or after building the optimizer
        loss.backward(); opt.step()
    """
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    if type(layer) in (nn.Linear, TrActLinear):
        cls: type = TrActLinear
    elif type(layer) in (nn.Conv2d, TrActConv2d):
        cls = TrActConv2d
        _check_conv_supported(layer)
    else:
        raise TypeError(f"layer must be an nn.Linear or nn.Conv2d (exactly: subclasses may change forward; lazy "
                        f"layers need one forward pass first), got {type(layer).__name__}")
    lam = real_scalar("lambda_", lambda_, nonneg=True)
    check_solver(solver)
    bias = layer.bias is not None
    if cls is TrActLinear:
        new = TrActLinear(layer.in_features, layer.out_features, bias=bias, lambda_=lam, solver=solver,
                          device="meta")
    else:
        new = TrActConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          bias=bias, lambda_=lam, solver=solver, device="meta")
    # the same Parameter objects (no copy, no re-initialisation): optimizer state stays attached
    for name in ("weight", "bias"):
        new._parameters[name] = layer._parameters[name]
    new.train(layer.training)
    return new
