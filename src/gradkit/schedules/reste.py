"""ReSTE's schedule of the estimator power ``o`` over training (paper slug: ``reste``)."""
from __future__ import annotations

import math

from .._validate import real_scalar

__all__ = ["reste_power"]


def reste_power(progress: float, o_end: float = 3.0) -> float:
    """ReSTE's cosine-shaped power schedule: o grows from 1 at the start to ``o_end`` at the end.

    Paper slug: reste. Equation (official code, progress = epoch / epochs):
    o = 1 + (o_end - 1) * (1 - cos(pi/2 * progress)).

    >>> reste_power(0.0), reste_power(1.0)
    (1.0, 3.0)
    >>> round(reste_power(0.5, o_end=5.0), 4)
    2.1716
    """
    progress = real_scalar("progress", progress)
    o_end = real_scalar("o_end", o_end)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if o_end < 1.0:
        raise ValueError(f"o_end must be >= 1, got {o_end}")
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(0.5 * math.pi * progress))
