"""PCL-SR's embedding network: a patch discriminator on Haar high-pass subbands (paper slug: pcl-sr).

``phi(x) = head(blocks(HaarHighPass(x)))``: the LH, HL, HH subbands (3C channels) go through
conv3x3 (no bias) -> BatchNorm -> LeakyReLU(0.2) blocks (default widths 64-64-128-128-256-256-512-512,
strides 1-2-1-2-...), then AdaptiveAvgPool(patch) -> 1x1 conv gives patch*patch logits per image. The
contrastive loss reads the blocks' outputs before their activation (``return_features=True``).

Example::

    phi = WaveletPatchEmbedder(1, widths=(16, 16, 32, 32))
    logits, feats = phi(torch.rand(4, 1, 32, 32), return_features=True)   # (4, 16), 4 feature maps
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, is_int, positive_int, real_in
from .wavelet import HaarHighPass

__all__ = ["WaveletPatchEmbedder"]


class WaveletPatchEmbedder(nn.Module):
    """Haar high-pass -> conv/BN/LeakyReLU blocks -> patch logits; optionally the pre-activation features.

    Paper slug: pcl-sr. in_ch: image channels C; widths: one entry per block; strides: one per block
    (default 1, 2, 1, 2, ...); patch: the head's pooled grid (patch*patch logits per image).
    ``forward(x)`` returns (N, patch*patch) logits, or ``(logits, [features])`` with ``return_features``.
    """

    def __init__(self, in_ch: int, widths: Sequence[int] = (64, 64, 128, 128, 256, 256, 512, 512),
                 strides: Sequence[int] | None = None, patch: int = 4, negative_slope: float = 0.2,
                 return_features: bool = False) -> None:
        super().__init__()
        positive_int("in_ch", in_ch)
        widths = tuple(widths)
        if not widths or not all(is_int(w, low=1) for w in widths):
            raise ArgumentError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        strides = tuple(strides) if strides is not None else tuple(1 + i % 2 for i in range(len(widths)))
        if len(strides) != len(widths) or not all(is_int(s, low=1) for s in strides):
            raise ArgumentError(f"strides must hold {len(widths)} positive ints (one per width), got {strides!r}")
        self.patch = positive_int("patch", patch)
        self.return_features = boolean("return_features", return_features)
        slope = real_in("negative_slope", negative_slope, 0.0)
        self.highpass = HaarHighPass()
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        c = 3 * in_ch
        for w, s in zip(widths, strides):
            self.convs.append(nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False))
            self.norms.append(nn.BatchNorm2d(w))
            c = w
        self.act = nn.LeakyReLU(slope)
        self.pool = nn.AdaptiveAvgPool2d(self.patch)
        self.head = nn.Conv2d(c, 1, 1)
        self.in_ch = in_ch

    def forward(self, x: Tensor, return_features: bool | None = None):
        if x.dim() != 4 or x.shape[1] != self.in_ch:
            raise ArgumentError(f"x must be an (N, {self.in_ch}, H, W) batch, got shape {tuple(x.shape)}")
        want = self.return_features if return_features is None else boolean("return_features", return_features)
        h = self.highpass(x)
        feats: list[Tensor] = []
        for conv, norm in zip(self.convs, self.norms):
            h = norm(conv(h))
            feats.append(h)
            h = self.act(h)
        logits = torch.flatten(self.head(self.pool(h)), 1)
        return (logits, feats) if want else logits

    def extra_repr(self) -> str:
        return f"in_ch={self.in_ch}, blocks={len(self.convs)}, patch={self.patch}"
