"""MgNO: a neural operator whose layers are multigrid V-cycles plus a pointwise term (paper slug: mgno).

Layer l:  u^{l+1} = act( W_Mg^{(l)} u^l + K^{(l)} u^l + b^{(l)} ),  W_Mg a :class:`MultigridConv2d` V-cycle,
K^{(l)} u + b^{(l)} a 1x1 convolution (the local linear term and the function bias). The network is
``n_layers`` such layers followed by a 1x1 convolution (no bias) to ``out_channels``; no lifting or
projection MLP: the V-cycle's channels act as the neurons. ``pointwise=False`` drops the 1x1 branch
(the periodic Navier-Stokes variant, usually with ``norm=True`` and ``skip=True``: output + input).

>>> model = MgNO(in_channels=1, width=8, n_layers=2, levels=((1, 0), (1, 0), (2, 0)))
>>> model(torch.randn(4, 1, 32, 32)).shape
torch.Size([4, 1, 32, 32])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .._validate import ArgumentError, boolean, choice, positive_int
from ..nn.multigrid import DEFAULT_LEVELS, MultigridConv1d, MultigridConv2d

__all__ = ["MgNO"]


class MgNO(nn.Module):
    """The MgNO network: ``n_layers`` of ``act(V-cycle(u) + Conv1x1(u))`` then a 1x1 conv (paper slug: mgno).

    in_channels/out_channels: channels of the input and output functions; width: channels of every
    V-cycle (``u``); levels: ``((pre, post), ...)`` smoothing counts per level, finest first (the grid size
    must be divisible by ``2**(len(levels) - 1)``); dim: 1 or 2 spatial dimensions; padding_mode:
    ``'zeros'`` (Dirichlet) or ``'circular'`` (periodic); act: a module class (default GELU);
    pointwise: add the 1x1 branch with bias; residual_restriction, norm: see :class:`MultigridConv2d`;
    skip: add the input to the output (needs ``in_channels == out_channels``).

    >>> model = MgNO(in_channels=1, width=8, n_layers=2, levels=((1, 0), (2, 0)), dim=1)
    >>> model(torch.randn(4, 1, 64)).shape
    torch.Size([4, 1, 64])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16, n_layers: int = 3,
                 levels: Sequence[Sequence[int]] = DEFAULT_LEVELS, *, dim: int = 2, padding_mode: str = "zeros",
                 act: Callable[[], nn.Module] = nn.GELU, pointwise: bool = True, residual_restriction: bool = False,
                 norm: bool = False, skip: bool = False) -> None:
        super().__init__()
        in_channels = positive_int("in_channels", in_channels)
        out_channels = positive_int("out_channels", out_channels)
        width = positive_int("width", width)
        n_layers = positive_int("n_layers", n_layers)
        self.dim = choice("dim", dim, (1, 2))
        self.pointwise = boolean("pointwise", pointwise)
        self.skip = boolean("skip", skip)
        if not callable(act):
            raise ArgumentError(f"act must be a module class or factory such as nn.GELU, got {act!r}")
        if skip and in_channels != out_channels:
            raise ArgumentError(f"skip=True needs in_channels == out_channels, got {in_channels} and {out_channels}")
        mg = MultigridConv1d if dim == 1 else MultigridConv2d
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        chans = [in_channels] + [width] * n_layers
        self.cycles = nn.ModuleList(
            mg(chans[i], width, levels, padding_mode=padding_mode, residual_restriction=residual_restriction,
               norm=norm) for i in range(n_layers))
        self.local = nn.ModuleList(conv(chans[i], width, 1) for i in range(n_layers)) if pointwise else None
        self.act = act()
        self.head = conv(width, out_channels, 1, bias=False)

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        return self.cycles[0].levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x
        for i, cycle in enumerate(self.cycles):
            v = cycle(u)
            if self.local is not None:
                v = v + self.local[i](u)
            u = self.act(v)
        out = self.head(u)
        return out + x if self.skip else out
