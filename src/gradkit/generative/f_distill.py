"""f-divergence distribution matching for one-step diffusion distillation (f-distill).

Paper slug: ``f-distill`` (Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution
Matching", arXiv 2502.15681). A one-step generator ``x = G(z)`` is trained to minimise an f-divergence
``D_f(p_t || q_t) = E_{q_t}[f(p_t / q_t)]`` between the noised teacher distribution ``p_t`` and the noised
student distribution ``q_t``. With ``x_t = alpha_t x + sigma_t eps``, teacher score ``s_p``, student ("fake")
score ``s_q`` and density ratio ``r = p_t / q_t``::

    grad_theta D_f = E[ h(r) * (s_q(x_t) - s_p(x_t))^T d x_t / d theta ],     h(r) = f''(r) r^2

so the reverse-KL gradient of variational score distillation (DMD, ``h = 1``) is re-weighted per sample by
``h(r)``. The ratio comes from a discriminator: ``log r ~= D(x_t, t)`` when ``D`` is trained with
:func:`ratio_bce_loss` (real = noised data, fake = noised generator samples).

    kind          f(r)                                   h(r) = f''(r) r^2
    reverse_kl    -log r                                 1
    forward_kl    r log r                                r
    js            1/2 [r log r - (1+r) log((1+r)/2)]     1/2 r / (1 + r)
    hellinger     (sqrt r - 1)^2                         1/2 sqrt r
    jeffreys      (r - 1) log r                          r + 1
    chi2          (r - 1)^2                              2 r^2

>>> loss_fn = FDistillLoss(teacher_score, fake_score, ratio_logit, kind="js", schedule=VPSchedule())
>>> loss = loss_fn(generator(z))      # backward() reaches the generator's parameters only
>>> loss.backward()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._validate import ArgumentError, choice, optional_generator, positive, real_in, real_scalar, tensor
from .diffusion import GaussianDiffusion, VPSchedule

__all__ = ["F_DIVERGENCES", "f_function", "f_divergence_weight", "f_distill_surrogate", "dsm_loss",
           "ratio_bce_loss", "FDistillLoss", "FDistillTerms"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# h(r) = f''(r) r^2 written in log r, so that large ratios stay finite before clipping
_H: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reverse_kl": lambda lr: torch.ones_like(lr),
    "forward_kl": lambda lr: lr.exp(),
    "js": lambda lr: 0.5 * torch.sigmoid(lr),
    "hellinger": lambda lr: 0.5 * (0.5 * lr).exp(),
    "jeffreys": lambda lr: lr.exp() + 1,
    "chi2": lambda lr: 2 * (2 * lr).exp(),
}

_F: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reverse_kl": lambda r: -torch.log(r),
    "forward_kl": lambda r: torch.xlogy(r, r),
    "js": lambda r: 0.5 * (torch.xlogy(r, r) - (1 + r) * torch.log((1 + r) / 2)),
    "hellinger": lambda r: (r.sqrt() - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * torch.log(r),
    "chi2": lambda r: (r - 1) ** 2,
}

F_DIVERGENCES: tuple[str, ...] = tuple(_H)
"""The f-divergences with a weight: reverse_kl, forward_kl, js, hellinger, jeffreys, chi2."""


def _kind(kind: Any) -> str:
    if not isinstance(kind, str) or kind not in _H:
        raise ArgumentError(f"kind must be one of the f-divergences {F_DIVERGENCES}, got {kind!r}")
    return kind


def f_function(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator ``f(r)`` of the f-divergence ``kind`` (``D_f(p||q) = E_q[f(p/q)]``, ``f(1) = 0``).

    Paper slug: f-distill. ``f_function("js")(torch.tensor([1.0]))`` is 0.
    """
    return _F[_kind(kind)]


