"""Procedural 3D segmentation volumes: random ellipsoid 'tumours' (core + enhancing shell) in noise.

Used by the ``rev-mbconv`` claim as a laptop-scale stand-in for BraTS. Each volume holds 1-3 random
ellipsoids; voxels inside the inner half of an ellipsoid are label 2 (core), the rest of it label 1
(enhancing shell), everything else 0 (background). Each of the ``channels`` modalities has its own
mean intensity per label, plus Gaussian noise and a smooth multiplicative bias field.
"""
from __future__ import annotations

import torch

from .._validate import integer, nonneg_int, real_scalar

__all__ = ["make_ellipsoid_volumes", "VOLUME_CLASSES"]

VOLUME_CLASSES = ("background", "shell", "core")


def make_ellipsoid_volumes(n: int, side: int = 16, channels: int = 4, *, noise: float = 0.6,
                           seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` volumes ``x (n, channels, side, side, side)`` and labels ``y (n, side, side, side)`` int64 in {0,1,2}.

    Deterministic in ``seed`` (own generator; the global RNG is untouched).

    >>> x, y = make_ellipsoid_volumes(2, side=8)
    >>> x.shape, y.shape
    (torch.Size([2, 4, 8, 8, 8]), torch.Size([2, 8, 8, 8]))
    """
    n = integer("n", n, low=1)
    side = integer("side", side, low=4)
    channels = integer("channels", channels, low=1)
    noise = real_scalar("noise", noise, nonneg=True, tensor_ok=False)
    seed = nonneg_int("seed", seed)
    g = torch.Generator().manual_seed(seed)
    # per-channel mean intensity of background / shell / core (fixed pattern, differs per channel)
    means = torch.zeros(3, channels)
    for c in range(channels):
        means[1, c] = (1.0, 0.4, -0.6, 0.8)[c % 4]
        means[2, c] = (0.3, 1.0, 0.7, -0.7)[c % 4]
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
    grid = torch.stack([zz, yy, xx])  # (3, s, s, s)
    labels = torch.zeros(n, side, side, side, dtype=torch.int64)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            centre = 0.25 + 0.5 * torch.rand(3, generator=g)
            radii = 0.15 + 0.15 * torch.rand(3, generator=g)
            r = (((grid - centre.view(3, 1, 1, 1)) / radii.view(3, 1, 1, 1)) ** 2).sum(0)
            inside, core = r <= 1.0, r <= 0.3
            lab = labels[i]
            lab[inside & (lab == 0)] = 1
            lab[core] = 2
    x = means[labels].permute(0, 4, 1, 2, 3).contiguous()  # (n, C, s, s, s)
    # smooth bias field: 1 + 0.2 * product of low-frequency sines with random phases
    ph = 2 * torch.pi * torch.rand(n, channels, 3, generator=g)
    bias = 1 + 0.2 * (torch.sin(2 * torch.pi * zz + ph[..., 0, None, None, None])
                      * torch.sin(2 * torch.pi * yy + ph[..., 1, None, None, None])
                      * torch.cos(2 * torch.pi * xx + ph[..., 2, None, None, None]))
    x = x * bias + noise * torch.randn(x.shape, generator=g)
    return x.to(dtype), labels
