"""Basis families for Kolmogorov-Arnold layers: a registry of univariate function spaces (paper slug: s-kan).

A KAN edge function is a learned combination of basis functions, phi(t) = sum_r c_r B_r(t). Each family
here is a small ``nn.Module`` mapping inputs of shape ``(..., d_in)`` to basis values of shape
``(..., d_in, R)`` (``R = module.size``), with the input ``domain`` it is meant for and, for wavelets,
learnable parameters of its own. The families (defaults in brackets):

- ``bspline``: B-splines of order k on a uniform grid of G intervals over [lo, hi], extended by k knots on
  each side (Cox-de Boor), R = G + k [G=5, k=3, [-1, 1]]; zero outside the extended grid, a partition of
  unity inside [lo, hi].
- ``chebyshev``: T_n(s), n = 0..degree, with s = tanh(t) (``squash="tanh"``) or s = t (``squash=None``),
  T_0 = 1, T_1 = s, T_n = 2 s T_(n-1) - T_(n-2) [degree 4].
- ``fourier``: cos(k w t), sin(k w t) for k = 1..K, R = 2K [K=4, w = pi: period 2 on [-1, 1]].
- ``rbf``: Gaussians exp(-((t - c_r) / h)^2), centres c_r evenly on [lo, hi], h their spacing (FastKAN)
  [8 on [-2, 2]].
- ``wavelet``: Mexican hat psi(s) = (1 - s^2) exp(-s^2 / 2), s = (t - b_(i,r)) / a_(i,r), with a learnable
  translation b and scale a > 0 per input and wavelet (Wav-KAN) [5 wavelets, b evenly on [-1, 1], a = 0.5].

Example::

    basis = make_basis("chebyshev", d_in=3, degree=4)
    values = basis(torch.rand(8, 3))          # (8, 3, 5)
    register_basis("my_family", MyBasis)      # any module with d_in, size, domain and forward
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .._validate import ArgumentError, choice, integer, positive, positive_int, real_scalar
from ..registry import Registry

__all__ = ["KANBasis", "BSplineBasis", "ChebyshevBasis", "FourierBasis", "RBFBasis", "WaveletBasis",
           "BASIS_FAMILIES", "register_basis", "make_basis", "basis_families"]


class KANBasis(nn.Module):
    """Base class of a basis family: ``forward(t)`` maps ``(..., d_in)`` to ``(..., d_in, size)``."""

    family: str = ""
    domain: tuple[float, float] = (-1.0, 1.0)

    def __init__(self, d_in: int, size: int) -> None:
        super().__init__()
        self.d_in = positive_int("d_in", d_in)
        self.size = size

    def _check_input(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[-1] != self.d_in:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ArgumentError(f"input of the {self.family} basis must be a tensor of shape (..., {self.d_in}), "
                                f"got {shape}")

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, size={self.size}, domain={self.domain}"


def _interval(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a pair (lo, hi) with lo < hi, got {value!r}") from None
    lo, hi = real_scalar(f"{name}[0]", lo), real_scalar(f"{name}[1]", hi)
    if not lo < hi:
        raise ArgumentError(f"{name} must be a pair (lo, hi) with lo < hi, got {value!r}")
    return lo, hi


class BSplineBasis(KANBasis):
    """B-splines of order ``order`` on ``grid`` uniform intervals over ``domain`` (extended by ``order`` knots)."""

    family = "bspline"

    def __init__(self, d_in: int, grid: int = 5, order: int = 3, domain: tuple[float, float] = (-1.0, 1.0)) -> None:
        grid, order = positive_int("grid", grid), integer("order", order, low=0)
        super().__init__(d_in, grid + order)
        self.grid, self.order, self.domain = grid, order, _interval("domain", domain)
        lo, hi = self.domain
        h = self.spacing = (hi - lo) / grid
        self.register_buffer("knots", lo + h * torch.arange(-order, grid + order + 1, dtype=torch.float32))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self._check_input(t)
        knots = self.knots.to(t.dtype)
        x = t.unsqueeze(-1)
        b = ((x >= knots[:-1]) & (x < knots[1:])).to(t.dtype)  # order 0: indicator of each knot interval
        for p in range(1, self.order + 1):  # Cox-de Boor recursion on a uniform grid: knot gaps are p * h
            w = (x - knots[:-p]) * (1.0 / (p * self.spacing))  # w_r = (x - t_r) / (t_(r+p) - t_r)
            b = w[..., :-1] * b[..., :-1] + (1.0 - w[..., 1:]) * b[..., 1:]
        return b


class ChebyshevBasis(KANBasis):
    """Chebyshev polynomials T_0..T_degree of tanh(t) (or of t itself with ``squash=None``)."""

    family = "chebyshev"

    def __init__(self, d_in: int, degree: int = 4, squash: str | None = "tanh") -> None:
        degree = integer("degree", degree, low=1)
        super().__init__(d_in, degree + 1)
        self.degree, self.squash = degree, choice("squash", squash, ("tanh", None))
        if squash is None:
            self.domain = (-1.0, 1.0)
        else:
            self.domain = (-math.inf, math.inf)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self._check_input(t)
        s = torch.tanh(t) if self.squash == "tanh" else t
        polys = [torch.ones_like(s), s]
        for _ in range(2, self.degree + 1):
            polys.append(2 * s * polys[-1] - polys[-2])
        return torch.stack(polys, dim=-1)


class FourierBasis(KANBasis):
    """cos(k w t) and sin(k w t) for k = 1..harmonics (R = 2 * harmonics)."""

    family = "fourier"
    domain = (-math.inf, math.inf)

    def __init__(self, d_in: int, harmonics: int = 4, omega: float = math.pi) -> None:
        harmonics = positive_int("harmonics", harmonics)
        super().__init__(d_in, 2 * harmonics)
        self.harmonics, self.omega = harmonics, positive("omega", omega)
        self.register_buffer("harmonic", torch.arange(1, harmonics + 1, dtype=torch.float32))  # k, exact

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self._check_input(t)
        arg = (t.unsqueeze(-1) * self.omega) * self.harmonic.to(t.dtype)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class RBFBasis(KANBasis):
    """Gaussians exp(-((t - c_r) / h)^2) with ``centers`` centres evenly on ``domain``, h their spacing."""

    family = "rbf"

    def __init__(self, d_in: int, centers: int = 8, domain: tuple[float, float] = (-2.0, 2.0)) -> None:
        centers = integer("centers", centers, low=2)
        super().__init__(d_in, centers)
        self.domain = _interval("domain", domain)
        lo, hi = self.domain
        self.register_buffer("centers", torch.linspace(lo, hi, centers))
        self.width = (hi - lo) / (centers - 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self._check_input(t)
        return torch.exp(-((t.unsqueeze(-1) - self.centers.to(t.dtype)) / self.width) ** 2)


class WaveletBasis(KANBasis):
    """Mexican-hat wavelets with a learnable translation and scale per input and wavelet."""

    family = "wavelet"
    domain = (-1.0, 1.0)

    def __init__(self, d_in: int, wavelets: int = 5, scale: float = 0.5) -> None:
        wavelets = integer("wavelets", wavelets, low=1)
        super().__init__(d_in, wavelets)
        scale = positive("scale", scale)
        shift = torch.linspace(-1.0, 1.0, wavelets) if wavelets > 1 else torch.zeros(1)
        self.translation = nn.Parameter(shift.repeat(self.d_in, 1))
        self.log_scale = nn.Parameter(torch.full((self.d_in, wavelets), math.log(scale)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self._check_input(t)
        s = (t.unsqueeze(-1) - self.translation) * torch.exp(-self.log_scale)
        s2 = s * s
        return (1.0 - s2) * torch.exp(-0.5 * s2)


BASIS_FAMILIES: Registry[Callable[..., KANBasis]] = Registry("basis family")
for _cls in (BSplineBasis, ChebyshevBasis, FourierBasis, RBFBasis, WaveletBasis):
    BASIS_FAMILIES.add(_cls.family, _cls)


def register_basis(name: str, factory: Callable[..., KANBasis]) -> Callable[..., KANBasis]:
    """Add a family: ``factory(d_in, **options)`` returns a module with ``size`` and ``forward`` as above."""
    if not callable(factory):
        raise ArgumentError(f"factory must be callable, got {type(factory).__name__}")
    return BASIS_FAMILIES.add(name, factory)


def basis_families() -> list[str]:
    """The names of the registered families."""
    return BASIS_FAMILIES.names()


def make_basis(family: str, d_in: int, **options: Any) -> KANBasis:
    """The basis module of ``family`` for ``d_in`` inputs; ``options`` are the family's keyword arguments.

    Raises :class:`ArgumentError` for an unknown family, naming the known ones.
    """
    if not isinstance(family, str) or family not in BASIS_FAMILIES:
        raise ArgumentError(f"family must be one of {tuple(basis_families())}, got {family!r}")
    basis = BASIS_FAMILIES.get(family)(d_in, **options)
    if not isinstance(getattr(basis, "size", None), int) or basis.size < 1:
        raise ArgumentError(f"basis family {family!r} must build a module with a positive int 'size'")
    return basis
