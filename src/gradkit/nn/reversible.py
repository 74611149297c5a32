"""Reversible computation: blocks whose backward rebuilds their inputs from their outputs.

Shared core of the reversible papers (slugs ``revcol`` and ``rev-mbconv``). A *reversible step*
updates an ordered list of L states ``c_0..c_{L-1}`` given an optional external input ``x``::

    c_k_new = f_k(lower, upper) + alpha_k * c_k_old      k = 0, 1, ..., L-1 (in this order)
    lower   = c_{k-1}_new   (x for k = 0)               upper = c_{k+1}_old (None for k = L-1)

and is inverted top level first: ``c_k_old = (c_k_new - f_k(lower, upper)) / alpha_k``. RevNet's
additive coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` is the case L = 2, alpha = 1, no ``x``;
a RevCol column is L = 4 with learnable per-channel alphas. :class:`MultiLevelReversibleFunction`
runs a chain of steps under ``no_grad`` and saves only ``x`` and the last step's outputs; its
backward walks the chain backwards, recomputing each ``f_k`` once with grad enabled: the
recomputed value both inverts the step and gives the vector-Jacobian products. Dropout masks are
reproduced by replaying the RNG state captured before each ``f_k``; BatchNorm running statistics
are restored after each recomputation, so they are updated exactly once per forward.

Level functions must be ``nn.Module`` s called as ``f(lower, upper)`` whose parameters are
reachable through ``.parameters()``; they must not modify their inputs in place (checked: an
in-place change raises instead of silently corrupting the reconstruction). Tensors that require
grad but are neither inputs nor parameters of the level functions (closures) get no gradient.
Backward is once-differentiable (no double backward); autocast state is not replayed.

The chain machinery (:class:`ReversibleStep`, :class:`MultiLevelReversibleFunction`, :func:`run_steps`,
:func:`invert_steps`, :func:`bn_state_guard`) is defined in :mod:`gradkit.functional.reversible` and
re-exported here; this module holds the additive-coupling modules built on it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._validate import integer
from ..functional.reversible import (DriftMonitor, MultiLevelReversibleFunction, ReversibleStep, bn_state_guard,
                                     chain_tensors, collect_params, invert_steps, run_steps)

__all__ = [
    "ReversibleStep", "MultiLevelReversibleFunction", "run_steps", "invert_steps",
    "ReversibleBlock", "ReversibleSequential", "bn_state_guard", "collect_params", "DriftMonitor",
]


# ------------------------------------------------------------------------------ additive coupling
class _FLevel(nn.Module):
    """Level 0 of an additive coupling: ``F(upper)`` (F sees x2)."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, lower, upper):
        return self.f(upper)


class _GLevel(nn.Module):
    """Level 1 of an additive coupling: ``G(lower)`` (G sees y1)."""

    def __init__(self, g: nn.Module) -> None:
        super().__init__()
        self.g = g

    def forward(self, lower, upper):
        return self.g(lower)


class ReversibleBlock(nn.Module):
    """Additive coupling whose backward recomputes its input from its output (RevNet form).

    Paper slugs ``revcol`` / ``rev-mbconv``. With ``x = [x1, x2]`` split in halves along ``split_dim``:
    ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; inverse ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``.
    F and G must map a half to a tensor of the same shape and must not work in place.

    >>> blk = ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4), split_dim=-1)
    >>> x = torch.randn(2, 8, requires_grad=True); y = blk(x); y.sum().backward()
    >>> torch.allclose(blk.inverse(y.detach()), x.detach(), atol=1e-6)
    True
    """

    def __init__(self, f: nn.Module, g: nn.Module, split_dim: int = 1, *, reversible: bool = True,
                 preserve_rng: bool = True) -> None:
        super().__init__()
        for name, m in (("f", f), ("g", g)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        self.f_level, self.g_level = _FLevel(f), _GLevel(g)
        self.split_dim = integer("split_dim", split_dim)
        self.reversible = bool(reversible)
        self.preserve_rng = bool(preserve_rng)

    @property
    def f(self) -> nn.Module:
        return self.f_level.f

    @property
    def g(self) -> nn.Module:
        return self.g_level.g

    def step(self) -> ReversibleStep:
        return ReversibleStep([self.f_level, self.g_level], [1.0, 1.0])

    def forward(self, x: Tensor) -> Tensor:
        return _coupled_forward([self], x, self.split_dim, self.reversible, self.preserve_rng)

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        """The input that produced ``y`` (no grad)."""
        y1, y2 = _halves(y, self.split_dim)
        return torch.cat(invert_steps([self.step()], None, [y1, y2]), dim=self.split_dim)

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}, reversible={self.reversible}, preserve_rng={self.preserve_rng}"


