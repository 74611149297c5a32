"""Fourier neural operator layers: the baseline operator network of the PDE papers (slugs ``mgno``, ``pihc-moe``).

A Fourier layer keeps the lowest ``modes`` frequencies of each axis (both signs of the first) and mixes
channels there with learned complex matrices: ``K u = irfft2(W . rfft2(u))`` on the kept modes, 0 elsewhere.
:class:`FNO2d` lifts the input pointwise to ``width`` channels, applies ``layers`` of ``GELU(K u + W u)`` (no
activation after the last), and projects with a two-layer pointwise MLP.

>>> net = FNO2d(in_channels=3, out_channels=1, width=16, modes=8, layers=3)
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 1, 32, 32])
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import nonneg_int, positive_int

__all__ = ["SpectralConv2d", "FNO2d"]


class SpectralConv2d(nn.Module):
    """One Fourier layer's global linear map on ``(B, width, H, W)`` tensors (float32 or float64)."""

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        width, self.modes = positive_int("width", width), positive_int("modes", modes)
        scale = 1.0 / (width * width)
        self.w1 = nn.Parameter(scale * torch.randn(width, width, modes, modes, dtype=torch.cfloat))
        self.w2 = nn.Parameter(scale * torch.randn(width, width, modes, modes, dtype=torch.cfloat))

    def forward(self, u: Tensor) -> Tensor:
        m, (h, w) = self.modes, u.shape[-2:]
        if m > h // 2 or m > w // 2 + 1:
            raise ValueError(f"modes={m} does not fit a {h}x{w} grid (needs modes <= H/2 and <= W/2 + 1)")
        uh = torch.fft.rfft2(u)
        out = torch.zeros(u.shape[0], self.w1.shape[1], h, w // 2 + 1, dtype=uh.dtype, device=u.device)
        out[..., :m, :m] = torch.einsum("bixy,ioxy->boxy", uh[..., :m, :m], self.w1.to(uh.dtype))
        out[..., -m:, :m] = torch.einsum("bixy,ioxy->boxy", uh[..., -m:, :m], self.w2.to(uh.dtype))
        return torch.fft.irfft2(out, s=(h, w))


class FNO2d(nn.Module):
    """FNO-2D: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``; the grid is zero-padded by ``padding``
    cells on the high side of each axis inside the Fourier layers (for non-periodic problems)."""

    def __init__(self, in_channels: int, out_channels: int, width: int, modes: int, layers: int = 3,
                 padding: int = 0) -> None:
        super().__init__()
        width = positive_int("width", width)
        self.padding = nonneg_int("padding", padding)
        self.lift = nn.Conv2d(positive_int("in_channels", in_channels), width, 1)
        self.spectral = nn.ModuleList(SpectralConv2d(width, modes) for _ in range(positive_int("layers", layers)))
        self.local = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.project = nn.Sequential(nn.Conv2d(width, 4 * width, 1), nn.GELU(),
                                     nn.Conv2d(4 * width, positive_int("out_channels", out_channels), 1))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        u = nn.functional.pad(self.lift(x), (0, self.padding, 0, self.padding))
        for i, (spectral, local) in enumerate(zip(self.spectral, self.local)):
            u = spectral(u) + local(u)
            if i < len(self.spectral) - 1:
                u = nn.functional.gelu(u)
        return self.project(u[..., :h, :w])
