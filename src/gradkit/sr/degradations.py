"""High-frequency manipulations that build PCL-SR's positives and hard negatives (paper slug: pcl-sr).

Positives are the HR image and sharpened copies of it, hard negatives the bicubic upsampling of the LR
input and blurred copies of the HR image::

    sharpen(x, f) = s + f * (x - s),  s = x smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13 (borders kept)
    blur(x)       = x * g(kx, sx) (rows) * g(ky, sy) (columns),  kx, ky odd sizes, sx, sy ~ U(sigma)

``f > 1`` sharpens, ``f < 1`` softens, ``f = 1`` is the identity. Every image of a batch draws its own
factor / kernel. Float images are neither clamped nor quantised unless asked (``clamp=(0, 1)``).

Example::

    hr = torch.rand(8, 1, 32, 32); lr = F.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True)
    pos, neg = make_contrastive_samples(hr, lr, n_pos=2, n_neg=2, generator=torch.Generator().manual_seed(0))
    len(pos), len(neg)   # (3, 3): hr + 2 sharpened; bicubic(lr) + 2 blurred
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import ArgumentError, is_int, nonneg_int, optional_generator, real_in, tensor

__all__ = ["sharpen", "random_gaussian_blur", "make_contrastive_samples", "upscale_factor"]

_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def _check_batch(name: str, x: Tensor) -> Tensor:
    tensor(name, x, floating=True)
    if x.dim() != 4:
        raise ArgumentError(f"{name} must be a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    return x


def _per_image(name: str, value, n: int, like: Tensor) -> Tensor:
    """A scalar or a length-n vector of per-image values, as an (n, 1, 1, 1) tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.numel() not in (1, n):
            raise ArgumentError(f"{name} must be a number or a tensor of {n} per-image values, got shape "
                                f"{tuple(value.shape)}")
        v = value.to(device=like.device, dtype=like.dtype).reshape(-1)
    else:
        v = torch.full((1,), real_in(name, value, 0.0), device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ArgumentError(f"{name} must be finite and >= 0, got {value!r}")
    return v.expand(n).reshape(n, 1, 1, 1)


def sharpen(x: Tensor, factor: float | Tensor, clamp: tuple[float, float] | None = None) -> Tensor:
    """Sharpness adjustment ``s + factor * (x - s)`` with ``s`` the 3x3-smoothed image (pcl-sr).

    x: (N, C, H, W) float; factor: >= 0, one number or N per-image values; clamp: an optional
    (low, high) value range. Border pixels of ``s`` are ``x`` itself (PIL / kornia semantics).
    """
    _check_batch("x", x)
    f = _per_image("factor", factor, x.shape[0], x)
    if clamp is not None and (len(clamp) != 2 or not clamp[0] < clamp[1]):
        raise ArgumentError(f"clamp must be None or a (low, high) pair with low < high, got {clamp!r}")
    n, c, h, w = x.shape
    s = x.clone()
    if h >= 3 and w >= 3:
        k = _SMOOTH.to(device=x.device, dtype=x.dtype).expand(c, 1, 3, 3)
        s[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    out = s + f * (x - s)
    return out.clamp(*clamp) if clamp is not None else out


def _gauss_kernels(sizes: Tensor, sigmas: Tensor, kmax: int, like: Tensor) -> Tensor:
    """(M, kmax) normalised 1-D Gaussians, each of its own odd size, zero-padded about the centre."""
    r = torch.arange(kmax, device=like.device, dtype=like.dtype) - kmax // 2
    g = torch.exp(-0.5 * (r[None] / sigmas[:, None]) ** 2)
    g = g * (r[None].abs() <= (sizes[:, None] // 2)).to(like.dtype)
    return g / g.sum(dim=1, keepdim=True)


def random_gaussian_blur(x: Tensor, ksizes: Sequence[int] = (3, 5, 7, 9, 11),
                         sigma: tuple[float, float] = (0.1, 2.0), generator: torch.Generator | None = None) -> Tensor:
    """Anisotropic Gaussian blur with a kernel drawn per image (pcl-sr's blurred hard negatives).

    Each image draws kx, ky from ``ksizes`` (odd) and sx, sy ~ U(sigma); the separable kernel is
    normalised (the image mean is kept up to border effects); borders are replicated.
    """
    _check_batch("x", x)
    optional_generator(generator)
    ks = list(ksizes) if not isinstance(ksizes, (str, bytes)) else []
    if not ks or not all(is_int(k, low=1) and k % 2 == 1 for k in ks):
        raise ArgumentError(f"ksizes must be a non-empty sequence of odd positive ints, got {ksizes!r}")
    if len(sigma) != 2 or not 0 < real_in("sigma[0]", sigma[0], 0.0, low_open=True) <= \
            real_in("sigma[1]", sigma[1], 0.0, low_open=True):
        raise ArgumentError(f"sigma must be a (low, high) pair with 0 < low <= high, got {sigma!r}")
    n, c, h, w = x.shape
    kmax = max(ks)
    choices = torch.tensor(ks)
    idx = torch.randint(len(ks), (2, n), generator=generator)
    sizes = choices[idx].to(x.device)
    sig = torch.rand(2, n, generator=generator, dtype=torch.float64) * (sigma[1] - sigma[0]) + sigma[0]
    sig = sig.to(device=x.device, dtype=x.dtype)
    gx = _gauss_kernels(sizes[0], sig[0], kmax, x).repeat_interleave(c, dim=0)  # (n*c, kmax)
    gy = _gauss_kernels(sizes[1], sig[1], kmax, x).repeat_interleave(c, dim=0)
    p = kmax // 2
    y = F.pad(x.reshape(1, n * c, h, w), (p, p, p, p), mode="replicate")
    y = F.conv2d(y, gx.reshape(n * c, 1, 1, kmax), groups=n * c)
    y = F.conv2d(y, gy.reshape(n * c, 1, kmax, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def upscale_factor(hr: Tensor, lr: Tensor) -> int:
    """The integer factor s with ``hr``'s size = s x ``lr``'s size; a clear error when there is none."""
    _check_batch("hr", hr)
    _check_batch("lr", lr)
    if hr.shape[:2] != lr.shape[:2]:
        raise ArgumentError(f"hr and lr must have the same batch size and channels, got {tuple(hr.shape)} and "
                            f"{tuple(lr.shape)}")
    (H, W), (h, w) = hr.shape[-2:], lr.shape[-2:]
    if H % h or W % w or H // h != W // w or H // h < 1:
        raise ArgumentError(f"scale factor: hr size {(H, W)} must be the same integer multiple of lr size {(h, w)} "
                            "in both dimensions")
    return H // h


def make_contrastive_samples(hr: Tensor, lr: Tensor, n_pos: int = 2, n_neg: int = 2,
                             sharp_range: tuple[float, float] = (0.5, 3.0), ksizes: Sequence[int] = (3, 5, 7, 9, 11),
                             sigma: tuple[float, float] = (0.1, 2.0), generator: torch.Generator | None = None
                             ) -> tuple[list[Tensor], list[Tensor]]:
    """PCL-SR's positives ``[hr, sharpen(hr, f_1..f_n_pos)]`` and negatives ``[bicubic_up(lr), blur_1..n_neg(hr)]``.

    f_j ~ U(sharp_range) per image; blur as :func:`random_gaussian_blur`. Computed without gradient.
    """
    n_pos, n_neg = nonneg_int("n_pos", n_pos), nonneg_int("n_neg", n_neg)
    upscale_factor(hr, lr)
    lo, hi = real_in("sharp_range[0]", sharp_range[0], 0.0), real_in("sharp_range[1]", sharp_range[1], 0.0)
    if hi < lo:
        raise ArgumentError(f"sharp_range must be a (low, high) pair with low <= high, got {sharp_range!r}")
    optional_generator(generator)
    with torch.no_grad():
        hr = hr.detach()
        pos = [hr]
        for _ in range(n_pos):
            f = torch.rand(hr.shape[0], generator=generator, dtype=torch.float64) * (hi - lo) + lo
            pos.append(sharpen(hr, f.to(hr.dtype)))
        neg = [F.interpolate(lr.detach(), size=hr.shape[-2:], mode="bicubic", align_corners=False)]
        neg += [random_gaussian_blur(hr, ksizes, sigma, generator) for _ in range(n_neg)]
    return pos, neg
