"""Procedural data with a planted opposing signal: a large feature shared by small groups of both classes.

Paper slug: ``opposing-signals`` (Rosenfeld & Risteski, ICLR 2024, arXiv 2311.04163), whose toy model has a
small label-determining signal plus a large-magnitude coordinate present in a small subset of both
classes. Balanced labels ``y in {0, 1}``::

    x[:, :d]  ~ N((2y - 1) * mu * 1, I)                       (the core signal)
    x[:, d]   = amplitude on n_outliers random points of class 1 (group A) and of class 0 (group B), else 0

Example::

    ds = opposing_signal_data(n=1000, d=20, amplitude=15.0, n_outliers=20, seed=0)
    ds.x.shape, ds.idx_a, ds.idx_b            # (1000, 21); the planted groups (y = 1 and y = 0)
    control = ds.without_feature()            # the same points with x[:, d] = 0
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .._validate import nonneg_int, positive_int, real_scalar

__all__ = ["OpposingSignalData", "opposing_signal_data"]


@dataclass(frozen=True)
class OpposingSignalData:
    """Inputs ``x (n, d + 1)``, labels ``y (n,)`` as float 0/1, and the planted groups' indices.

    ``idx_a``: outliers with ``y = 1``; ``idx_b``: outliers with ``y = 0``; the last column of ``x`` is the
    opposing feature.
    """

    x: Tensor
    y: Tensor
    idx_a: Tensor
    idx_b: Tensor

    @property
    def outliers(self) -> Tensor:
        """Both planted groups, A then B."""
        return torch.cat([self.idx_a, self.idx_b])

    def without_feature(self) -> "OpposingSignalData":
        """The same data with the opposing feature set to 0 everywhere (the control); indices kept."""
        x = self.x.clone()
        x[:, -1] = 0
        return replace(self, x=x)


def opposing_signal_data(n: int = 1000, d: int = 20, amplitude: float = 15.0, n_outliers: int = 20,
                         mu: float = 0.3, seed: int = 0) -> OpposingSignalData:
    """Balanced binary data with a planted opposing feature (see the module docstring); float32, CPU.

    Example::

        >>> ds = opposing_signal_data(n=200, n_outliers=4, seed=1)
        >>> float(ds.x[ds.outliers, -1].min()), int(ds.y[ds.idx_a].sum()), int(ds.y[ds.idx_b].sum())
        (15.0, 4, 0)
    """
    n = positive_int("n", n)
    if n < 2:
        raise ValueError(f"n must be >= 2 (both classes), got {n}")
    d = positive_int("d", d)
    amplitude = real_scalar("amplitude", amplitude, tensor_ok=False)
    n_outliers = nonneg_int("n_outliers", n_outliers)
    if n_outliers > n // 2:
        raise ValueError(f"n_outliers must be <= n // 2 = {n // 2} (the size of class 0), got {n_outliers}")
    mu = real_scalar("mu", mu, tensor_ok=False)
    g = torch.Generator().manual_seed(nonneg_int("seed", seed))
    y = torch.zeros(n)
    y[torch.randperm(n, generator=g)[: n - n // 2]] = 1.0
    x = torch.randn(n, d + 1, generator=g)
    x[:, :d] += ((2 * y - 1) * mu)[:, None]
    x[:, d] = 0.0
    ones, zeros = (y == 1).nonzero().flatten(), (y == 0).nonzero().flatten()
    a = ones[torch.randperm(len(ones), generator=g)[:n_outliers]].sort().values
    b = zeros[torch.randperm(len(zeros), generator=g)[:n_outliers]].sort().values
    x[a, d] = amplitude
    x[b, d] = amplitude
    return OpposingSignalData(x, y, a, b)
