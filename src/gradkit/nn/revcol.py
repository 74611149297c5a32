"""Reversible column networks (paper slug ``revcol``, Cai et al., ICLR 2023, arXiv 2212.11696).

N identical columns of L levels; between columns every level is a multi-level reversible unit::

    c_k^(i) = F_k(c_{k-1}^(i), c_{k+1}^(i-1)) + alpha_k * c_k^(i-1)     (c_{-1}^(i) = x, the stem output)

so backward rebuilds a column's inputs from its outputs
(``c_k^(i-1) = (c_k^(i) - F_k(...)) / alpha_k``, top level first) instead of storing them.
:class:`ReversibleColumnStack` is the generic stack (any level functions); :class:`RevColNet` the
paper's classifier (ConvNeXt blocks, Fusion = Down(lower) + Up(upper)) at any size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import positive_int, real_scalar
from ..functional.reversible import (DriftMonitor, MultiLevelReversibleFunction, ReversibleStep, invert_steps,
                                     run_steps)

__all__ = ["LayerNorm2d", "DropPath", "ConvNeXtBlock", "RevColLevel", "ReversibleColumnStack", "RevColNet"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an ``(N, C, H, W)`` tensor (channels-first)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (rescaled by 1/(1-p))."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        p = real_scalar("p", p, nonneg=True)
        if p >= 1:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dwconv kxk -> LN -> Linear(C,4C) -> GELU -> Linear(4C,C) -> gamma -> DropPath, + x."""

    def __init__(self, channels: int, kernel: int = 3, layer_scale: float = 1e-6, drop_path: float = 0.0,
                 expansion: int = 4) -> None:
        super().__init__()
        channels, kernel = positive_int("channels", channels), positive_int("kernel", kernel)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {kernel}")
        self.dwconv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1 = nn.Linear(channels, positive_int("expansion", expansion) * channels)
        self.pw2 = nn.Linear(expansion * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), real_scalar("layer_scale", layer_scale)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(self.norm(h)))) * self.gamma
        return x + self.drop_path(h.permute(0, 3, 1, 2))


class RevColLevel(nn.Module):
    """Level function ``F_k(a, b) = Blocks_k(Down_k(a) + Up_k(b))`` of a RevCol column.

    Down_0 = identity; Down_k = Conv2d(C_{k-1}, C_k, 2, stride 2) + LN. Up_k = 1x1 conv (per-pixel
    Linear C_{k+1} -> C_k) + LN + nearest upsample x2; absent on the top level and in the first column.
    """

    def __init__(self, level: int, channels: Sequence[int], blocks: int, *, first_column: bool,
                 kernel: int = 3, layer_scale: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= level < len(channels):
            raise ValueError(f"level must be in [0, {len(channels)}), got {level}")
        c = channels[level]
        self.level = level
        self.down = (nn.Identity() if level == 0 else
                     nn.Sequential(nn.Conv2d(channels[level - 1], c, 2, stride=2), LayerNorm2d(c)))
        self.up = None
        if not first_column and level < len(channels) - 1:
            self.up = nn.Sequential(nn.Conv2d(channels[level + 1], c, 1), LayerNorm2d(c))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(c, kernel, layer_scale, drop_path)
                                      for _ in range(positive_int("blocks", blocks))])

    def forward(self, lower: Tensor, upper: Tensor | None) -> Tensor:
        h = self.down(lower)
        if self.up is not None and upper is not None:
            u = F.interpolate(self.up(upper), size=h.shape[-2:], mode="nearest")
            h = h + u
        return self.blocks(h)


class _Column(nn.Module):
    def __init__(self, levels: Sequence[nn.Module], channels: Sequence[int], alpha_init: float | None) -> None:
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.alphas = None if alpha_init is None else nn.ParameterList(
            [nn.Parameter(torch.full((1, c, 1, 1), alpha_init)) for c in channels])

    def step(self) -> ReversibleStep:
        return ReversibleStep(list(self.levels), None if self.alphas is None else list(self.alphas))


