"""DANN's adaptation-factor and learning-rate schedules (paper slug: ``dann``).

Ganin et al., JMLR 2016, Sec. 5.2 (all deep experiments), with ``p`` the training progress in
[0, 1] (iterations done / total)::

    lambda_p = 2 / (1 + exp(-gamma p)) - 1            gamma = 10
    mu_p     = mu_0 / (1 + alpha p)^beta               mu_0 = 0.01, alpha = 10, beta = 0.75

With ``torch.optim.lr_scheduler.LambdaLR`` the learning-rate schedule is a multiplier of the
optimizer's ``lr`` (set ``lr=mu_0``)::

    sched = LambdaLR(opt, dann_lr_lambda(total_steps))   # == dann_lr(min(s/total, 1), lr0=1.0)
    ...; opt.step(); sched.step()                         # once per step
"""
from __future__ import annotations

import math
from typing import Callable

from .._validate import positive_int, real_scalar

__all__ = ["dann_lambda", "dann_lr", "dann_lr_lambda"]


def _progress(progress: object) -> float:
    p = real_scalar("progress", progress)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (iterations done / total), got {progress!r}")
    return p


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Adaptation factor ``2 / (1 + exp(-gamma p)) - 1``: 0 at p = 0, ~1 at p = 1 (slug ``dann``).

    Example::

        >>> dann_lambda(0.0), round(dann_lambda(1.0), 4)
        (0.0, 0.9999)
        >>> grl.lambda_ = dann_lambda(step / total_steps)
    """
    p = _progress(progress)
    g = real_scalar("gamma", gamma)
    if g <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    return 2.0 / (1.0 + math.exp(-g * p)) - 1.0


def dann_lr(progress: float, lr0: float = 0.01, alpha: float = 10.0, beta: float = 0.75) -> float:
    """Annealed learning rate ``lr0 / (1 + alpha p)^beta`` (paper slug: ``dann``).

    With ``lr0=1.0`` it is the multiplier that ``LambdaLR`` wants (see :func:`dann_lr_lambda`).

    Example::

        >>> dann_lr(0.0)
        0.01
        >>> for g in opt.param_groups: g["lr"] = dann_lr(step / total_steps)
    """
    p = _progress(progress)
    lr0 = real_scalar("lr0", lr0)
    alpha = real_scalar("alpha", alpha)
    beta = real_scalar("beta", beta)
    if lr0 <= 0:
        raise ValueError(f"lr0 must be > 0, got {lr0!r}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    return lr0 / (1.0 + alpha * p) ** beta


def dann_lr_lambda(total_steps: int, alpha: float = 10.0, beta: float = 0.75) -> Callable[[int], float]:
    """``step -> 1 / (1 + alpha min(step/total_steps, 1))^beta``, the multiplier for ``LambdaLR``.

    Example::

        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, dann_lr_lambda(total_steps))
        >>> # call sched.step() after every opt.step()
    """
    total_steps = positive_int("total_steps", total_steps)
    dann_lr(0.0, 1.0, alpha, beta)  # validate alpha and beta now

    def multiplier(step: int) -> float:
        return dann_lr(min(max(step, 0) / total_steps, 1.0), 1.0, alpha, beta)

    return multiplier