def f_divergence_weight(log_r: torch.Tensor, kind: str, *, normalize: str | None = "batch_mean",
                        clip: float | None = 5.0) -> torch.Tensor:
    """Per-sample weight ``h(r) = f''(r) r^2`` of the f-divergence ``kind`` at the log density ratio ``log_r``.

    Paper slug: f-distill. ``log_r`` (any shape) is ``log p_t/q_t`` (teacher over student), clamped to
    ``[-clip, clip]`` first (``clip=None``: no clamp). ``normalize="batch_mean"`` divides by the mean weight,
    so the weights average exactly 1 (``None``: raw ``h``). Returned detached: the weight is a constant of
    the generator loss.

    >>> f_divergence_weight(torch.tensor([-1.0, 0.0, 1.0]), "js", normalize=None)
    tensor([0.1345, 0.2500, 0.3655])
    """
    log_r = tensor("log_r", log_r, floating=True)
    h = _H[_kind(kind)]
    normalize = choice("normalize", normalize, ("batch_mean", None))
    lr = log_r.detach()
    if clip is not None:
        clip = positive("clip", clip)
        lr = lr.clamp(-clip, clip)
    w = h(lr)
    if normalize == "batch_mean":
        w = w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)
    return w


def f_distill_surrogate(x_t: torch.Tensor, score_p: torch.Tensor, score_q: torch.Tensor,
                        log_r: torch.Tensor | None = None, kind: str = "js", *,
                        normalize: str | None = "batch_mean", clip: float | None = 5.0) -> torch.Tensor:
    """Surrogate whose gradient is the Monte-Carlo estimate of ``grad_theta D_f`` (paper slug: f-distill).

    ``loss = sum(stopgrad(w * (s_q - s_p)) * x_t) / N`` with ``w = h(r)`` per sample
    (:func:`f_divergence_weight`); only ``x_t`` carries a gradient. ``x_t``, ``score_p`` (teacher) and
    ``score_q`` (student) share the shape ``(N, ...)``; ``log_r`` is ``(N,)`` (may be None for reverse_kl,
    whose weight is 1). The loss *value* means nothing; its gradient does.

    >>> x = torch.randn(4, 2, requires_grad=True)
    >>> f_distill_surrogate(x, -x.detach(), -x.detach() / 2, torch.zeros(4), "js").backward()
    """
    x_t = tensor("x_t", x_t, floating=True, min_dim=1)
    for name, s in (("score_p", score_p), ("score_q", score_q)):
        tensor(name, s, floating=True)
        if s.shape != x_t.shape:
            raise ArgumentError(f"{name} must have x_t's shape {tuple(x_t.shape)}, got {tuple(s.shape)}")
    kind = _kind(kind)
    n = x_t.shape[0]
    if log_r is None:
        if kind != "reverse_kl":
            raise ArgumentError(f"log_r is needed for kind={kind!r} (only reverse_kl has a constant weight)")
        log_r = torch.zeros(n, dtype=x_t.dtype, device=x_t.device)
    log_r = tensor("log_r", log_r, floating=True).reshape(-1)
    if log_r.shape != (n,):
        raise ArgumentError(f"log_r must hold one value per sample ({n}), got shape {tuple(log_r.shape)}")
    w = f_divergence_weight(log_r, kind, normalize=normalize, clip=clip)
    g = (w.reshape((n,) + (1,) * (x_t.dim() - 1)) * (score_q - score_p)).detach()
    return (g * x_t).sum() / n


