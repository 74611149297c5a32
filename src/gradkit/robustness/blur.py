"""Gaussian blur of image batches, a non-adversarial corruption (paper slug: contextual-fusion).

    blur(x) = x * g_sigma (separable), g_sigma(t) = exp(-t^2 / (2 sigma^2)) / Z on t = -r..r, r = ceil(3 sigma)

per channel, with reflect padding (replicate where the image is smaller than the kernel radius), so the
output has the input's shape and a constant image stays constant. sigma = 0 returns the input. The blur is
linear and differentiable in x.

>>> x = torch.rand(4, 1, 16, 16)
>>> gaussian_blur(x, sigma=1.0).shape
torch.Size([4, 1, 16, 16])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import real_scalar, tensor

__all__ = ["gaussian_kernel1d", "gaussian_blur"]


def gaussian_kernel1d(sigma: float, radius: int | None = None, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """The normalised 1-D Gaussian taps on -radius..radius (default radius ceil(3 sigma)); sums to 1.

    >>> gaussian_kernel1d(1.0).shape
    torch.Size([7])
    """
    sigma = real_scalar("sigma", sigma, nonneg=True)
    if sigma == 0:
        return torch.ones(1, dtype=dtype, device=device)
    r = int(math.ceil(3 * sigma)) if radius is None else radius
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"radius must be None or an int >= 0, got {radius!r}")
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(x: Tensor, sigma: float, radius: int | None = None) -> Tensor:
    """Blur images (N, C, H, W) (or (N, H, W)) with an isotropic Gaussian of std ``sigma`` pixels.

    >>> gaussian_blur(torch.ones(1, 1, 5, 5), 2.0).allclose(torch.ones(1, 1, 5, 5))
    True
    """
    tensor("x", x, floating=True)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be images of shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    sigma = real_scalar("sigma", sigma, nonneg=True)
    squeeze = x.dim() == 3
    xx = x.unsqueeze(1) if squeeze else x
    g = gaussian_kernel1d(sigma, radius, dtype=x.dtype, device=x.device)
    r = (g.numel() - 1) // 2
    if r == 0:
        return x.clone()
    c, h, w = xx.shape[1], xx.shape[2], xx.shape[3]
    mode = "reflect" if r < min(h, w) else "replicate"
    out = F.pad(xx, (r, r, r, r), mode=mode)
    out = F.conv2d(out, g.view(1, 1, 1, -1).expand(c, 1, 1, g.numel()), groups=c)
    out = F.conv2d(out, g.view(1, 1, -1, 1).expand(c, 1, g.numel(), 1), groups=c)
    return out.squeeze(1) if squeeze else out