class ReversibleColumnStack(nn.Module):
    """N columns joined level by level with reversible connections (paper slug ``revcol``).

    ``c_k^(i) = F_k(c_{k-1}^(i), c_{k+1}^(i-1)) + alpha_k * c_k^(i-1)``; the first column computes
    ``c_k^(1) = F_k(c_{k-1}^(1), None)``. ``make_level_fns(column, first_column) -> [F_0, ..., F_{L-1}]``
    builds one column's level modules (``F_k(lower, upper) -> tensor`` with ``channels[k]`` channels).
    ``reversible=True, strict=False``: one autograd Function per column saving x and its L outputs
    (the official code); ``strict=True``: one Function over all columns saving x and the last
    column's outputs only (memory flat in N). ``reversible=False``: plain autograd (the twin).
    Alphas are clamped to ``|alpha| >= alpha_min`` (sign kept) before every forward.
    ``drift_tol`` (default 1e-3, ``None`` turns the check off): backward measures how far the rebuilt
    activations drift (``self.drift``, a :class:`~gradkit.functional.reversible.DriftMonitor`); above it a
    strict stack warns, returns gradients recomputed from stored activations, and from then on saves
    each column's outputs (``strict=False``'s scheme) until ``self.drift.reset()``.

    >>> stack = ReversibleColumnStack(lambda i, first: [RevColLevel(k, [8, 16], 1, first_column=first)
    ...                                                 for k in range(2)], [8, 16], num_columns=4)
    >>> c = stack(torch.randn(2, 8, 8, 8, requires_grad=True)); [t.shape[1] for t in c]
    [8, 16]
    """

    def __init__(self, make_level_fns: Callable[[int, bool], Sequence[nn.Module]], channels: Sequence[int],
                 num_columns: int, *, alpha_init: float = 0.5, alpha_min: float = 1e-3,
                 reversible: bool = True, strict: bool = False, preserve_rng: bool = True,
                 drift_tol: float | None = 1e-3) -> None:
        super().__init__()
        if not callable(make_level_fns):
            raise TypeError(f"make_level_fns must be callable, got {type(make_level_fns).__name__}")
        channels = [positive_int(f"channels[{i}]", c) for i, c in enumerate(channels)]
        if not channels:
            raise ValueError("channels must name at least one level")
        num_columns = positive_int("num_columns", num_columns)
        alpha_init = real_scalar("alpha_init", alpha_init)
        self.alpha_min = real_scalar("alpha_min", alpha_min, nonneg=True)
        if self.alpha_min <= 0:
            raise ValueError(f"alpha_min must be > 0 (the inverse divides by alpha), got {alpha_min!r}")
        if abs(alpha_init) < self.alpha_min:
            raise ValueError(f"alpha_init must satisfy |alpha_init| >= alpha_min={self.alpha_min}, got {alpha_init}")
        cols = []
        for i in range(num_columns):
            levels = list(make_level_fns(i, i == 0))
            if len(levels) != len(channels):
                raise ValueError(f"make_level_fns({i}, {i == 0}) returned {len(levels)} level functions, "
                                 f"expected {len(channels)} (one per entry of channels)")
            for k, f in enumerate(levels):
                if not isinstance(f, nn.Module):
                    raise TypeError(f"level function {k} of column {i} must be an nn.Module, got {type(f).__name__}")
            cols.append(_Column(levels, channels, None if i == 0 else alpha_init))
        self.columns = nn.ModuleList(cols)
        self.channels = tuple(channels)
        self.reversible = bool(reversible)
        self.strict = bool(strict)
        self.preserve_rng = bool(preserve_rng)
        self.drift = None if drift_tol is None else DriftMonitor(drift_tol)

    @torch.no_grad()
    def clamp_alphas_(self) -> None:
        """Clamp every alpha to ``|alpha| >= alpha_min`` in place, keeping its sign (0 -> +alpha_min)."""
        for col in self.columns:
            if col.alphas is not None:
                for a in col.alphas:
                    sign = torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a))
                    a.copy_(sign * a.abs().clamp_min(self.alpha_min))

    def steps(self) -> list[ReversibleStep]:
        return [c.step() for c in self.columns]

    def forward(self, x: Tensor) -> list[Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[1] != self.channels[0]:
            raise ValueError(f"x must have {self.channels[0]} channels (dim 1) = channels[0], got shape "
                             f"{tuple(x.shape)}")
        self.clamp_alphas_()
        steps = self.steps()
        nlev = len(self.channels)
        if not (self.reversible and torch.is_grad_enabled()):
            return run_steps(steps, x, [None] * nlev)
        if self.strict and not (self.drift is not None and self.drift.tripped):
            return list(MultiLevelReversibleFunction.run(steps, x, [None] * nlev, preserve_rng=self.preserve_rng,
                                                         monitor=self.drift))
        states: list[Tensor | None] = [None] * nlev
        for st in steps:
            states = list(MultiLevelReversibleFunction.run([st], x, states, preserve_rng=self.preserve_rng,
                                                           monitor=self.drift))
        return states  # type: ignore[return-value]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, outputs: Sequence[Tensor], columns: int | None = None) -> list[Tensor]:
        """Invert the last ``columns`` columns (default: all but the first): the states they received."""
        n = len(self.columns) - 1 if columns is None else columns
        if not 0 <= n < len(self.columns):
            raise ValueError(f"columns must be in [0, {len(self.columns) - 1}], got {columns}")
        if n == 0:
            return list(outputs)
        return invert_steps(self.steps()[len(self.columns) - n:], x, outputs)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_columns={len(self.columns)}, reversible={self.reversible}, "
                f"strict={self.strict}, alpha_min={self.alpha_min}")


