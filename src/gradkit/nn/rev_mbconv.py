"""Reversible mobile inverted bottleneck (MBConv) blocks and a 3D U-Net built from them.

Paper slug ``rev-mbconv`` (Pendse et al., "Memory Efficient 3D U-Net with Reversible Mobile
Inverted Bottlenecks for Brain Tumor Segmentation", arXiv 2104.09648). A block splits its C
channels in halves and applies RevNet's additive coupling with two MBConv functions on C/2
channels::

    y1 = x1 + F(x2),  y2 = x2 + G(y1)          (inverse: x2 = y2 - G(y1), x1 = y1 - F(x2))
    F(u) = Norm(Conv1x1(Act(Norm(DWConv3x3x3(Act(Norm(Conv1x1(u))))))))   (C/2 -> e*C/2 -> C/2)

The coupling itself is :class:`gradkit.nn.reversible.ReversibleBlock`; a stage of blocks is a
:class:`gradkit.nn.reversible.ReversibleSequential` (one autograd Function per stage, only the
stage's output saved). ``reversible=False`` gives the non-reversible twin: the same functions and
weights run with plain autograd.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validate import choice, integer
from .reversible import ReversibleBlock, ReversibleSequential

__all__ = ["MBConv3d", "MBConv2d", "RevMBConv3d", "RevMBConv2d", "rev_mbconv_stage", "RevMBConvUNet3d"]

_NORMS = ("group", "instance", "batch", "none")
_ACTS = ("silu", "relu6", "relu")


def _norm(kind: str, c: int, dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(c, 4), c)
    if kind == "instance":
        return nn.GroupNorm(c, c)
    if kind == "batch":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(c)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu6": nn.ReLU6, "relu": nn.ReLU}[kind](inplace=False)


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, dims: int, reduction: int = 4) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        hidden = max(1, c // reduction)
        self.dims = dims
        self.reduce, self.expand = conv(c, hidden, 1), conv(hidden, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.nn.functional.silu(self.reduce(s))))


class MBConv3d(nn.Module):
    """Mobile inverted bottleneck residual *function* (no skip inside; the coupling adds it).

    Paper slug ``rev-mbconv``. ``F(u) = Norm(Conv1x1(Act(Norm(DWConv_k(Act(Norm(Conv1x1(u))))))))``,
    channels ``C -> e*C -> e*C -> C`` (optional squeeze-excitation after the depthwise conv).

    >>> f = MBConv3d(8, expansion=4)
    >>> f(torch.randn(1, 8, 4, 4, 4)).shape
    torch.Size([1, 8, 4, 4, 4])
    """

    dims = 3

    def __init__(self, channels: int, expansion: int = 4, kernel: int = 3, norm: str = "group",
                 act: str = "silu", se: bool = False) -> None:
        super().__init__()
        channels = integer("channels", channels, low=1)
        expansion = integer("expansion", expansion, low=1)
        kernel = integer("kernel", kernel, low=1)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same-size depthwise conv), got {kernel}")
        choice("norm", norm, _NORMS)
        choice("act", act, _ACTS)
        conv = nn.Conv3d if self.dims == 3 else nn.Conv2d
        hid = channels * expansion
        layers: list[nn.Module] = [
            conv(channels, hid, 1, bias=False), _norm(norm, hid, self.dims), _act(act),
            conv(hid, hid, kernel, padding=kernel // 2, groups=hid, bias=False), _norm(norm, hid, self.dims),
            _act(act)]
        if se:
            layers.append(_SqueezeExcite(hid, self.dims))
        layers += [conv(hid, channels, 1, bias=False), _norm(norm, channels, self.dims)]
        self.body = nn.Sequential(*layers)
        self.channels, self.expansion = channels, expansion

    def forward(self, u: Tensor) -> Tensor:
        if u.dim() != self.dims + 2 or u.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects input (N, {self.channels}, "
                             f"{', '.join('*' * self.dims)}), got shape {tuple(u.shape)}")
        return self.body(u)


class MBConv2d(MBConv3d):
    """2D :class:`MBConv3d` (paper slug ``rev-mbconv``), input ``(N, C, H, W)``.

    >>> MBConv2d(4)(torch.randn(2, 4, 5, 5)).shape
    torch.Size([2, 4, 5, 5])
    """

    dims = 2


class RevMBConv3d(ReversibleBlock):
    """Reversible MBConv block: additive coupling of two :class:`MBConv3d` on C/2 channels each.

    Paper slug ``rev-mbconv``. ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; backward rebuilds x from y.
    ``channels`` must be even. ``reversible=False``: same math with plain autograd (the twin).

    >>> blk = RevMBConv3d(8)
    >>> y = blk(torch.randn(1, 8, 4, 4, 4, requires_grad=True)); y.sum().backward()
    >>> blk.inverse(y.detach()).shape
    torch.Size([1, 8, 4, 4, 4])
    """

    _fn = MBConv3d

    def __init__(self, channels: int, expansion: int = 4, kernel: int = 3, norm: str = "group",
                 act: str = "silu", se: bool = False, *, reversible: bool = True) -> None:
        channels = integer("channels", channels, low=2)
        if channels % 2:
            raise ValueError(f"channels must be even (the coupling splits them in two halves), got {channels}")
        h = channels // 2
        super().__init__(self._fn(h, expansion, kernel, norm, act, se), self._fn(h, expansion, kernel, norm, act, se),
                         split_dim=1, reversible=reversible)
        self.channels = channels


class RevMBConv2d(RevMBConv3d):
    """2D :class:`RevMBConv3d` (paper slug ``rev-mbconv``).

    >>> RevMBConv2d(4)(torch.randn(2, 4, 5, 5)).shape
    torch.Size([2, 4, 5, 5])
    """

    _fn = MBConv2d


def rev_mbconv_stage(channels: int, blocks: int, *, reversible: bool = True, dims: int = 3,
                     **mbconv) -> ReversibleSequential:
    """A stage of ``blocks`` reversible MBConv blocks that saves only its output (paper ``rev-mbconv``).

    >>> st = rev_mbconv_stage(8, 3)
    >>> st(torch.randn(1, 8, 4, 4, 4)).shape
    torch.Size([1, 8, 4, 4, 4])
    """
    blocks = integer("blocks", blocks, low=1)
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    cls = RevMBConv3d if dims == 3 else RevMBConv2d
    return ReversibleSequential(*[cls(channels, **mbconv) for _ in range(blocks)], reversible=reversible)


class RevMBConvUNet3d(nn.Module):
    """3D U-Net whose encoder/decoder stages are reversible MBConv stages (paper slug ``rev-mbconv``).

    Level l has ``width * 2**l`` channels. Encoder: stem Conv3x3 (level 0) or strided Conv2 (l > 0),
    then a stage of ``blocks`` RevMBConv3d. Decoder: ConvTranspose2 up, concat skip, Conv1x1 to fix
    channels, stage. Head: Conv1x1 to ``num_classes`` logits. Stem, strided/transposed convs, skips and
    head are not reversible and store their activations. ``reversible=False``: the twin (same weights).
    Spatial sizes must be divisible by ``2**(levels-1)``.

    >>> net = RevMBConvUNet3d(4, 3, width=8, levels=2, blocks=2)
    >>> net(torch.randn(1, 4, 8, 8, 8)).shape
    torch.Size([1, 3, 8, 8, 8])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, levels: int = 3, blocks: int = 1,
                 *, reversible: bool = True, expansion: int = 4, kernel: int = 3, norm: str = "group",
                 act: str = "silu", se: bool = False) -> None:
        super().__init__()
        in_channels = integer("in_channels", in_channels, low=1)
        num_classes = integer("num_classes", num_classes, low=1)
        width = integer("width", width, low=2)
        if width % 2:
            raise ValueError(f"width must be even (reversible blocks split channels in halves), got {width}")
        levels = integer("levels", levels, low=1)
        blocks = integer("blocks", blocks, low=1)
        kw = dict(expansion=expansion, kernel=kernel, norm=norm, act=act, se=se)
        ch = [width * 2 ** lvl for lvl in range(levels)]
        self.levels, self.blocks, self.channels = levels, blocks, ch
        self.stem = nn.Conv3d(in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList([nn.Conv3d(ch[lvl - 1], ch[lvl], 2, stride=2) for lvl in range(1, levels)])
        self.enc = nn.ModuleList([rev_mbconv_stage(c, blocks, **kw) for c in ch])
        self.up = nn.ModuleList([nn.ConvTranspose3d(ch[lvl], ch[lvl - 1], 2, stride=2)
                                 for lvl in range(1, levels)])
        self.fuse = nn.ModuleList([nn.Conv3d(2 * ch[lvl - 1], ch[lvl - 1], 1) for lvl in range(1, levels)])
        self.dec = nn.ModuleList([rev_mbconv_stage(ch[lvl - 1], blocks, **kw) for lvl in range(1, levels)])
        self.head = nn.Conv3d(ch[0], num_classes, 1)
        self.reversible = reversible

    @property
    def reversible(self) -> bool:
        return self._reversible

    @reversible.setter
    def reversible(self, value: bool) -> None:
        self._reversible = bool(value)
        for st in [*self.enc, *self.dec]:
            st.reversible = self._reversible

    def forward(self, x: Tensor) -> Tensor:
        f = 2 ** (self.levels - 1)
        if x.dim() != 5 or any(s % f for s in x.shape[2:]):
            raise ValueError(f"RevMBConvUNet3d expects (N, C, D, H, W) with D, H, W divisible by {f}, "
                             f"got shape {tuple(x.shape)}")
        h = self.enc[0](self.stem(x))
        skips = [h]
        for lvl in range(1, self.levels):
            h = self.enc[lvl](self.down[lvl - 1](h))
            skips.append(h)
        for lvl in reversed(range(1, self.levels)):
            h = self.up[lvl - 1](h)
            h = self.fuse[lvl - 1](torch.cat([h, skips[lvl - 1]], dim=1))
            h = self.dec[lvl - 1](h)
        return self.head(h)
