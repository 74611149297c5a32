"""Binary-weight layers parameterised by continuous fields, their exact KL, and the perceptron's loss.

Paper slug: ``continual-binary`` (statistical mechanics of continual learning, arXiv 2212.02846).
Each binary weight w in {-1, +1} follows q(w) propto exp(beta * theta * w), so
m = E[w] = tanh(beta theta) and sigma = Var[w] = 1 - m^2; learning happens on the fields theta.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validate import ArgumentError, choice, positive, real_scalar, tensor
from ..functional.field_kl import binary_field_kl
from ..functional.straight_through import sign_pm1

__all__ = ["FieldBinaryLinear", "field_modules", "field_thetas", "set_field_beta", "field_mode", "field_kl",
           "binary_perceptron_logH_loss", "MODES"]

MODES = ("gaussian", "sample", "map")
_VAR_FLOOR = 1e-20  # keeps sqrt differentiable where every weight feeding a unit is saturated


class FieldBinaryLinear(nn.Module):
    """Linear layer of binary weights w ~ q(w) propto exp(beta theta w), trained through the fields ``theta``.

    Paper slug: continual-binary. Forward for inputs a with fan-in N (no bias, as in the paper):

    - ``"gaussian"`` (training): z = (M a) / sqrt(N) + sqrt((Sigma (a * a)) / N) * eps, eps ~ N(0, I),
      M = tanh(beta Theta), Sigma = 1 - M^2 (central-limit preactivation, local reparameterisation);
    - ``"sample"``: z = (W a) / sqrt(N) with W drawn from q (P(w = +1) = (1 + m) / 2), no gradient;
    - ``"map"``: z = (sign(Theta) a) / sqrt(N) (the most probable weights; sign(0) = +1), no gradient.

    ``beta`` (inverse temperature) and ``mode`` are plain attributes set from outside (a schedule,
    an evaluation switch). Fields start as N(0, init_std^2) (the official code's init).

    >>> layer = FieldBinaryLinear(64, 32, beta=1.0)
    >>> z = layer(torch.randn(8, 64))            # Gaussian preactivation, differentiable in theta
    >>> layer.mode = "map"; zmap = layer(torch.randn(8, 64))
    """

    def __init__(self, in_features: int, out_features: int, beta: float = 1.0, mode: str = "gaussian", *,
                 init_std: float = 1.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArgumentError(f"{name} must be a positive int, got {v!r}")
        init_std = real_scalar("init_std", init_std, nonneg=True)
        self.in_features, self.out_features = in_features, out_features
        self.beta = beta
        self.mode = mode
        self.theta = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        with torch.no_grad():
            self.theta.normal_(0.0, init_std)

    @property
    def beta(self) -> float:
        """Inverse temperature of q; larger beta makes the weights more deterministic."""
        return self._beta

    @beta.setter
    def beta(self, value: Any) -> None:
        self._beta = positive("beta", value)

    @property
    def mode(self) -> str:
        """``"gaussian"`` | ``"sample"`` | ``"map"`` (see the class docstring)."""
        return self._mode

    @mode.setter
    def mode(self, value: Any) -> None:
        self._mode = choice("mode", value, MODES)

    def mean_weight(self) -> Tensor:
        """m = tanh(beta theta), the mean of each binary weight."""
        return torch.tanh(self._beta * self.theta)

    def weight_variance(self) -> Tensor:
        """sigma = 1 - m^2, the variance of each binary weight."""
        m = self.mean_weight()
        return 1.0 - m * m

    def map_weight(self) -> Tensor:
        """sign(theta) in {-1, +1} (sign(0) = +1), detached."""
        return sign_pm1(self.theta.detach())

    def sample_weight(self, generator: torch.Generator | None = None) -> Tensor:
        """Binary weights drawn from q: +1 with probability (1 + m) / 2, detached."""
        m = self.mean_weight().detach()
        u = torch.rand(m.shape, generator=generator, device=m.device, dtype=m.dtype)
        return torch.where(2.0 * u < 1.0 + m, torch.ones_like(m), -torch.ones_like(m))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dim, got shape {tuple(x.shape)}")
        scale = 1.0 / math.sqrt(self.in_features)
        if self._mode == "map":
            return F.linear(x, self.map_weight()) * scale
        if self._mode == "sample":
            return F.linear(x, self.sample_weight()) * scale
        m = self.mean_weight()
        mean = F.linear(x, m) * scale
        var = F.linear(x * x, 1.0 - m * m) * (scale * scale)
        return mean + torch.sqrt(var + _VAR_FLOOR) * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, beta={self._beta:.4g}, " \
               f"mode={self._mode!r}"


def field_modules(model: nn.Module) -> list[FieldBinaryLinear]:
    """Every :class:`FieldBinaryLinear` in ``model`` (the model itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, FieldBinaryLinear)]


def field_thetas(model: nn.Module) -> list[Tensor]:
    """Detached copies of the fields of every field layer in ``model`` (a snapshot for a KL reference)."""
    return [m.theta.detach().clone() for m in field_modules(model)]


def set_field_beta(model: nn.Module, beta: Any) -> int:
    """Set ``beta`` on every field layer of ``model``; return how many layers were set.

    Paper slug: continual-binary (the official code anneals one beta for all layers each epoch,
    see :func:`gradkit.schedules.field_beta.field_beta`).

    >>> net = nn.Sequential(FieldBinaryLinear(4, 4), nn.ReLU(), FieldBinaryLinear(4, 2))
    >>> set_field_beta(net, 2.5)
    2
    """
    beta = positive("beta", beta)
    mods = field_modules(model)
    for m in mods:
        m.beta = beta
    return len(mods)


