"""Exponential (geometric) decay of a loss weight over training (paper slug: ``local-reg-node``).

    w(step) = w_start * (w_end / w_start) ** (min(step, total) / total)

The official local-regularisation configs decay the regulariser's weight this way (e.g. 2.5 -> 1.0 over
the run). Example::

    >>> exp_decay_weight(0, 100, 2.5, 1.0), exp_decay_weight(100, 100, 2.5, 1.0)
    (2.5, 1.0)
    >>> loss = task_loss + exp_decay_weight(step, total_steps, 2.5, 1.0) * reg
"""
from __future__ import annotations

from .._validate import nonneg_int, positive, positive_int

__all__ = ["exp_decay_weight"]


def exp_decay_weight(step: int, total: int, w_start: float, w_end: float) -> float:
    """``w_start * (w_end / w_start) ** (min(step, total) / total)``: w_start at step 0, w_end from ``total`` on."""
    step = nonneg_int("step", step)
    total = positive_int("total", total)
    w_start = positive("w_start", w_start)
    w_end = positive("w_end", w_end)
    if step >= total:
        return w_end
    return w_start * (w_end / w_start) ** (step / total)
