"""Activation patterns of ReLU hyperplanes on a data set (paper slug: convex-relu).

A direction ``h`` in input space induces the pattern ``D(h) = diag(1[X h >= 0])`` on the rows of ``X`` (n x d):
which examples a ReLU neuron with weights ``h`` lets through. The convex reformulation of a two-layer ReLU
network has one block of variables per distinct pattern; there are at most ``2 r (e (n - 1) / r)^r`` of them
(``r = rank X``), so they are either enumerated exactly (``d = 2``) or sampled::

    D_i = 1[X h_i >= 0],  h_i ~ N(0, I_d)          (sample_patterns: deduplicated, all-zero pattern dropped)

A pattern set is a ``BoolTensor`` of shape ``(P, n)``: row ``i`` is the diagonal of ``D_i``.

Example::

    X = torch.randn(10, 2, dtype=torch.float64)
    exact = enumerate_patterns_2d(X)                       # every pattern a line through 0 induces
    some = sample_patterns(X, 50, generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import math

import torch

from .. import _validate as V

__all__ = ["sample_patterns", "enumerate_patterns_2d", "check_patterns"]


def _data_matrix(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    V.tensor(name, X, floating=True, finite=True)
    if X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise V.ArgumentError(f"{name} must be a non-empty 2-D tensor (n examples x d features), got shape "
                              f"{tuple(X.shape)}")
    return X


def _distinct_nonzero(patterns: torch.Tensor) -> torch.Tensor:
    """Distinct rows of a bool (P, n) tensor, the all-zero row dropped (a neuron that is never active)."""
    rows = torch.unique(patterns, dim=0)
    return rows[rows.any(dim=1)]


def sample_patterns(X: torch.Tensor, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``1[X h_i >= 0]`` for ``n_samples`` directions ``h_i ~ N(0, I_d)``: distinct, non-zero rows (<= n_samples).

    Returns a ``BoolTensor`` of shape ``(P, n)`` on ``X``'s device (rows in a fixed sorted order).
    """
    X = _data_matrix(X)
    n_samples = V.positive_int("n_samples", n_samples)
    generator = V.optional_generator(generator)
    h = torch.randn(X.shape[1], n_samples, generator=generator, dtype=X.dtype)
    patterns = _distinct_nonzero((X @ h.to(X.device) >= 0).T)
    if patterns.shape[0] == 0:
        raise ValueError(f"sample_patterns: all {n_samples} sampled directions gave the all-zero pattern "
                         "(X is zero?); nothing to fit")
    return patterns


def enumerate_patterns_2d(X: torch.Tensor) -> torch.Tensor:
    """Every pattern a direction in the plane induces on ``X`` (n x 2): exact, distinct, non-zero.

    The sign of ``x_k . h`` changes only where ``h`` is orthogonal to ``x_k``: at the 2n angles
    ``atan2(x_k) +- pi/2``. Sorting them cuts the circle into arcs on which the pattern is constant;
    one direction per arc (its midpoint) gives every pattern. Zero rows are active for every ``h``.
    """
    X = _data_matrix(X)
    if X.shape[1] != 2:
        raise V.ArgumentError(f"X must have exactly 2 columns for enumerate_patterns_2d, got shape {tuple(X.shape)}"
                              " (use sample_patterns for d != 2)")
    Xd = X.detach().to(torch.float64)
    rows = Xd[Xd.abs().sum(1) > 0]
    if rows.shape[0] == 0:
        angles = torch.tensor([0.0], dtype=torch.float64, device=X.device)
    else:
        phi = torch.atan2(rows[:, 1], rows[:, 0])
        crit = torch.remainder(torch.cat([phi + math.pi / 2, phi - math.pi / 2]), 2 * math.pi).sort().values
        nxt = torch.cat([crit[1:], crit[:1] + 2 * math.pi])
        angles = 0.5 * (crit + nxt)
    h = torch.stack([torch.cos(angles), torch.sin(angles)])  # (2, arcs)
    patterns = _distinct_nonzero((Xd @ h >= 0).T)
    if patterns.shape[0] == 0:
        raise ValueError("enumerate_patterns_2d: X has no non-zero pattern")
    return patterns


def check_patterns(patterns: torch.Tensor, n: int, name: str = "patterns") -> torch.Tensor:
    """A pattern set as a ``BoolTensor (P, n)``; 0/1 tensors of another dtype are converted.

    Raises :class:`gradkit._validate.ArgumentError` naming the shape or values when it is not one.
    """
    V.tensor(name, patterns)
    if patterns.dim() != 2 or patterns.shape[1] != n or patterns.shape[0] < 1:
        raise V.ArgumentError(f"{name} must have shape (P, n) = (P >= 1, {n}) (one row per pattern, one column "
                              f"per example of X), got shape {tuple(patterns.shape)}")
    if patterns.dtype != torch.bool:
        if patterns.is_complex() or not bool(((patterns == 0) | (patterns == 1)).all()):
            raise V.ArgumentError(f"{name} must be a bool tensor or hold only 0 and 1, got dtype {patterns.dtype} "
                                  "with other values")
        patterns = patterns != 0
    return patterns
