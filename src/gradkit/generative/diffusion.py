"""Minimal Gaussian diffusion: a variance-preserving noise schedule, epsilon prediction and a DDIM sampler.

Paper slugs: ``switch-dit`` (a tiny DiT trained on these utilities), ``f-distill`` (teacher and fake
scores of the noised distributions). Shared by every diffusion paper of the library, so that noising,
the training loss and the sampler exist once.

A :class:`VPSchedule` holds ``T`` discrete steps ``t = 0..T-1`` with cumulative products
``abar_t`` (cosine: ``abar(u) = cos^2((u + s)/(1 + s) * pi/2) / cos^2(s/(1 + s) * pi/2)``, ``u = (t+1)/T``,
per-step ``beta`` capped at 0.999; or linear ``beta`` from 1e-4 to 0.02, scaled by 1000/T). Noising is
``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, so
``alpha_t^2 + sigma_t^2 = 1``. A denoiser predicts ``eps``; then ``x0_hat = (x_t - sigma_t eps_hat)/alpha_t``
and the score is ``grad log p_t(x_t) = -eps_hat / sigma_t``.

>>> diff = GaussianDiffusion(VPSchedule(num_timesteps=100))
>>> net = lambda x_t, t: torch.zeros_like(x_t)          # any callable (x_t, t, **cond) -> eps
>>> loss = diff.loss(net, torch.randn(8, 2))            # epsilon-prediction MSE at random t
>>> diff.ddim_sample(net, (4, 2), steps=10).shape
torch.Size([4, 2])
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .._validate import choice, integer, optional_generator, positive, real_in

__all__ = ["VPSchedule", "GaussianDiffusion", "timestep_embedding"]


class VPSchedule:
    """Variance-preserving schedule over ``num_timesteps`` discrete steps (cosine or linear betas).

    Paper slugs: switch-dit, f-distill. ``alpha(t)^2 + sigma(t)^2 = 1``; ``abar`` strictly decreases in t.

    >>> sch = VPSchedule("cosine", num_timesteps=1000)
    >>> a, s = sch.alpha_sigma(torch.tensor([0, 999]))
    """

    def __init__(self, kind: str = "cosine", num_timesteps: int = 1000, *, s: float = 0.008,
                 beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self.kind = choice("kind", kind, ("cosine", "linear"))
        self.num_timesteps = integer("num_timesteps", num_timesteps, low=2)
        T = self.num_timesteps
        if self.kind == "cosine":
            s = real_in("s", s, 0.0, None)
            u = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            beta_start = real_in("beta_start", beta_start, 0.0, 1.0)
            beta_end = real_in("beta_end", beta_end, beta_start, 1.0)
            scale = 1000.0 / T  # the DDPM range is stated for T = 1000; keep abar_{T-1} ~ 0 at any T
            betas = torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), T, dtype=torch.float64)
        self.betas = betas
        self.abar = torch.cumprod(1 - betas, 0)  # abar[t] for t = 0..T-1, float64

    def __repr__(self) -> str:
        return f"VPSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps})"

    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"t must hold integer timesteps in 0..{self.num_timesteps - 1}, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t must lie in 0..{self.num_timesteps - 1}, got values in "
                             f"{int(t.min())}..{int(t.max())}")
        return t

    def abar_at(self, t: torch.Tensor, *, like: torch.Tensor | None = None) -> torch.Tensor:
        """``abar_t`` gathered at integer timesteps ``t``, as ``like``'s dtype/device when given."""
        t = self._check_t(t)
        out = self.abar.to(t.device)[t.long()]
        return out.to(like) if like is not None else out

    def alpha_sigma(self, t: torch.Tensor, *, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` at integer timesteps ``t`` (same shape as ``t``)."""
        abar = self.abar_at(t, like=like)
        return abar.sqrt(), (1 - abar).sqrt()

    def sample_timesteps(self, n: int, *, device: Any = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` timesteps drawn uniformly from ``0..T-1``."""
        n = integer("n", n, low=1)
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=optional_generator(generator))


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


class GaussianDiffusion:
    """Noising, epsilon-prediction loss and DDIM sampling on top of a :class:`VPSchedule`.

    Paper slugs: switch-dit, f-distill. ``model(x_t, t, **cond)`` returns ``eps_hat`` of ``x_t``'s shape;
    ``loss = mean ||eps_hat - eps||^2``; DDIM (eta = 0 deterministic) steps
    ``x_{t'} = alpha_{t'} x0_hat + sqrt(sigma_{t'}^2 - c^2) eps_hat + c z``.
    """

    def __init__(self, schedule: VPSchedule | None = None) -> None:
        if schedule is None:
            schedule = VPSchedule()
        if not isinstance(schedule, VPSchedule):
            raise TypeError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t noise`` (fresh standard normal noise when none is given)."""
        if noise is None:
            noise = torch.randn_like(x0)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        t = self._batch_t(t, x0)
        a, s = self.schedule.alpha_sigma(t, like=x0)
        return _expand(a, x0) * x0 + _expand(s, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x0_hat = (x_t - sigma_t eps) / alpha_t``."""
        a, s = self.schedule.alpha_sigma(self._batch_t(t, x_t), like=x_t)
        return (x_t - _expand(s, x_t) * eps) / _expand(a, x_t)

    def score_from_eps(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``grad_x log p_t(x_t) = -eps / sigma_t``."""
        _, s = self.schedule.alpha_sigma(self._batch_t(t, eps), like=eps)
        return -eps / _expand(s, eps)

    def eps_from_score(self, score: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`score_from_eps`: ``eps = -sigma_t * score``."""
        _, s = self.schedule.alpha_sigma(self._batch_t(t, score), like=score)
        return -_expand(s, score) * score

    def loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, *, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
             reduction: str = "mean", **cond: Any) -> torch.Tensor:
        """Epsilon-prediction loss ``||model(x_t, t, **cond) - eps||^2`` (mean, or per sample with 'none')."""
        reduction = choice("reduction", reduction, ("mean", "none"))
        generator = optional_generator(generator)
        if t is None:
            t = self.schedule.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        eps_hat = model(x_t, self._batch_t(t, x0), **cond)
        if eps_hat.shape != x0.shape:
            raise ValueError(f"model must return a tensor of x_t's shape {tuple(x0.shape)}, got {tuple(eps_hat.shape)}")
        per = (eps_hat - noise).pow(2).flatten(1).mean(1)
        return per.mean() if reduction == "mean" else per

    @torch.no_grad()
    def ddim_sample(self, model: Callable[..., torch.Tensor], shape: tuple[int, ...], *, steps: int = 50,
                    eta: float = 0.0, x_T: torch.Tensor | None = None, clip: float | None = None,
                    generator: torch.Generator | None = None, device: Any = None,
                    dtype: torch.dtype = torch.float32, **cond: Any) -> torch.Tensor:
        """DDIM sampling with ``steps`` evenly spaced timesteps from T-1 down to 0; returns ``x0``.

        ``eta = 0`` is the deterministic sampler, ``eta = 1`` DDPM-like; ``clip`` clamps ``x0_hat`` to
        ``[-clip, clip]`` at every step (e.g. 1.0 for data scaled to [-1, 1]).
        """
        steps = integer("steps", steps, low=1, high=self.num_timesteps)
        eta = real_in("eta", eta, 0.0, 1.0)
        if clip is not None:
            clip = positive("clip", clip)
        generator = optional_generator(generator)
        if x_T is None:
            x = torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)
        else:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
            x = x_T.clone()
        ts = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().unique_consecutive().tolist()
        abar = self.schedule.abar
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = model(x, tt, **cond)
            a_t = float(abar[t])
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            if i + 1 == len(ts):
                return x0
            a_prev = float(abar[ts[i + 1]])
            c = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - c * c, 0.0)) * eps
            if c > 0:
                x = x + c * torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        return x

    def _batch_t(self, t: Any, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or hold one timestep per sample ({x.shape[0]}), "
                             f"got shape {tuple(t.shape)}")
        return self.schedule._check_t(t)


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer or real) timesteps: ``[cos(t f_i), sin(t f_i)]``, ``f_i = P^(-i/half)``.

    Paper slugs: switch-dit, f-distill. Returns ``(len(t), dim)``; an odd ``dim`` gets one zero column.
    """
    dim = integer("dim", dim, low=1)
    t = torch.as_tensor(t).reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb
