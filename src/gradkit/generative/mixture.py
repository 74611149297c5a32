"""Isotropic Gaussian mixtures as exact diffusion teachers: sampling, the closed-form score and log-density of
the VP-noised mixture, and mode-coverage metrics (per-mode mass TV, mode recall, RBF MMD).

Paper slug: ``f-distill`` (an exact teacher, so that a distillation experiment measures distillation and not
teacher error). A mixture ``p_0 = sum_k w_k N(mu_k, s^2 I)`` noised by ``x_t = alpha_t x_0 + sigma_t eps`` stays
a mixture: ``p_t = sum_k w_k N(alpha_t mu_k, (alpha_t^2 s^2 + sigma_t^2) I)``, so with
``v = alpha_t^2 s^2 + sigma_t^2`` and ``gamma_k(x) = softmax_k(log w_k - |x - alpha_t mu_k|^2 / (2 v))``::

    grad_x log p_t(x) = sum_k gamma_k(x) (alpha_t mu_k - x) / v

>>> mix = GaussianMixture(ring_means(8, radius=4.0), torch.full((8,), 1 / 8), std=0.15)
>>> x = mix.sample(1000, generator=torch.Generator().manual_seed(0))
>>> s = mix.score(x, t=torch.full((1000,), 10), schedule=VPSchedule(num_timesteps=100))
>>> mode_coverage(x, mix.means, mix.weights)["tv"] < 0.05
True
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import ArgumentError, optional_generator, positive, positive_int, real_in, tensor
from .diffusion import VPSchedule

__all__ = ["GaussianMixture", "ring_means", "mode_coverage", "rbf_mmd"]


def ring_means(k: int, radius: float = 4.0) -> torch.Tensor:
    """``k`` points evenly spaced on a circle of ``radius`` in 2-D, shape ``(k, 2)``, the first at angle 0."""
    k = positive_int("k", k)
    radius = positive("radius", radius)
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], 1)


class GaussianMixture:
    """``sum_k w_k N(mu_k, std^2 I)`` with its exact VP-noised score and log-density (paper slug: f-distill).

    means: ``(K, D)``; weights: ``(K,)``, non-negative, normalised to sum to 1; std > 0. ``score(x_t, t,
    schedule)`` is ``grad log p_t(x_t)`` of the noised mixture (``t=None``: the clean mixture, ``alpha = 1``,
    ``sigma = 0``); ``log_prob`` is ``log p_t(x_t)``. Results take ``x_t``'s dtype and device.

    >>> mix = GaussianMixture(torch.zeros(1, 2), torch.ones(1), std=1.0)
    >>> mix.score(torch.ones(3, 2))          # N(0, I): the score is -x
    tensor([[-1., -1.],
            [-1., -1.],
            [-1., -1.]])
    """

    def __init__(self, means: torch.Tensor, weights: torch.Tensor, std: float) -> None:
        means = tensor("means", means, floating=True, finite=True)
        if means.dim() != 2 or means.shape[0] < 1:
            raise ArgumentError(f"means must have shape (K, D) with K >= 1, got {tuple(means.shape)}")
        weights = tensor("weights", torch.as_tensor(weights), finite=True).to(means.dtype)
        if weights.shape != (means.shape[0],):
            raise ArgumentError(f"weights must have shape ({means.shape[0]},) to match means, got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ArgumentError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
        self.means = means
        self.weights = weights / weights.sum()
        self.std = positive("std", std)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.means.shape[0]}, D={self.means.shape[1]}, std={self.std:g})"

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: Any = None) -> torch.Tensor:
        """``n`` samples ``(n, D)``: a component index from ``weights``, then ``mu_k + std * noise``."""
        n = positive_int("n", n)
        generator = optional_generator(generator)
        k = torch.multinomial(self.weights.double().cpu(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means.double().cpu()[k] + self.std * noise
        return x.to(dtype=dtype, device=device)

    def _noised(self, x_t: torch.Tensor, t: torch.Tensor | None, schedule: VPSchedule | None):
        x_t = tensor("x_t", x_t, floating=True)
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ArgumentError(f"x_t must have shape (N, {self.dim}), got {tuple(x_t.shape)}")
        if t is None:
            alpha = torch.ones(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
            sigma = torch.zeros_like(alpha)
        else:
            if not isinstance(schedule, VPSchedule):
                raise ArgumentError(f"schedule must be a VPSchedule when t is given, got {type(schedule).__name__}")
            t, n = torch.as_tensor(t, device=x_t.device), x_t.shape[0]
            if t.dim() > 1 or t.numel() not in (1, n):
                raise ArgumentError(f"t must be a scalar or hold one timestep per row of x_t ({n}), "
                                    f"got shape {tuple(t.shape)}")
            alpha, sigma = schedule.alpha_sigma(t.reshape(-1).expand(n), like=x_t)
        mu = self.means.to(x_t)
        var = alpha ** 2 * self.std ** 2 + sigma ** 2  # (N,)
        centers = alpha[:, None, None] * mu[None]  # (N, K, D)
        diff = centers - x_t[:, None, :]
        logits = self.weights.to(x_t).log()[None] - diff.pow(2).sum(-1) / (2 * var[:, None])
        return diff, var, logits

    def score(self, x_t: torch.Tensor, t: torch.Tensor | None = None,
              schedule: VPSchedule | None = None) -> torch.Tensor:
        """``grad_x log p_t(x_t) = sum_k gamma_k (alpha_t mu_k - x_t) / v``, shape ``(N, D)``."""
        diff, var, logits = self._noised(x_t, t, schedule)
        gamma = torch.softmax(logits, dim=1)
        return (gamma[..., None] * diff).sum(1) / var[:, None]

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor | None = None,
                 schedule: VPSchedule | None = None) -> torch.Tensor:
        """``log p_t(x_t)``, shape ``(N,)``."""
        _, var, logits = self._noised(x_t, t, schedule)
        return torch.logsumexp(logits, 1) - 0.5 * self.dim * torch.log(2 * math.pi * var)


def mode_coverage(samples: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, *,
                  recall_fraction: float = 0.2) -> dict[str, Any]:
    """Per-mode mass of ``samples`` (each assigned to its nearest mean) against the target ``weights``.

    Returns ``{"mass": [q_k], "tv": 0.5 * sum_k |q_k - w_k|, "recall": fraction of modes with
    q_k >= recall_fraction * w_k}`` (paper slug: f-distill, the mode-coverage metrics of its toy).
    """
    samples = tensor("samples", samples, floating=True)
    means = tensor("means", means, floating=True)
    if samples.dim() != 2 or means.dim() != 2 or samples.shape[1] != means.shape[1]:
        raise ArgumentError(f"samples (N, D) and means (K, D) must share D, got {tuple(samples.shape)} and "
                            f"{tuple(means.shape)}")
    recall_fraction = real_in("recall_fraction", recall_fraction, 0.0, 1.0)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != means.shape[0]:
        raise ArgumentError(f"weights must hold one value per mean ({means.shape[0]}), got {w.numel()}")
    w = w / w.sum()
    nearest = torch.cdist(samples.double(), means.to(samples.device).double()).argmin(1).cpu()
    q = torch.bincount(nearest, minlength=means.shape[0]).double() / samples.shape[0]
    return {"mass": q.tolist(), "tv": 0.5 * float((q - w).abs().sum()),
            "recall": float((q >= recall_fraction * w).double().mean())}


def rbf_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.25, 1.0, 4.0)) -> float:
    """Squared MMD between samples ``x`` and ``y`` with a sum of RBF kernels ``exp(-|a - b|^2 / (2 h^2))``
    (biased V-statistic, >= 0; 0 when the two sample sets are equal)."""
    x = tensor("x", x, floating=True, min_dim=2)
    y = tensor("y", y, floating=True, min_dim=2)
    if x.shape[1:] != y.shape[1:]:
        raise ArgumentError(f"x and y must share the feature shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not bandwidths:
        raise ArgumentError("bandwidths must hold at least one positive value, got an empty tuple")
    hs = [positive("bandwidths[i]", h) for h in bandwidths]
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs).mean()

    return float((k(x, x) + k(y, y) - 2 * k(x, y)).clamp_min(0.0))
