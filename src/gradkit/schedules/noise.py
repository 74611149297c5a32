"""Annealed Gaussian gradient-noise schedule (gradient-noise, arXiv 1511.06807)."""
from __future__ import annotations

import math
from .._validate import real_scalar

__all__ = ["annealed_noise_std"]


def annealed_noise_std(t: int | float, eta: float, gamma: float = 0.55) -> float:
    """Standard deviation of the gradient noise at step ``t``.

    Paper: gradient-noise (Neelakantan et al., 2015). The noise *variance* decays as
    ``sigma_t^2 = eta / (1 + t)^gamma``, so this returns ``sigma_t = sqrt(eta / (1 + t)^gamma)``
    (not ``eta / (1 + t)^gamma``, a common bug). ``t`` counts optimizer updates from 0; the paper
    fixes ``gamma = 0.55`` and picks ``eta`` in {0.01, 0.3, 1.0}.

    Example::

        >>> from gradkit.schedules.noise import annealed_noise_std
        >>> round(annealed_noise_std(0, eta=0.01), 6)
        0.1
    """
    t = real_scalar("t", t, nonneg=True, tensor_ok=False)
    eta = real_scalar("eta", eta, nonneg=True, tensor_ok=False)
    gamma = real_scalar("gamma", gamma, nonneg=True, tensor_ok=False)
    return math.sqrt(eta / (1.0 + t) ** gamma)
