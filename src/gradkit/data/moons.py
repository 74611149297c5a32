"""Inter-twinning moons with a rotated target domain: DANN's toy problem (paper slug: ``dann``).

The construction of the authors' ``experiments_moons.py`` (Ganin et al., JMLR 2016, Sec. 5.1.1):
source = ``make_moons(n, noise)`` (random state 1), target = another draw (random state 2); both are
translated by minus the source mean and scaled by 2, then the target is rotated by ``theta`` degrees
(counter-clockwise) about the origin::

    x_src = 2 (m_1 - mean(m_1))      x_tgt = R(theta) 2 (m_2 - mean(m_1))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import integer, real_scalar

__all__ = ["DomainShift", "make_moons_domains"]


@dataclass(frozen=True)
class DomainShift:
    """Labelled source and target samples (float32 inputs, int64 labels).

    Target labels are for evaluation only: unsupervised adaptation never trains on them.
    """

    x_source: torch.Tensor
    y_source: torch.Tensor
    x_target: torch.Tensor
    y_target: torch.Tensor
    name: str = ""


def make_moons_domains(n: int = 150, noise: float = 0.05, theta: float = 35.0,
                       source_state: int = 1, target_state: int = 2,
                       n_target: int | None = None) -> DomainShift:
    """Source moons and target moons rotated by ``theta`` degrees, as in the DANN paper's toy task.

    Paper slug: ``dann``. Defaults are the official script's (150 points per domain, noise 0.05,
    35 degrees). ``n_target`` (default ``n``) target points are drawn. Use another
    ``target_state`` (and any ``n_target``) to draw fresh target points from the same shifted
    distribution, e.g. a held-out target test set: the shift depends on the source draw only.

    Example::

        >>> d = make_moons_domains()
        >>> d.x_source.shape, d.x_target.shape
        (torch.Size([150, 2]), torch.Size([150, 2]))
    """
    from sklearn.datasets import make_moons

    n = integer("n", n, low=2)
    n_target = n if n_target is None else integer("n_target", n_target, low=2)
    noise = real_scalar("noise", noise, nonneg=True, tensor_ok=False)
    theta = real_scalar("theta", theta, tensor_ok=False)  # degrees
    xs, ys = make_moons(n, noise=noise, random_state=source_state)
    xt, yt = make_moons(n_target, noise=noise, random_state=target_state)
    shift = -xs.mean(axis=0)
    xs = 2.0 * (xs + shift)
    xt = 2.0 * (xt + shift)
    a = math.radians(theta)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    xt = xt @ rot.T
    return DomainShift(
        torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.int64),
        torch.tensor(xt, dtype=torch.float32), torch.tensor(yt, dtype=torch.int64),
        name=f"moons(theta={theta:g})",
    )