def dsm_loss(score_net: ScoreFn, x0: torch.Tensor, schedule: VPSchedule | None = None, *,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching ``E || sigma_t s(x_t, t) + eps ||^2`` for a score network (paper slug: f-distill).

    The fake-score network of f-distill (and a learned teacher) is trained with it on fresh samples ``x0``;
    this is the epsilon-prediction loss of :class:`GaussianDiffusion` with ``eps_hat = -sigma_t s``.
    ``score_net(x_t, t)`` returns a tensor of ``x_t``'s shape.
    """
    diff = GaussianDiffusion(schedule)
    return diff.loss(lambda x_t, tt: diff.eps_from_score(score_net(x_t, tt), tt), x0, t=t, noise=noise,
                     generator=generator)


def ratio_bce_loss(disc: ScoreFn, x_real_t: torch.Tensor, x_fake_t: torch.Tensor, t_real: torch.Tensor,
                   t_fake: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy for a density-ratio discriminator: ``disc(x_t, t) -> logit``, real label 1.

    Paper slug: f-distill. At the optimum (equal numbers of real and fake samples) the logit is
    ``log p_t(x_t) / q_t(x_t)``, the log ratio :func:`f_divergence_weight` takes. Real samples are noised
    data (or teacher samples), fake ones noised generator samples, at the same distribution of ``t`` as
    the score terms. ``t_fake`` defaults to ``t_real``.
    """
    if t_fake is None:
        t_fake = t_real
    lr = _logit(disc, x_real_t, t_real, "x_real_t")
    lf = _logit(disc, x_fake_t, t_fake, "x_fake_t")
    return 0.5 * (F.softplus(-lr).mean() + F.softplus(lf).mean())


def _logit(disc: ScoreFn, x: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
    tensor(name, x, floating=True, min_dim=1)
    out = disc(x, t)
    if out.numel() != x.shape[0]:
        raise ArgumentError(f"disc must return one logit per sample of {name} ({x.shape[0]}), got shape "
                            f"{tuple(out.shape)}")
    return out.reshape(-1)


@dataclass
class FDistillTerms:
    """What one call of :class:`FDistillLoss` computed: the loss and, detached, its parts."""

    loss: torch.Tensor
    weight: torch.Tensor  # (N,) normalised h(r)
    log_r: torch.Tensor  # (N,) discriminator logit (unclipped)
    t: torch.Tensor  # (N,) timesteps
    x_t: torch.Tensor  # noised generator samples


class FDistillLoss:
    """Generator loss of f-distill: the f-weighted score-difference surrogate, plus an optional GAN term.

    Paper slug: f-distill. ``teacher_score``, ``fake_score``: callables ``(x_t, t) -> score`` (frozen teacher,
    online student score); ``ratio_logit``: ``(x_t, t) -> (N,)`` logit ~ ``log p_t/q_t`` (None only for
    reverse_kl without a GAN term). Per call: ``t`` uniform in ``[t_min*T, t_max*T]``, ``x_t = alpha x + sigma
    eps``, ``w = h(r)`` normalised by its batch mean (``normalize``), and

    - ``score_norm="dmd"`` (default; DMD's per-sample normalisation, the first stage of the paper's
      two-stage normalisation): the update on ``x`` is ``g = w (x0_q - x0_p) / mean|x - x0_p|`` with
      ``x0 = (x_t + sigma^2 s)/alpha``; the loss is ``sum(stopgrad(g) x) / numel`` (the gradient of DMD's
      ``0.5 * mse(x, stopgrad(x - g))``; reverse_kl reproduces DMD exactly);
    - ``score_norm=None``: the unbiased surrogate of :func:`f_distill_surrogate` on ``x_t``.

    ``gan_weight`` adds ``gan_weight * softplus(-ratio_logit(x_t, t)).mean()`` (the non-saturating GAN loss
    with gradient through ``x_t``, as in DMD2). Only ``x`` carries a gradient into the score terms.

    >>> loss_fn = FDistillLoss(teacher, fake, disc, kind="js", schedule=VPSchedule(num_timesteps=1000))
    >>> loss_fn(G(z)).backward()
    """

    def __init__(self, teacher_score: ScoreFn, fake_score: ScoreFn, ratio_logit: ScoreFn | None = None,
                 kind: str = "js", schedule: VPSchedule | None = None, *, normalize: str | None = "batch_mean",
                 clip: float | None = 5.0, score_norm: str | None = "dmd", gan_weight: float = 0.0,
                 t_min: float = 0.02, t_max: float = 0.98) -> None:
        for name, fn in (("teacher_score", teacher_score), ("fake_score", fake_score)):
            if not callable(fn):
                raise ArgumentError(f"{name} must be a callable (x_t, t) -> score, got {type(fn).__name__}")
        self.kind = _kind(kind)
        self.gan_weight = real_scalar("gan_weight", gan_weight, nonneg=True)
        if ratio_logit is None and (self.kind != "reverse_kl" or self.gan_weight > 0):
            raise ArgumentError(f"ratio_logit is needed for kind={self.kind!r} or gan_weight > 0, got None")
        if ratio_logit is not None and not callable(ratio_logit):
            raise ArgumentError(f"ratio_logit must be a callable (x_t, t) -> logit or None, got "
                                f"{type(ratio_logit).__name__}")
        if schedule is None:
            schedule = VPSchedule()
        if not isinstance(schedule, VPSchedule):
            raise ArgumentError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
        self.teacher_score, self.fake_score, self.ratio_logit = teacher_score, fake_score, ratio_logit
        self.schedule = schedule
        self.normalize = choice("normalize", normalize, ("batch_mean", None))
        self.clip = None if clip is None else positive("clip", clip)
        self.score_norm = choice("score_norm", score_norm, ("dmd", None))
        self.t_min = real_in("t_min", t_min, 0.0, 1.0)
        self.t_max = real_in("t_max", t_max, self.t_min, 1.0)

    def __repr__(self) -> str:
        return (f"FDistillLoss(kind={self.kind!r}, normalize={self.normalize!r}, clip={self.clip}, "
                f"score_norm={self.score_norm!r}, gan_weight={self.gan_weight:g})")

    def sample_t(self, n: int, *, device: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` timesteps uniform in ``[t_min*(T-1), t_max*(T-1)]`` (the range every term of a step shares)."""
        T = self.schedule.num_timesteps
        lo, hi = int(round(self.t_min * (T - 1))), int(round(self.t_max * (T - 1)))
        return torch.randint(lo, hi + 1, (n,), device=device, generator=optional_generator(generator))

    def terms(self, x: torch.Tensor, *, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> FDistillTerms:
        """The loss on generator samples ``x`` (N, ...) and its parts; ``t``/``noise`` are drawn when None."""
        x = tensor("x", x, floating=True, min_dim=1)
        n = x.shape[0]
        generator = optional_generator(generator)
        if t is None:
            t = self.sample_t(n, device=x.device, generator=generator)
        if noise is None:
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        diff = GaussianDiffusion(self.schedule)
        x_t = diff.q_sample(x, t, noise)
        t = torch.as_tensor(t, device=x.device).expand(n)  # q_sample checked its shape and range
        xd = x_t.detach()
        with torch.no_grad():
            s_p = self.teacher_score(xd, t)
            s_q = self.fake_score(xd, t)
            for name, s in (("teacher_score", s_p), ("fake_score", s_q)):
                if s.shape != x.shape:
                    raise ArgumentError(f"{name} must return x_t's shape {tuple(x.shape)}, got {tuple(s.shape)}")
            log_r = (_logit(self.ratio_logit, xd, t, "x_t") if self.ratio_logit is not None
                     else torch.zeros(n, dtype=x.dtype, device=x.device))
        w = f_divergence_weight(log_r, self.kind, normalize=self.normalize, clip=self.clip)
        if self.score_norm is None:
            loss = f_distill_surrogate(x_t, s_p, s_q, log_r, self.kind, normalize=self.normalize, clip=self.clip)
        else:
            a, s = self.schedule.alpha_sigma(t, like=x)
            shape = (n,) + (1,) * (x.dim() - 1)
            a, s2 = a.reshape(shape), (s * s).reshape(shape)
            x0_p = (xd + s2 * s_p) / a
            x0_q = (xd + s2 * s_q) / a
            scale = (x.detach() - x0_p).abs().flatten(1).mean(1).clamp_min(1e-12).reshape(shape)
            g = (w.reshape(shape) * (x0_q - x0_p) / scale).detach()
            loss = (g * x).sum() / x.numel()
        if self.gan_weight > 0:
            loss = loss + self.gan_weight * F.softplus(-_logit(self.ratio_logit, x_t, t, "x_t")).mean()
        return FDistillTerms(loss, w, log_r.detach(), t, x_t.detach())

    def __call__(self, x: torch.Tensor, *, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The generator loss on samples ``x``; ``backward()`` reaches whatever produced ``x``."""
        return self.terms(x, t=t, noise=noise, generator=generator).loss