class RevColNet(nn.Module):
    """RevCol classifier: stem -> :class:`ReversibleColumnStack` of :class:`RevColLevel` s -> head on c_top.

    Paper slug ``revcol``. Stem: Conv2d(in, C_0, s, stride s) + LN; head: global average pool of the
    top level -> LN -> Linear. Paper sizes: RevCol-T channels (64,128,256,512), blocks (2,2,4,2),
    4 columns, stem 4. Intermediate supervision heads are not included.

    >>> net = RevColNet(1, 10, channels=(8, 16, 32, 64), blocks=(1, 1, 1, 1), num_columns=4, stem=2)
    >>> net(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, *,
                 channels: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 4, 2), num_columns: int = 4, stem: int = 4, kernel: int = 3,
                 layer_scale: float = 1e-6, drop_path: float = 0.0, alpha_init: float = 0.5,
                 reversible: bool = True, strict: bool = False, preserve_rng: bool = True,
                 drift_tol: float | None = 1e-3) -> None:
        super().__init__()
        channels, blocks = list(channels), list(blocks)
        if len(channels) != len(blocks):
            raise ValueError(f"channels and blocks must have one entry per level, got {len(channels)} and "
                             f"{len(blocks)}")
        self.stem = nn.Sequential(nn.Conv2d(positive_int("in_channels", in_channels), channels[0],
                                            positive_int("stem", stem), stride=stem), LayerNorm2d(channels[0]))

        def make(i: int, first: bool) -> list[nn.Module]:
            return [RevColLevel(k, channels, blocks[k], first_column=first, kernel=kernel,
                                layer_scale=layer_scale, drop_path=drop_path) for k in range(len(channels))]

        self.columns = ReversibleColumnStack(make, channels, num_columns, alpha_init=alpha_init,
                                             reversible=reversible, strict=strict, preserve_rng=preserve_rng,
                                             drift_tol=drift_tol)
        self.head_norm = nn.LayerNorm(channels[-1])
        self.head = nn.Linear(channels[-1], positive_int("num_classes", num_classes))

    @property
    def reversible(self) -> bool:
        return self.columns.reversible

    @reversible.setter
    def reversible(self, value: bool) -> None:
        self.columns.reversible = bool(value)

    def features(self, x: Tensor) -> list[Tensor]:
        return self.columns(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        top = self.features(x)[-1]
        return self.head(self.head_norm(top.mean(dim=(-2, -1))))
