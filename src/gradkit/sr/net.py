"""A small residual super-resolution network with sub-pixel upsampling (paper slug: pcl-sr).

``G(lr) = bicubic_up(lr) + tail(body(head(lr)))``: conv3x3 C->w, ``blocks`` residual blocks
(conv-ReLU-conv + skip), conv3x3 w -> C*s^2 and PixelShuffle(s). It is the backbone PCL-SR fine-tunes
in gradkit's examples; any SR net works with :class:`gradkit.sr.pcl_loss.PCLLoss`.

Example::

    net = ResidualSR(in_channels=1, width=16, blocks=3, scale=2)
    net(torch.rand(4, 1, 16, 16)).shape    # (4, 1, 32, 32)
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import ArgumentError, choice, nonneg_int, positive_int

__all__ = ["ResidualSR", "SUPPORTED_SCALES"]

SUPPORTED_SCALES = (2, 3, 4)


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResidualSR(nn.Module):
    """Residual SR net ``bicubic_up(lr) + PixelShuffle(conv(blocks(conv(lr))))`` for scale 2, 3 or 4 (pcl-sr)."""

    def __init__(self, in_channels: int = 1, width: int = 16, blocks: int = 3, scale: int = 2) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.width = positive_int("width", width)
        nonneg_int("blocks", blocks)
        self.scale = choice("scale", scale, SUPPORTED_SCALES)
        self.head = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)])
        self.tail = nn.Sequential(nn.Conv2d(width, in_channels * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, lr: Tensor) -> Tensor:
        if lr.dim() != 4 or lr.shape[1] != self.in_channels:
            raise ArgumentError(f"lr must be an (N, {self.in_channels}, h, w) batch, got shape {tuple(lr.shape)}")
        up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.tail(self.body(self.head(lr)))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