def _halves(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"split_dim={dim} is out of range for an input with {x.dim()} dims")
    size = x.shape[dim]
    if size % 2:
        raise ValueError(f"a reversible coupling splits dim {dim} in two equal halves; it has odd size {size} "
                         f"(input shape {tuple(x.shape)})")
    a, b = x.chunk(2, dim=dim)
    return a, b


def _coupled_forward(blocks: Sequence[ReversibleBlock], x: Tensor, dim: int, reversible: bool,
                     preserve_rng: bool, monitor: DriftMonitor | None = None) -> Tensor:
    x1, x2 = _halves(x, dim)
    steps = [b.step() for b in blocks]
    tensors = chain_tensors(steps) if reversible and torch.is_grad_enabled() else None
    if tensors is not None and (x.requires_grad or any(p.requires_grad for p in tensors[1])):
        outs = MultiLevelReversibleFunction.run(steps, None, [x1, x2], preserve_rng=preserve_rng, monitor=monitor,
                                                tensors=tensors)
    else:
        outs = run_steps(steps, None, [x1, x2])
    return torch.cat(list(outs), dim=dim)


class ReversibleSequential(nn.Module):
    """A chain of :class:`ReversibleBlock` s that stores only the chain's output for backward.

    Paper slugs ``revcol`` / ``rev-mbconv``. Saved activation bytes do not grow with the number
    of blocks: backward inverts the blocks one by one (``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``).
    ``reversible=False`` runs the same blocks with plain autograd (the twin, a test oracle).
    ``drift_tol`` (default 1e-3, ``None``: off): backward compares the rebuilt input with a probe of the
    real one (``self.drift``); above it the chain warns that this call's gradients are inexact and
    stores activations (plain autograd) from the next call on, until ``self.drift.reset()``.

    >>> seq = ReversibleSequential(*[ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4), -1) for _ in range(3)])
    >>> y = seq(torch.randn(2, 8, requires_grad=True)); y.sum().backward()
    >>> seq.inverse(y.detach()).shape
    torch.Size([2, 8])
    """

    def __init__(self, *blocks: ReversibleBlock, reversible: bool = True, preserve_rng: bool = True,
                 drift_tol: float | None = 1e-3) -> None:
        super().__init__()
        if len(blocks) == 1 and isinstance(blocks[0], (list, tuple)):
            blocks = tuple(blocks[0])
        if not blocks:
            raise ValueError("ReversibleSequential needs at least one ReversibleBlock")
        for i, b in enumerate(blocks):
            if not isinstance(b, ReversibleBlock):
                raise TypeError(f"blocks[{i}] must be a ReversibleBlock, got {type(b).__name__}")
        dims = {b.split_dim for b in blocks}
        if len(dims) != 1:
            raise ValueError(f"all blocks must share one split_dim, got {sorted(dims)}")
        self.blocks = nn.ModuleList(blocks)
        self.split_dim = blocks[0].split_dim
        self.reversible = bool(reversible)
        self.preserve_rng = bool(preserve_rng)
        self.drift = None if drift_tol is None else DriftMonitor(drift_tol)

    def forward(self, x: Tensor) -> Tensor:
        rev = self.reversible and not (self.drift is not None and self.drift.tripped)
        return _coupled_forward(list(self.blocks), x, self.split_dim, rev, self.preserve_rng, self.drift)

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        """The input that produced ``y`` (no grad)."""
        y1, y2 = _halves(y, self.split_dim)
        return torch.cat(invert_steps([b.step() for b in self.blocks], None, [y1, y2]), dim=self.split_dim)

    def extra_repr(self) -> str:
        return f"blocks={len(self.blocks)}, reversible={self.reversible}, preserve_rng={self.preserve_rng}"
