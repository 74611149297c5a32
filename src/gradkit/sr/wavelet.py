"""One-level orthonormal Haar wavelet transform and its high-pass subbands (paper slug: pcl-sr).

PCL-SR's embedding network looks at the high frequencies of an image only: the LH, HL and HH subbands
of a one-level Haar transform. For a 2x2 block ``[[a, b], [c, d]]`` of each channel::

    LL = (a + b + c + d) / 2      LH = (a + b - c - d) / 2
    HL = (a - b + c - d) / 2      HH = (a - b - c + d) / 2

The transform is orthonormal, so ``haar_idwt(*haar_dwt(x)) == x``.

Example::

    x = torch.rand(2, 3, 32, 32)
    hf = HaarHighPass()(x)            # (2, 9, 16, 16): LH, HL, HH of every channel
    ll, lh, hl, hh = haar_dwt(x); assert torch.allclose(haar_idwt(ll, lh, hl, hh), x, atol=1e-6)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, tensor

__all__ = ["haar_dwt", "haar_idwt", "HaarHighPass"]


def _check_image(name: str, x: Tensor) -> Tensor:
    tensor(name, x, floating=True)
    if x.dim() != 4:
        raise ArgumentError(f"{name} must be a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ArgumentError(f"{name} must have an even height and width for the Haar transform, got "
                            f"{tuple(x.shape[-2:])}")
    return x


def haar_dwt(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(LL, LH, HL, HH)``, each (N, C, H/2, W/2), of an (N, C, H, W) batch with even H and W."""
    _check_image("x", x)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return ((a + b + c + d) * 0.5, (a + b - c - d) * 0.5, (a - b + c - d) * 0.5, (a - b - c + d) * 0.5)


def haar_idwt(ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
    """The inverse of :func:`haar_dwt`: four (N, C, h, w) subbands -> the (N, C, 2h, 2w) image."""
    for name, t in (("ll", ll), ("lh", lh), ("hl", hl), ("hh", hh)):
        tensor(name, t, floating=True)
        if t.shape != ll.shape or t.dim() != 4:
            raise ArgumentError(f"{name} must be a 4-D tensor of the shape of ll {tuple(ll.shape)}, got "
                                f"{tuple(t.shape)}")
    n, c, h, w = ll.shape
    out = ll.new_empty(n, c, 2 * h, 2 * w)
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) * 0.5
    out[..., 0::2, 1::2] = (ll + lh - hl - hh) * 0.5
    out[..., 1::2, 0::2] = (ll - lh + hl - hh) * 0.5
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) * 0.5
    return out


class HaarHighPass(nn.Module):
    """The Haar high-pass subbands ``cat([LH, HL, HH], dim=1)``: (N, C, H, W) -> (N, 3C, H/2, W/2).

    Paper slug: pcl-sr. No parameters; zero on constant images. See :func:`haar_dwt` for the filters.
    Example: ``HaarHighPass()(torch.rand(4, 1, 32, 32)).shape == (4, 3, 16, 16)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        _, lh, hl, hh = haar_dwt(x)
        return torch.cat([lh, hl, hh], dim=1)
