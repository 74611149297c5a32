"""A multi-channel linear operator parameterised as one multigrid V-cycle of convolutions (paper slug: mgno).

MgNO writes the whole linear map ``W = [W_ij]`` of a neural-operator layer as a V-cycle ``f -> u``::

    level 1:  u_1 = S f  (then nu_1 - 1 more steps  u <- u + S(f - A u))
    down:     f_{l+1} = R_l f_l  (or R_l (f_l - A_l u_l) with residual_restriction)
              u_{l+1} = Pi_l u_l;   nu_{l+1} steps  u <- u + S(f - A u)
    up:       u_l <- u_l + R_l^T u_{l+1}  (optional norm, then post-smoothing steps)
    return u_1

``A``, ``S`` are separate 3x3 (3) convolutions, ``R``/``Pi`` 3 (x3) stride-2 convolutions and ``R^T`` a
4 (x4) stride-2 transposed convolution. Boundary conditions come from the padding: ``'zeros'``
(Dirichlet) or ``'circular'`` (periodic, applied to every convolution, the transposed ones included).
The cost is O(n) in the number of grid points and the receptive field is global.

>>> W = MultigridConv2d(1, 8, levels=((1, 0), (1, 0), (2, 0)))
>>> W(torch.randn(2, 1, 32, 32)).shape
torch.Size([2, 8, 32, 32])
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._validate import ArgumentError, boolean, choice, is_int, positive_int

__all__ = ["MultigridConv1d", "MultigridConv2d", "DEFAULT_LEVELS", "check_levels"]

DEFAULT_LEVELS: tuple[tuple[int, int], ...] = ((1, 0), (1, 0), (1, 0), (2, 0))
PADDING_MODES = ("zeros", "circular")


def check_levels(levels: Sequence[Sequence[int]], name: str = "levels") -> tuple[tuple[int, int], ...]:
    """Validate a V-cycle's ``((pre, post), ...)`` smoothing counts, finest level first.

    Every count is an int >= 0 and the finest level needs at least one pre-smoothing step (``u = S f``).
    Raises :class:`~gradkit._validate.ArgumentError` naming the bad entry.
    """
    try:
        items = [tuple(lv) for lv in levels]
    except TypeError:
        raise ArgumentError(f"{name} must be a sequence of (pre, post) pairs, got {levels!r}") from None
    if not items:
        raise ArgumentError(f"{name} must hold at least one (pre, post) pair, got {levels!r}")
    for i, lv in enumerate(items):
        if len(lv) != 2 or not all(is_int(k, low=0) for k in lv):
            raise ArgumentError(f"{name}[{i}] must be a (pre, post) pair of ints >= 0, got {lv!r}")
    if items[0][0] < 1:
        raise ArgumentError(f"{name}[0] needs at least one pre-smoothing step (u = S f), got {items[0]!r}")
    return tuple((int(a), int(b)) for a, b in items)


class _Step(nn.Module):
    """One smoothing step ``u <- u + S(f - A u)``; without ``A`` (the very first step) ``u = S f``."""

    def __init__(self, A: nn.Module | None, S: nn.Module) -> None:
        super().__init__()
        self.A, self.S = A, S

    def forward(self, u: torch.Tensor | None, f: torch.Tensor) -> torch.Tensor:
        if u is None:
            return self.S(f)
        return u + self.S(f - self.A(u))


class _Prolong(nn.Module):
    """Stride-2 transposed convolution (kernel 4, padding 1) that doubles each spatial size.

    With ``circular`` padding the coarse input is wrapped by one cell before the transposed convolution
    and the result cropped, so contributions that fall off one edge re-enter at the other.
    """

    def __init__(self, dim: int, channels: int, padding_mode: str) -> None:
        super().__init__()
        cls = nn.ConvTranspose1d if dim == 1 else nn.ConvTranspose2d
        self.circular = padding_mode == "circular"
        self.dim = dim
        self.conv = cls(channels, channels, kernel_size=4, stride=2, padding=0 if self.circular else 1, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if not self.circular:
            return self.conv(u)
        out = self.conv(nn.functional.pad(u, (1, 1) * self.dim, mode="circular"))
        sl = tuple(slice(3, 3 + 2 * n) for n in u.shape[2:])
        return out[(Ellipsis,) + sl]


class _MultigridConvNd(nn.Module):
    _dim = 2

    def __init__(self, in_channels: int, out_channels: int, levels: Sequence[Sequence[int]] = DEFAULT_LEVELS, *,
                 padding_mode: str = "zeros", residual_restriction: bool = False, norm: bool = False,
                 bias: bool = False) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.levels = check_levels(levels)
        self.padding_mode = choice("padding_mode", padding_mode, PADDING_MODES)
        self.residual_restriction = boolean("residual_restriction", residual_restriction)
        self.norm = boolean("norm", norm)
        self.bias = boolean("bias", bias)
        d, cf, cu = self._dim, self.in_channels, self.out_channels
        conv = nn.Conv1d if d == 1 else nn.Conv2d

        def smooth_S() -> nn.Module:
            return conv(cf, cu, 3, padding=1, bias=bias, padding_mode=padding_mode)

        def op_A() -> nn.Module:
            return conv(cu, cf, 3, padding=1, bias=bias, padding_mode=padding_mode)

        def step(first: bool = False) -> _Step:
            return _Step(None if first else op_A(), smooth_S())

        self.pre = nn.ModuleList(
            nn.ModuleList(step(first=(lvl == 0 and i == 0)) for i in range(pre))
            for lvl, (pre, _) in enumerate(self.levels))
        self.post = nn.ModuleList(nn.ModuleList(step() for _ in range(post)) for _, post in self.levels)
        n_down = len(self.levels) - 1
        self.restrict_f = nn.ModuleList(conv(cf, cf, 3, stride=2, padding=1, bias=False, padding_mode=padding_mode)
                                        for _ in range(n_down))
        self.restrict_u = nn.ModuleList(conv(cu, cu, 3, stride=2, padding=1, bias=False, padding_mode=padding_mode)
                                        for _ in range(n_down))
        self.residual_A = nn.ModuleList(op_A() for _ in range(n_down)) if residual_restriction else None
        self.prolong = nn.ModuleList(_Prolong(d, cu, padding_mode) for _ in range(n_down))
        # GroupNorm with one group normalises over (C, *spatial) like the NS variant's LayerNorm, for any size
        self.norms = nn.ModuleList(nn.GroupNorm(1, cu) for _ in range(n_down)) if norm else None

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def _check_input(self, f: torch.Tensor) -> None:
        want = 2 + self._dim
        if not isinstance(f, torch.Tensor) or f.dim() != want:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ArgumentError(f"f must be a tensor of shape (batch, {self.in_channels}, "
                                f"{', '.join('n' * self._dim)}), got {got}")
        if f.shape[1] != self.in_channels:
            raise ArgumentError(f"f must have {self.in_channels} channels (in_channels), got shape {tuple(f.shape)}")
        k = 2 ** (self.num_levels - 1)
        if any(n % k for n in f.shape[2:]):
            raise ArgumentError(f"f's spatial size {tuple(f.shape[2:])} must be divisible by 2**(levels - 1) = {k} "
                                f"for a {self.num_levels}-level V-cycle")

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        self._check_input(f)
        us: list[torch.Tensor] = []
        fs: list[torch.Tensor] = []
        u: torch.Tensor | None = None
        for lvl in range(self.num_levels):
            if lvl > 0:
                r = f - self.residual_A[lvl - 1](u) if self.residual_A is not None else f
                f = self.restrict_f[lvl - 1](r)
                u = self.restrict_u[lvl - 1](u)
            for s in self.pre[lvl]:
                u = s(u, f)
            us.append(u)
            fs.append(f)
        for lvl in range(self.num_levels - 2, -1, -1):
            u = us[lvl] + self.prolong[lvl](us[lvl + 1])
            if self.norms is not None:
                u = self.norms[lvl](u)
            for s in self.post[lvl]:
                u = s(u, fs[lvl])
            us[lvl] = u
        return us[0]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, levels={self.levels}, padding_mode={self.padding_mode!r}"
                f"{', residual_restriction=True' if self.residual_restriction else ''}"
                f"{', norm=True' if self.norm else ''}{', bias=True' if self.bias else ''}")


class MultigridConv2d(_MultigridConvNd):
    """The MgNO linear operator on 2-D grids: one V-cycle of convolutions ``W_Mg : f -> u`` (paper slug: mgno).

    ``u = W_Mg f`` as in the module docstring; ``levels[l] = (pre, post)`` smoothing steps on level l (finest
    first); the spatial size must be divisible by ``2**(len(levels) - 1)``. ``in_channels`` is the channel
    count of ``f`` (and of the restricted right-hand sides), ``out_channels`` that of ``u``.
    ``residual_restriction``: restrict the residual ``f - A u`` (classical multigrid) instead of ``f``.
    ``norm``: GroupNorm(1, C) after each prolongation (the periodic Navier-Stokes variant).
    ``bias``: biases in the ``A``/``S`` convolutions. With all biases off the map is linear in ``f``.

    >>> W = MultigridConv2d(1, 8, levels=((1, 0), (1, 0), (2, 0)), padding_mode="circular")
    >>> W(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    _dim = 2


class MultigridConv1d(_MultigridConvNd):
    """The MgNO linear operator on 1-D grids (``Conv1d``/``ConvTranspose1d``); see :class:`MultigridConv2d`.

    >>> W = MultigridConv1d(1, 8, levels=((1, 0), (1, 0), (2, 0)))
    >>> W(torch.randn(2, 1, 64)).shape
    torch.Size([2, 8, 64])
    """

    _dim = 1
