"""Reconstruction quality of an inversion attack: MSE, PSNR, SSIM per image, with batch matching.

    MSE_i  = mean (x_i - x_hat_i)^2            PSNR_i = 10 log10(R^2 / max(MSE_i, 1e-10 R^2))  (<= 100 dB)
    SSIM_i = mean over windows of (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))
             Gaussian window (sigma 1.5, size min(11, H, W) made odd), C1 = (0.01 R)^2, C2 = (0.03 R)^2

An attack may return a batch in any order: ``reconstruction_metrics(match=True)`` pairs reconstructions
with originals by minimal total MSE (Hungarian assignment) before scoring.

>>> m = reconstruction_metrics(x_true, x_hat)       # {"mse": ..., "psnr": ..., "ssim": ..., "order": [...]}
>>> psnr(x_true, x_hat)                             # per image, in dB
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import positive

__all__ = ["mse", "psnr", "ssim", "match_order", "reconstruction_metrics"]


def _pair(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not isinstance(x_hat, Tensor):
        raise TypeError("x and x_hat must be tensors")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch of shape (N, ...), got shape {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.detach().to(dtype), x_hat.detach().to(dtype=dtype, device=x.device)


def _range(data_range: float) -> float:
    return positive("data_range", data_range, tensor_ok=False)


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean squared error per image, shape (N,)."""
    x, x_hat = _pair(x, x_hat)
    return ((x - x_hat) ** 2).flatten(1).mean(dim=1)


def psnr(x: Tensor, x_hat: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image in dB (capped at 100 dB for identical images)."""
    r = _range(data_range)
    e = mse(x, x_hat).clamp_min(1e-10 * r * r)
    # the cap is part of the definition: rounding must not carry an identical pair past it
    return (10 * torch.log10(r * r / e)).clamp_max(100.0)


def _gauss(size: int, sigma: float, dtype, device) -> Tensor:
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: Tensor, x_hat: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image, shape (N,); images (N, H, W) or (N, C, H, W)."""
    r = _range(data_range)
    x, x_hat = _pair(x, x_hat)
    if x.dim() == 3:
        x, x_hat = x.unsqueeze(1), x_hat.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"ssim needs images of shape (N, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    size = min(11, h, w)
    size -= (size + 1) % 2  # odd
    g = _gauss(size, 1.5, x.dtype, x.device)
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(x_hat)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(x_hat * x_hat) - mu_y ** 2
    sxy = blur(x * x_hat) - mu_x * mu_y
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    # SSIM lies in [-1, 1] by definition; float rounding can step just past the bound
    return s.flatten(1).mean(dim=1).clamp(-1.0, 1.0)


def match_order(x: Tensor, x_hat: Tensor) -> list[int]:
    """``order`` such that ``x_hat[order[i]]`` is the reconstruction paired with ``x[i]`` (minimal total MSE)."""
    from scipy.optimize import linear_sum_assignment

    x, x_hat = _pair(x, x_hat)
    cost = torch.cdist(x.flatten(1), x_hat.flatten(1)) ** 2
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = [0] * len(rows)
    for r_, c_ in zip(rows, cols):
        order[int(r_)] = int(c_)
    return order


def reconstruction_metrics(x: Tensor, x_hat: Tensor, data_range: float = 1.0, match: bool = True) -> dict:
    """Mean MSE, PSNR and SSIM of a reconstructed batch (SSIM only for image-shaped inputs).

    Returns ``{"mse", "psnr", "ssim", "per_image": {metric: [...]}, "order": [...]}``; ``ssim`` is NaN for
    inputs that are not images (N, H, W) / (N, C, H, W).
    """
    x, x_hat = _pair(x, x_hat)
    order = match_order(x, x_hat) if match and x.shape[0] > 1 else list(range(x.shape[0]))
    x_hat = x_hat[order]
    per = {"mse": mse(x, x_hat), "psnr": psnr(x, x_hat, data_range)}
    if x.dim() in (3, 4):
        per["ssim"] = ssim(x, x_hat, data_range)
    out = {k: float(v.mean()) for k, v in per.items()}
    out.setdefault("ssim", float("nan"))
    out["per_image"] = {k: [float(t) for t in v] for k, v in per.items()}
    out["order"] = order
    return out