@contextlib.contextmanager
def field_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run a block with every field layer of ``model`` in ``mode`` ("gaussian" | "sample" | "map"); restored after.

    Paper slug: continual-binary (train with the Gaussian preactivation, evaluate the MAP weights).

    >>> net = nn.Sequential(FieldBinaryLinear(4, 2))
    >>> with field_mode(net, "map"):
    ...     y = net(torch.randn(3, 4))
    >>> net[0].mode
    'gaussian'
    """
    choice("mode", mode, MODES)
    mods = field_modules(model)
    old = [m.mode for m in mods]
    try:
        for m in mods:
            m.mode = mode
        yield model
    finally:
        for m, o in zip(mods, old):
            m.mode = o


def _as_thetas(value: Any, name: str) -> list[Tensor]:
    if isinstance(value, nn.Module):
        mods = field_modules(value)
        if not mods:
            raise ArgumentError(f"{name} has no FieldBinaryLinear layers")
        return [m.theta for m in mods]
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(t, Tensor) for t in value):
        return list(value)
    raise ArgumentError(f"{name} must be an nn.Module with field layers, a tensor or a non-empty sequence of "
                        f"tensors, got {type(value).__name__}")


def field_kl(current: nn.Module | Tensor | Sequence[Tensor], reference: nn.Module | Tensor | Sequence[Tensor],
             beta: float | None = None) -> Tensor:
    """Exact KL(q_theta || q_theta') summed over every binary weight; differentiable in ``current``.

    Paper slug: continual-binary. Equation, per weight with m = tanh(beta theta):
    KL = beta (theta - theta') m - log cosh(beta theta) + log cosh(beta theta'),
    dKL/dtheta = beta^2 (theta - theta') (1 - m^2). KL >= 0, with equality iff theta = theta'.

    current / reference: a model (its field layers' ``theta``), a tensor or a sequence of tensors, matched
    in order and shape; ``reference`` is treated as a constant. beta: None uses each layer's own beta
    when ``current`` is a model, else 1.

    >>> theta = torch.zeros(5, requires_grad=True)
    >>> field_kl(theta, torch.zeros(5)).item()
    0.0
    """
    cur = _as_thetas(current, "current")
    ref = [t.detach() for t in _as_thetas(reference, "reference")]
    if len(cur) != len(ref):
        raise ValueError(f"reference must hold {len(cur)} field tensors like current, got {len(ref)}")
    if beta is None:
        betas = [m.beta for m in field_modules(current)] if isinstance(current, nn.Module) else [1.0] * len(cur)
    else:
        betas = [positive("beta", beta)] * len(cur)
    total = cur[0].new_zeros(())
    for i, (t, r, b) in enumerate(zip(cur, ref, betas)):
        if t.shape != r.shape:
            raise ValueError(f"reference[{i}] must have shape {tuple(t.shape)} like current[{i}], got {tuple(r.shape)}")
        total = total + binary_field_kl(t, r, b)
    return total

def binary_perceptron_logH_loss(theta: Tensor, x: Tensor, y: Tensor, beta: float = 1.0,
                                reduction: str = "mean") -> Tensor:
    """Negative log-probability of the labels of a binary perceptron under the field distribution.

    Paper slug: continual-binary (teacher-student perceptron). With m = tanh(beta theta) and
    sigma = 1 - m^2, the preactivation h = sum_i w_i x_i is ~ Gaussian with mean mu = sum_i m_i x_i and
    variance V = sum_i sigma_i x_i^2, so P(correct) = H(-y mu / sqrt(V)) = Phi(y mu / sqrt(V)) and the
    loss is -log Phi(y mu / sqrt(V)), computed stably with ``torch.special.log_ndtr``.

    theta: (N,) fields; x: (B, N); y: (B,) labels in {-1, +1}; reduction: "mean" | "sum" | "none".

    >>> theta = torch.zeros(10, requires_grad=True)
    >>> x = torch.randn(4, 10).sign(); y = torch.tensor([1., -1., 1., 1.])
    >>> round(binary_perceptron_logH_loss(theta, x, y).item(), 4)   # log 2 at theta = 0
    0.6931
    """
    tensor("theta", theta, floating=True)
    tensor("x", x, floating=True)
    tensor("y", y)
    beta = positive("beta", beta)
    choice("reduction", reduction, ("mean", "sum", "none"))
    if theta.dim() != 1:
        raise ValueError(f"theta must be 1-D (N,), got shape {tuple(theta.shape)}")
    if x.dim() != 2 or x.shape[1] != theta.shape[0]:
        raise ValueError(f"x must have shape (B, {theta.shape[0]}), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    bad = (y != 1) & (y != -1)
    if bool(bad.any()):
        raise ValueError(f"y must hold labels in {{-1, +1}}, got {int(bad.sum())} other value(s), e.g. "
                         f"{y[bad][0].item()!r}")
    m = torch.tanh(beta * theta)
    mu = x @ m
    v = (x * x) @ (1.0 - m * m)
    out = -torch.special.log_ndtr(y.to(mu.dtype) * mu / torch.sqrt(v + _VAR_FLOOR))
    return out if reduction == "none" else (out.mean() if reduction == "mean" else out.sum())
