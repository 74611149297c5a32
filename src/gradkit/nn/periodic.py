"""BiPer binary layers: periodic weight binarisation, ApproxSign activations, per-channel scale.

Paper slug: ``biper`` (Vargas et al., CVPR 2024, arXiv 2404.01278). The layers follow the official
``BinarizeConv2d``::

    a0  = a / sqrt(Var(a) + 1e-5)     training only, per sample (conv: over C,H,W; linear: features)
    a_b = sign(a0)                    backward max(0, 2 - 2|a0|)           (ApproxSign)
    w_b = sin(freq W)                 stage 1 (``hard=False``)
    w_b = sign(sin(freq W))           stage 2 (``hard=True``), backward freq cos(freq W)
    y   = alpha * (conv(a_b, w_b) + bias)    alpha learnable per output channel, init U(0, 1)

They are :class:`gradkit.nn.binary.BinaryModule` s, so ``binary_modules`` and ``set_estimator_param``
see them. ``weight_estimator`` swaps the weight binariser by name while keeping alpha and the activation
path (the paper's ablation; the claim's STE and ReSTE baselines): ``"biper"`` uses ``freq``/``hard``,
any other registered estimator (``"ste"``, ``"reste"``) gets the layer's ``o``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validate import boolean, is_int, positive_int, real_scalar
from ..functional.periodic import ACT_NORM_EPS, ApproxSign, BiPerSign, NormApproxSign, check_freq
from ..functional.straight_through import Estimator
from .binary import BinaryConv2d, BinaryLinear, BinaryModule, binary_modules

__all__ = ["BiPerModule", "BiPerLinear", "BiPerConv2d", "set_stage", "periodic_layers", "biper_regularizer"]


class BiPerModule(BinaryModule):
    """Mixin of the BiPer layers: frequency, stage flag, activation normalisation, per-channel alpha."""

    _norm_dims: tuple[int, ...] = (-1,)

    def _init_biper(self, freq: Any, hard: Any, act_norm: Any, alpha_shape: tuple[int, ...],
                    factory: dict) -> None:
        self.freq = freq
        self.hard = hard
        boolean("act_norm", act_norm)
        self.act_norm = act_norm
        self.periodic = self.estimator == "biper"
        # official init: alpha ~ U(0, 1) per output channel
        self.alpha = nn.Parameter(torch.rand(alpha_shape, **factory))

    @property
    def freq(self) -> float:
        """omega_0 of the square wave ``sign(sin(freq W))`` (used when ``weight_estimator == "biper"``)."""
        return self._freq

    @freq.setter
    def freq(self, value: Any) -> None:
        self._freq = check_freq(value)

    @property
    def hard(self) -> bool:
        """False: stage 1 (``sin(freq W)`` weights); True: stage 2 (square-wave weights)."""
        return self._hard

    @hard.setter
    def hard(self, value: Any) -> None:
        self._hard = boolean("hard", value)

    def binary_weight(self) -> Tensor:
        """The forward weights without alpha: ``sign(sin(freq W))`` (or ``sin(freq W)`` in stage 1)."""
        w = self.weight
        if self.periodic:
            return BiPerSign.apply(w, self._freq) if self._hard else torch.sin(w * self._freq)
        return self._estimator_fn(w, self._o)

    def binary_input(self, x: Tensor) -> Tensor:
        """ApproxSign of the activations, variance-normalised first in training mode (sign is scale free)."""
        if not self.binarize_act:
            return x
        if self.act_norm and self.training:
            n = math.prod(x.shape[d] for d in self._norm_dims) if x.dim() >= len(self._norm_dims) else 0
            if n > 1:  # the unbiased variance of one element is undefined: leave such inputs alone
                return NormApproxSign.apply(x, self._norm_dims, ACT_NORM_EPS)
        return ApproxSign.apply(x)

    def _scale_output(self, y: Tensor) -> Tensor:
        return y * self.alpha

    def get_extra_state(self) -> dict:
        # the frequency travels with the weights: stage 2 must binarise with the stage-1 frequency
        return {"freq": self._freq}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "freq" not in state:
            raise ValueError(f"BiPer layer state must be a dict with 'freq', got {state!r}")
        self.freq = state["freq"]

    def _biper_repr(self) -> str:
        w = (f"weight_estimator=biper, freq={self._freq:.4g}, hard={self._hard}" if self.periodic
             else f"weight_estimator={self.estimator}, o={self._o:.4g}")
        return f"{w}, binarize_act={self.binarize_act}, act_norm={self.act_norm}"


def _check_features(name: str, value: Any) -> None:
    positive_int(name, value)


class BiPerLinear(BinaryLinear, BiPerModule):
    """Linear layer with BiPer's periodic binary weights, ApproxSign activations and per-output alpha.

    Paper slug: biper. Equation: y = alpha * (sign(a0) @ sign(sin(freq W))^T + b), a0 = a / sqrt(Var(a)
    + 1e-5) in training (over the last dim); stage 1 (``hard=False``) uses sin(freq W) as weights.
    Backward: freq cos(freq W) for W, max(0, 2 - 2|a0|) for a0. ``weight_estimator="ste"`` / ``"reste"``
    swaps only the weight binariser (parameter ``o``).

    >>> layer = BiPerLinear(16, 8, freq=20.0, hard=False)   # stage 1
    >>> y = layer(torch.randn(4, 16))
    >>> set_stage(layer, 2)                                  # stage 2: square-wave weights
    1
    """

    _norm_dims = (-1,)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, freq: float = 20.0,
                 hard: bool = True, binarize_act: bool = True, act_norm: bool = True,
                 weight_estimator: str | Estimator = "biper", o: float = 1.0, device: Any = None,
                 dtype: Any = None) -> None:
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        super().__init__(in_features, out_features, bias=bias, estimator=weight_estimator,
                         binarize_act=binarize_act, scale=None, o=o, device=device, dtype=dtype)
        self._init_biper(freq, hard, act_norm, (out_features,), {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have {self.in_features} features in its last dim, got shape "
                             f"{tuple(x.shape)}")
        return self._scale_output(F.linear(self.binary_input(x), self.binary_weight(), self.bias))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._biper_repr()}")


class BiPerConv2d(BinaryConv2d, BiPerModule):
    """2-D convolution with BiPer's periodic binary weights (the official ``BinarizeConv2d``).

    Paper slug: biper. Equation: y = alpha * (conv(sign(a0), sign(sin(freq W))) + b), alpha of shape
    (C_out, 1, 1), a0 = a / sqrt(Var_{C,H,W}(a) + 1e-5) per sample in training; stage 1 uses sin(freq W).

    >>> conv = BiPerConv2d(3, 8, 3, padding=1, freq=20.0)
    >>> conv(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 8, 8, 8])
    """

    _norm_dims = (-3, -2, -1)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", *, freq: float = 20.0, hard: bool = True,
                 binarize_act: bool = True, act_norm: bool = True, weight_estimator: str | Estimator = "biper",
                 o: float = 1.0, device: Any = None, dtype: Any = None) -> None:
        _check_features("in_channels", in_channels)
        _check_features("out_channels", out_channels)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         estimator=weight_estimator, binarize_act=binarize_act, scale=None, o=o,
                         device=device, dtype=dtype)
        self._init_biper(freq, hard, act_norm, (out_channels, 1, 1), {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"input must be (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), got "
                             f"shape {tuple(x.shape)}")
        return self._scale_output(self._conv_forward(self.binary_input(x), self.binary_weight(), self.bias))

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._biper_repr()}"


def set_stage(model: nn.Module, stage: Any) -> int:
    """Switch every BiPer layer of ``model`` to stage 1 (sine weights) or 2 (square wave); return the count.

    Paper slug: biper. Stage 2 continues from the stage-1 weights with the same frequency.

    >>> model = nn.Sequential(BiPerLinear(4, 4, hard=False), nn.BatchNorm1d(4), BiPerLinear(4, 2, hard=False))
    >>> set_stage(model, 2)
    2
    """
    if not is_int(stage, low=1, high=2):
        raise ValueError(f"stage must be 1 (sine weights) or 2 (square-wave weights), got {stage!r}")
    mods = [m for _, m in binary_modules(model) if isinstance(m, BiPerModule)]
    for m in mods:
        m.hard = stage == 2
    return len(mods)


def periodic_layers(model: nn.Module) -> list[tuple[str, BinaryModule, float]]:
    """``(name, layer, freq)`` of every layer that binarises its weights with BiPer's square wave.

    BiPer layers with ``weight_estimator="biper"`` (frequency ``freq``) and generic binary layers with
    ``estimator="biper"`` (frequency = their parameter ``o``).
    """
    out = []
    for name, m in binary_modules(model):
        if isinstance(m, BiPerModule):
            if m.periodic:
                out.append((name, m, m.freq))
        elif m.estimator == "biper":
            out.append((name, m, m.o))
    return out


def biper_regularizer(model: nn.Module, tau: Any) -> Tensor:
    """The official training loop's regulariser ``tau * sum_layers mean(sin^2(freq W))`` (paper slug: biper).

    Equation: R = tau * sum_l mean(0.5 - 0.5 cos(2 freq_l W_l)); differentiable in W. The official
    CIFAR scripts use tau = 0.037 (stage 1) / 0.0468 (stage 2) with an exponential schedule; not
    described in the paper as a contribution.

    >>> model = nn.Sequential(BiPerLinear(8, 8), nn.BatchNorm1d(8))
    >>> loss = biper_regularizer(model, tau=1e-3)
    >>> loss.backward()
    """
    tau = real_scalar("tau", tau, nonneg=True)
    layers = periodic_layers(model)
    if not layers:
        raise ValueError("model has no BiPer (periodic) binary layers: use gradkit.nn.periodic.BiPerLinear / "
                         "BiPerConv2d, or a binary layer with estimator='biper'")
    total = None
    for _, m, f in layers:
        r = torch.sin(m.weight * f).square().mean()
        total = r if total is None else total + r
    return total * tau
