"""Learned proximal networks: a prox operator as the gradient of a convex potential (paper slug: lpn).

A map is the proximal operator of some (possibly non-convex) function R iff it is the gradient of a convex
function psi (Gribonval & Nikolova). A learned proximal network (LPN) takes psi to be an input-convex
network (:class:`gradkit.nn.icnn.ICNN`) and defines::

    f(y)        = grad_y psi(y)                                   (autograd; create_graph while training)
    R(f(y))     = <y, f(y)> - 1/2 ||f(y)||^2 - psi(y)             (f = prox_R, R up to a constant)
    R(x)        = <y*, x> - 1/2 ||x||^2 - psi(y*),  y* = argmin_y psi(y) - <x, y>   (convex inversion)

Trained as a denoiser (``y = x + sigma n``) with the proximal matching loss::

    l_PM(x_hat, x; gamma) = 1 - exp(-||x_hat - x||_2^2 / gamma^2)     (per-sample norm, batch mean)

and gamma shrinking to 0 (:class:`GammaSchedule`), f approaches the MAP denoiser and R approaches
``-sigma^2 log p_x`` (up to a constant); L2 training gives the MMSE denoiser (posterior mean) instead.
:func:`pnp_pgd` plugs f into proximal gradient descent for ``min_x 1/2 ||A x - y||^2 + R(x)``.

Example::

    prox = LearnedProx(ICNN(1, hidden=50, layers=4, beta=10.0))
    x_hat = prox(y)                                       # f(y) = grad psi(y), shape of y
    loss = proximal_matching_loss(x_hat, x, gamma=0.5)
    r = prox.regulariser(torch.linspace(-2, 2, 41)[:, None])   # R(x) up to a constant
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .. import _validate as V


# ------------------------------------------------------------------------------------------- the loss
def proximal_matching_loss(pred: torch.Tensor, target: torch.Tensor, gamma: float,
                           reduction: str = "mean") -> torch.Tensor:
    """``1 - exp(-||pred_i - target_i||^2 / gamma^2)`` per sample, the norm over every dim but the first.

    A bounded surrogate of the 0-1 loss ``1[pred != target]``: as ``gamma -> 0`` its minimiser over
    denoisers is the MAP estimate (paper slug: lpn). The squared norm is used directly (no sqrt), so the
    gradient is defined at ``pred == target``. ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    V.tensor("pred", pred, floating=True, min_dim=1)
    V.tensor("target", target, floating=True, min_dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    gamma = V.positive("gamma", gamma)
    V.choice("reduction", reduction, ("mean", "sum", "none"))
    sq = (pred - target).pow(2).reshape(pred.shape[0], -1).sum(1)
    per = -torch.expm1(-sq / (gamma * gamma))
    if reduction == "none":
        return per
    return per.mean() if reduction == "mean" else per.sum()


@dataclass(frozen=True)
class GammaSchedule:
    """Stages of the proximal matching radius: ``gammas[s]`` for ``steps[s]`` steps each (paper slug: lpn).

    ``schedule(step)`` is the gamma at a 0-based step (the last gamma after the end). The image recipe is
    :meth:`geometric`: ``gamma_min * 2^(stages - 1 - s)`` with ``gamma_min = 0.08 sqrt(d)`` for ``d`` pixels;
    the 1-D recipe lists ``(0.5, 0.4, 0.3, 0.2, 0.1)``.
    """

    gammas: tuple[float, ...]
    steps: tuple[int, ...]
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __init__(self, gammas: Sequence[float], steps: int | Sequence[int]) -> None:
        g = tuple(V.positive(f"gammas[{i}]", v) for i, v in enumerate(gammas))
        if not g:
            raise V.ArgumentError("gammas must hold at least one value, got none")
        if V.is_int(steps):
            st = (V.positive_int("steps", steps),) * len(g)
        else:
            st = tuple(V.positive_int(f"steps[{i}]", s) for i, s in enumerate(steps))
            if len(st) != len(g):
                raise V.ArgumentError(f"steps must be an int or one int per gamma ({len(g)}), got {len(st)} values")
        ends, total = [], 0
        for s in st:
            total += s
            ends.append(total)
        object.__setattr__(self, "gammas", g)
        object.__setattr__(self, "steps", st)
        object.__setattr__(self, "_ends", tuple(ends))

    @classmethod
    def geometric(cls, gamma_min: float, stages: int, steps_per_stage: int) -> "GammaSchedule":
        """``gamma_min * 2^(stages - 1 - s)`` for stage ``s = 0..stages-1`` (the official image schedule)."""
        gamma_min = V.positive("gamma_min", gamma_min)
        stages = V.positive_int("stages", stages)
        return cls([gamma_min * 2.0 ** (stages - 1 - s) for s in range(stages)], steps_per_stage)

    @property
    def total_steps(self) -> int:
        return self._ends[-1]

    def stage(self, step: int) -> int:
        """The 0-based stage of ``step`` (the last stage after the end)."""
        step = V.nonneg_int("step", step)
        for s, end in enumerate(self._ends):
            if step < end:
                return s
        return len(self._ends) - 1

    def __call__(self, step: int) -> float:
        return self.gammas[self.stage(step)]


# ------------------------------------------------------------------------------------------- inversion
@dataclass
class InversionResult:
    """``y`` with ``grad psi(y) ~= x``; ``residuals``: max |grad psi(y_i) - x_i| per sample; ``residual``:
    their max; ``iterations`` (Newton steps taken); ``converged``: every residual <= tol."""

    y: torch.Tensor
    residuals: torch.Tensor
    residual: float
    iterations: int
    converged: bool


def _grad(potential: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, create_graph: bool) -> torch.Tensor:
    with torch.enable_grad():
        y_ = y if y.requires_grad else y.detach().requires_grad_(True)
        psi = potential(y_)
        if psi.dim() != 1 or psi.shape[0] != y.shape[0]:
            raise ValueError(f"the potential must return one value per sample, shape ({y.shape[0]},), "
                             f"got {tuple(psi.shape)}")
        (g,) = torch.autograd.grad(psi.sum(), y_, create_graph=create_graph)
    return g


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _per(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample (N,) vector broadcast against ``like`` (N, ...)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def invert_gradient(potential: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, iters: int = 100,
                    tol: float = 1e-6, y0: torch.Tensor | None = None, cg_iters: int = 20,
                    damping: float = 1.0) -> InversionResult:
    """Solve ``grad psi(y) = x`` per sample as the convex problem ``min_y psi(y) - <x, y>`` (paper slug: lpn).

    Batched damped Newton: every sample takes its own step ``d = -(H + mu I)^-1 g`` with ``g = grad psi(y) - x``,
    ``H`` the Hessian of psi (Hessian-vector products by double backward, ``cg_iters`` conjugate-gradient
    iterations) and ``mu = damping ||g||``, then its own Armijo backtracking line search. Samples are
    independent: one that cannot be inverted (``x`` outside the range of ``grad psi``, where the objective
    is unbounded below) moves a bounded distance per step and is reported in ``residuals``, never turning
    the others into NaN. A sample stops once ``max |g| <= tol``. ``y0``: the start (default ``x``). The
    parameters of ``potential`` get no gradient.
    """
    V.tensor("x", x, floating=True, finite=True, min_dim=1)
    iters = V.nonneg_int("iters", iters)
    tol = V.positive("tol", tol)
    cg_iters = V.positive_int("cg_iters", cg_iters)
    damping = V.positive("damping", damping)
    if y0 is not None:
        V.tensor("y0", y0, floating=True, finite=True)
        if y0.shape != x.shape:
            raise ValueError(f"y0 must have the shape of x {tuple(x.shape)}, got {tuple(y0.shape)}")
    target = x.detach()
    y = (target if y0 is None else y0.detach()).clone()
    cg_iters = min(cg_iters, _rows(target).shape[1])
    slack = 10 * torch.finfo(target.dtype).eps

    def objective(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return potential(v) - (_rows(v) * _rows(target)).sum(1)

    def residuals(g: torch.Tensor) -> torch.Tensor:
        r = _rows(g).abs().amax(1)
        return torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf")))

    steps = 0
    for steps in range(iters + 1):
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            psi = potential(y_)
            (fy,) = torch.autograd.grad(psi.sum(), y_, create_graph=True)
        g = (fy - target).detach()
        res = residuals(g)
        active = res > tol
        if steps == iters or not bool(active.any()):
            break
        gn = _rows(g).norm(dim=1)
        mu = _per(damping * gn, g)
        # (H + mu I) d = -g by batched conjugate gradients; the Hessian is block diagonal over samples
        d, r = torch.zeros_like(g), -g
        p, rs = r.clone(), _rows(r).pow(2).sum(1)
        for _ in range(cg_iters):
            hp = torch.autograd.grad(fy, y_, grad_outputs=p, retain_graph=True, allow_unused=True)[0] \
                if fy.requires_grad else None  # None: psi is affine in y, its Hessian is 0
            ap = (0.0 if hp is None else hp.detach()) + mu * p
            pap = _rows(p * ap).sum(1)
            alpha = torch.where(pap > 0, rs / pap.clamp_min(torch.finfo(pap.dtype).tiny), torch.zeros_like(pap))
            d, r = d + _per(alpha, p) * p, r - _per(alpha, p) * ap
            rs_new = _rows(r).pow(2).sum(1)
            if bool((rs_new.sqrt() <= 1e-3 * gn).all()):
                break
            p = r + _per(rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), p) * p
            rs = rs_new
        gd = _rows(g * d).sum(1)
        bad = ~(torch.isfinite(gd) & (gd < 0))  # not a descent direction: fall back to -g / mu
        if bool(bad.any()):
            d = torch.where(_per(bad, d), -g / mu.clamp_min(torch.finfo(g.dtype).tiny), d)
            gd = _rows(g * d).sum(1)
        # per-sample Armijo backtracking
        phi = (psi.detach() - (_rows(y) * _rows(target)).sum(1))
        t = torch.ones_like(gd)
        done = ~active
        new = y.clone()
        for _ in range(40):
            cand = y + _per(t, y) * d
            pc = objective(cand)
            ok = ~done & torch.isfinite(pc) & (pc <= phi + 1e-4 * t * gd + slack * phi.abs())
            new = torch.where(_per(ok, y), cand, new)
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        y = new
    return InversionResult(y.detach(), res, float(res.max()), steps, not bool(active.any()))


# ------------------------------------------------------------------------------------------- the prox
class LearnedProx(nn.Module):
    """``f(y) = grad psi(y)``: an exact proximal operator of a learned regulariser R (paper slug: lpn).

    ``potential``: a module mapping ``(N, *shape)`` to ``(N,)``, convex in each sample (an
    :class:`gradkit.nn.icnn.ICNN`). ``forward(y)`` differentiates it with autograd; the result carries a
    graph (``create_graph=True``, so a loss on it trains the potential through a double backward) when
    gradients are enabled and the module is in training mode or ``y`` requires grad; otherwise it is
    detached and the potential's graph is freed. :meth:`regulariser` evaluates R by convex inversion.
    """

    def __init__(self, potential: nn.Module) -> None:
        super().__init__()
        if not isinstance(potential, nn.Module):
            raise V.ArgumentError(f"potential must be an nn.Module (e.g. an ICNN), got {type(potential).__name__}")
        self.potential = potential

    def forward(self, y: torch.Tensor, create_graph: bool | None = None) -> torch.Tensor:
        """``grad psi(y)``, the shape of ``y``; ``create_graph`` overrides the default described above."""
        V.tensor("y", y, floating=True, min_dim=1)
        if create_graph is None:
            create_graph = torch.is_grad_enabled() and (self.training or y.requires_grad)
        else:
            V.boolean("create_graph", create_graph)
        return _grad(self.potential, y, create_graph)

    def clamp_(self) -> "LearnedProx":
        """The potential's ``clamp_()`` (if it has one): keep it convex after an optimiser step."""
        fn = getattr(self.potential, "clamp_", None)
        if callable(fn):
            fn()
        return self

    def invert(self, x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
        """``y`` with ``f(y) ~= x`` (see :func:`invert_gradient`); warns when the inversion does not converge."""
        res = invert_gradient(self.potential, x, iters=iters, tol=tol)
        if not res.converged:
            warnings.warn(f"LearnedProx.invert: max |f(y) - x| = {res.residual:.3g} > tol = {tol:g} after "
                          f"{res.iterations} iterations (x outside the range of f, or too few iterations)",
                          RuntimeWarning, stacklevel=2)
        return res.y

    def regulariser(self, x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
        """``R(x) = <y, x> - 1/2 ||x||^2 - psi(y)`` with ``y = f^-1(x)``, shape ``(N,)``, up to a constant.

        The expression is stationary in ``y`` at the solution, so an inexact inversion errs only to second
        order in the residual. No gradient flows to ``x`` or the parameters.
        """
        y = self.invert(x, iters=iters, tol=tol)
        with torch.no_grad():
            n = x.shape[0]
            xf, yf = x.detach().reshape(n, -1), y.reshape(n, -1)
            return (xf * yf).sum(1) - 0.5 * xf.pow(2).sum(1) - self.potential(y)

    prior = regulariser  # the paper's name for R


# ------------------------------------------------------------------------------------------- PnP
@dataclass
class PnPResult:
    """The final iterate ``x`` and the relative change ``||x_{k+1} - x_k|| / ||x_k||`` of every iteration."""

    x: torch.Tensor
    changes: list[float]


def pnp_pgd(prox: Callable[[torch.Tensor], torch.Tensor], A: Callable[[torch.Tensor], torch.Tensor],
            At: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, step: float, iters: int = 100,
            x0: torch.Tensor | None = None) -> PnPResult:
    """Plug-and-play proximal gradient descent ``x_{k+1} = prox(x_k - step * At(A(x_k) - y))`` (paper slug: lpn).

    With ``prox`` an LPN (the prox of R) and ``step = 1`` this is proximal gradient descent on
    ``1/2 ||A x - y||^2 + R(x)`` (the LPN's R was learned for a noise level; ``step`` rescales it).
    ``x0`` defaults to ``At(y)``. Runs without building an autograd graph.
    """
    for name, fn in (("prox", prox), ("A", A), ("At", At)):
        if not callable(fn):
            raise V.ArgumentError(f"{name} must be callable, got {type(fn).__name__}")
    V.tensor("y", y, floating=True, finite=True)
    step = V.positive("step", step)
    iters = V.positive_int("iters", iters)
    with torch.no_grad():
        x = At(y) if x0 is None else V.tensor("x0", x0, floating=True, finite=True).detach().clone()
        changes = []
        for _ in range(iters):
            nxt = prox(x - step * At(A(x) - y)).detach()
            changes.append(float((nxt - x).norm() / x.norm().clamp_min(torch.finfo(x.dtype).tiny)))
            x = nxt
    return PnPResult(x, changes)
