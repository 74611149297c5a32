"""The direction network of the deep conjugate direction method, 2-D (paper slug: deep-cg).

A fully convolutional net f(r) ~ c A^-1 r for grid Poisson-type operators, the 2-D analogue of the
paper's 3-D network (Kaneda et al., arXiv 2205.10763): a linear 3x3 conv to C channels; at full
resolution a ReLU conv, one residual block and a ReLU conv (the skip s); 2x average pooling; residual
blocks at half resolution; nearest upsampling plus s; residual blocks; a 1x1 conv to one channel::

    block(a) = a + relu(conv(relu(conv(a))))          (3x3 convs, zero padding: Dirichlet-like walls)

Fully convolutional, so one trained net runs on any grid size. Input and output: (batch, 1, H, W).

>>> net = DCDMNet2d(channels=16)
>>> q = net(torch.randn(4, 1, 32, 32))                # (4, 1, 32, 32): directions for 4 residuals
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import nonneg_int, positive_int


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a + F.relu(self.conv2(F.relu(self.conv1(a))))


class DCDMNet2d(nn.Module):
    """Direction network f for :func:`gradkit.solvers.deep_cg.dcdm` on 2-D grids (paper slug: deep-cg).

    channels: width C (paper: 16). full_blocks / coarse_blocks / up_blocks: residual blocks before the
    pooling, at half resolution and after the upsampling (paper: 1 (+ 2 single convs), 3, 2).
    """

    def __init__(self, channels: int = 16, full_blocks: int = 1, coarse_blocks: int = 3, up_blocks: int = 2) -> None:
        super().__init__()
        self.channels = positive_int("channels", channels)
        c = self.channels
        self.inp = nn.Conv2d(1, c, 3, padding=1)                      # linear
        self.pre = nn.Conv2d(c, c, 3, padding=1)
        self.full = nn.Sequential(*[_ResBlock(c) for _ in range(nonneg_int("full_blocks", full_blocks))])
        self.skip = nn.Conv2d(c, c, 3, padding=1)
        self.coarse = nn.Sequential(*[_ResBlock(c) for _ in range(nonneg_int("coarse_blocks", coarse_blocks))])
        self.up = nn.Sequential(*[_ResBlock(c) for _ in range(nonneg_int("up_blocks", up_blocks))])
        self.out = nn.Conv2d(c, 1, 1)                                 # per-pixel dense layer

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if r.dim() != 4 or r.shape[1] != 1:
            raise ValueError(f"r must have shape (batch, 1, H, W), got {tuple(r.shape)}")
        a = F.relu(self.pre(self.inp(r)))
        s = F.relu(self.skip(self.full(a)))
        h = self.coarse(F.avg_pool2d(s, 2, ceil_mode=True))
        u = F.interpolate(h, size=s.shape[-2:], mode="nearest") + s
        return self.out(self.up(u))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
