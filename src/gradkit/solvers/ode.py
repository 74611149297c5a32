"""Adaptive Dormand-Prince 5(4) ODE solver in torch, differentiable by backprop through its steps
(paper slug: ``local-reg-node``).

One step from ``(t, z)`` with step ``h`` (FSAL: ``k1`` is the last step's ``k7``)::

    k_i  = f(t + c_i h, z + h * sum_j a_ij k_j)          i = 1..7  (k7 = f(t + h, z_new))
    z_new = z + h * sum_i b_i k_i                          5th order, propagated
    err   = h * sum_i (b_i - bhat_i) k_i                   5th minus embedded 4th order solution
    EEst  = sqrt(mean((err / (atol + rtol * max(|z|, |z_new|)))^2))   the step is accepted when EEst <= 1

Step sizes follow Hairer & Wanner's DOPRI5: the initial-step heuristic (2 function evaluations) and a PI
controller (safety 0.9, factor bounds [0.2, 10], beta 0.04); ``Dopri5.torchdiffeq_like`` switches to the
integral controller of torchdiffeq's ``dopri5`` and to stepping past the end, so both take the same steps.
Every evaluation of ``f`` is counted: ``nfe = 2 + 6 * (accepted + rejected)`` for a solve. Outputs at
``saveat`` times come from the 4th-order dense output, so asking for more output times never changes the
steps taken. Step sizes are decided without gradients; everything else is ordinary autograd
(discretise-then-optimise), and the local error estimates of the accepted steps are returned as a
differentiable tensor (``ODESolution.errors``).

Example::

    solver = Dopri5(rtol=1e-6, atol=1e-6)
    sol = solver.solve(lambda t, z: -z, torch.ones(3), 0.0, 1.0, saveat=[0.5, 1.0])
    sol.y[-1], sol.nfe, sol.n_accepted          # ~exp(-1), 2 + 6 * steps, steps
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .._validate import ArgumentError, boolean, choice, positive, positive_int, real_in, real_scalar, tensor

__all__ = ["Dopri5", "ODESolution", "ODESolverError", "RKStep", "ButcherTableau", "DOPRI5_TABLEAU", "SHAMPINE_B_HAT",
           "scaled_rms_error"]

ODEFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ODESolverError(RuntimeError):
    """The solver could not reach the end time (step budget exhausted, step size underflow, non-finite state)."""


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta pair: nodes ``c``, rows ``a``, weights ``b`` (propagated) and
    ``b_hat`` (embedded), dense-output weights ``d`` (Hairer's ``contd5``), and its orders."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_hat: tuple[float, ...]
    d: tuple[float, ...]
    order: int
    embedded_order: int

    @property
    def e(self) -> tuple[float, ...]:
        """Error weights ``b - b_hat``."""
        return tuple(x - y for x, y in zip(self.b, self.b_hat))


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae"; dense output of Hairer & Wanner,
# Solving ODEs I, Sec. II.6 (7 stages, the last one FSAL).
DOPRI5_TABLEAU = ButcherTableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_hat=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    d=(-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
       701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423),
    order=5,
    embedded_order=4,
)

# Shampine's (1986) alternative embedded 4th-order weights for the same stages ("Dormand-Prince-Shampine"),
# the pair torchdiffeq's dopri5 uses; the propagated 5th-order solution is the same.
SHAMPINE_B_HAT = (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)


class RKStep(NamedTuple):
    """One Runge-Kutta step: the new state, the embedded error vector and the 7 stage derivatives."""

    z: torch.Tensor
    error: torch.Tensor
    stages: tuple[torch.Tensor, ...]


def _combine(ks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor | None:
    """sum_i w_i k_i over the non-zero weights (None when all are zero)."""
    out = None
    for k, w in zip(ks, weights):
        if w != 0.0:
            out = k * w if out is None else out + k * w
    return out


def scaled_rms_error(error: torch.Tensor, z: torch.Tensor, z_new: torch.Tensor, rtol: float,
                     atol: float) -> torch.Tensor:
    """EEst = sqrt(mean((error / (atol + rtol * max(|z|, |z_new|)))^2)), a differentiable 0-dim tensor.

    Computed as ||x||_2 / sqrt(n), whose gradient at an exactly zero error (which float32 rounding produces
    for small steps) is 0 instead of the NaN of sqrt at 0.
    """
    scale = atol + rtol * torch.maximum(z.abs(), z_new.abs())
    return torch.linalg.vector_norm(error / scale) / math.sqrt(max(error.numel(), 1))


@dataclass
class ODESolution:
    """The result of :meth:`Dopri5.solve` (scipy's ``solve_ivp`` result, for torch).

    t: the output times (1-D, the state's dtype and device); y: the states at ``t``, shape ``(len(t), *z0.shape)``;
    nfe: evaluations of ``f`` (exact); n_accepted / n_rejected: step counts; accepted_t: the end time of every
    accepted step; step_sizes: their sizes (signed); errors: their local error estimates EEst (a tensor of
    ``n_accepted`` values, differentiable when autograd is on); rejected_errors: the EEst of rejected steps
    (floats); step_y: the states at ``accepted_t`` when ``save_steps=True`` (else None); t0, t1: the interval.
    """

    t: torch.Tensor
    y: torch.Tensor
    nfe: int
    n_accepted: int
    n_rejected: int
    accepted_t: tuple[float, ...]
    step_sizes: tuple[float, ...]
    errors: torch.Tensor
    rejected_errors: tuple[float, ...]
    t0: float
    t1: float
    step_y: tuple[torch.Tensor, ...] | None = None

    @property
    def y_final(self) -> torch.Tensor:
        """The state at the last output time."""
        return self.y[-1]

    @property
    def n_steps(self) -> int:
        """Accepted plus rejected steps."""
        return self.n_accepted + self.n_rejected

    def step_index(self, t: float) -> int:
        """Index of the accepted step whose interval holds ``t`` (the first one for a step boundary)."""
        t = real_scalar("t", t)
        sign = 1.0 if self.t1 >= self.t0 else -1.0
        if not (min(self.t0, self.t1) <= t <= max(self.t0, self.t1)):
            raise ArgumentError(f"t must be in the solved interval [{min(self.t0, self.t1):g}, "
                                f"{max(self.t0, self.t1):g}], got {t!r}")
        for i, end in enumerate(self.accepted_t):
            if sign * (end - t) >= 0:
                return i
        return len(self.accepted_t) - 1


class _Counted:
    """``f`` with a call counter and the time passed as a tensor of the state's dtype and device."""

    def __init__(self, f: ODEFunc) -> None:
        self.f = f
        self.calls = 0

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.f(torch.as_tensor(t, dtype=z.dtype, device=z.device), z)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ArgumentError(f"f(t, z) must return a tensor of the state's shape {tuple(z.shape)}, got {got}")
        return out


class Dopri5:
    """Adaptive Dormand-Prince 5(4) solver with exact NFE counts and local error estimates (``local-reg-node``).

    rtol, atol: tolerances (> 0) of the scaled RMS error norm EEst (see the module docstring).
    max_steps: the budget of steps (accepted + rejected) for one solve; when it runs out the solve raises
    :class:`ODESolverError` naming the time reached, never returns a truncated trajectory.
    safety, min_factor, max_factor: the step-size controller's safety factor and bounds of h_new / h.
    controller: ``"pi"`` (Hairer's DOPRI5: h_new = h * clip(safety * EEst^-(1/5 - 0.75 beta) *
    EEst_prev^beta, min_factor, max_factor), no growth right after a rejection) or ``"i"`` (torchdiffeq's
    dopri5: h_new = h * clip(safety * EEst^-1/5, min_factor, max_factor), never shrinking after an accepted
    step). beta: the PI controller's memory exponent (0.04, Hairer's).
    stop_at_end: clip the last step to land on ``t1`` (True, as DOPRI5/scipy) or step past it and
    interpolate (False, as torchdiffeq). first_step: a fixed first step size instead of the heuristic.
    embedded: the embedded 4th-order weights behind the error estimate: ``"dormand-prince"`` (the 1980 pair,
    as Hairer's DOPRI5, scipy's RK45 and DifferentialEquations.jl's DP5) or ``"shampine"`` (Shampine's
    alternative weights, as torchdiffeq's dopri5).

    Example::

        solver = Dopri5(rtol=1e-5, atol=1e-5)
        sol = solver.solve(lambda t, z: torch.stack([z[1], -z[0]]), torch.tensor([1.0, 0.0]), 0.0, 3.0)
        z_new, err, stages = solver.rk_step(f, z, t=0.0, dt=0.1)   # one step with its error vector
    """

    nfe_per_step = 6  # FSAL: k1 of a step is k7 of the previous one
    nfe_initial = 2  # f(t0, z0) (also k1 of the first step) and one evaluation in the step-size heuristic

    def __init__(self, rtol: float = 1e-6, atol: float = 1e-6, *, max_steps: int = 10_000, safety: float = 0.9,
                 min_factor: float = 0.2, max_factor: float = 10.0, controller: str = "pi", beta: float = 0.04,
                 stop_at_end: bool = True, first_step: float | None = None,
                 embedded: str = "dormand-prince") -> None:
        self.rtol = positive("rtol", rtol, tensor_ok=False)
        self.atol = positive("atol", atol, tensor_ok=False)
        self.max_steps = positive_int("max_steps", max_steps)
        self.safety = real_in("safety", safety, 0.0, 1.0, low_open=True, tensor_ok=False)
        self.min_factor = real_in("min_factor", min_factor, 0.0, 1.0, low_open=True, tensor_ok=False)
        self.max_factor = real_in("max_factor", max_factor, 1.0, None, low_open=True, tensor_ok=False)
        self.controller = choice("controller", controller, ("pi", "i"))
        self.beta = real_in("beta", beta, 0.0, 0.2, high_open=True, tensor_ok=False)
        self.stop_at_end = boolean("stop_at_end", stop_at_end)
        self.first_step = None if first_step is None else positive("first_step", first_step, tensor_ok=False)
        self.embedded = choice("embedded", embedded, ("dormand-prince", "shampine"))
        self.tableau = DOPRI5_TABLEAU if self.embedded == "dormand-prince" else dataclasses.replace(
            DOPRI5_TABLEAU, b_hat=SHAMPINE_B_HAT)
        self._e = self.tableau.e

    @classmethod
    def torchdiffeq_like(cls, rtol: float = 1e-6, atol: float = 1e-6, *, max_steps: int = 10_000) -> "Dopri5":
        """The rules of ``torchdiffeq.odeint(method="dopri5")``: Shampine's error weights, the integral controller,
        stepping past the end: both solvers then take the same steps."""
        return cls(rtol, atol, max_steps=max_steps, controller="i", beta=0.0, stop_at_end=False, embedded="shampine")

    def __repr__(self) -> str:
        return (f"Dopri5(rtol={self.rtol:g}, atol={self.atol:g}, max_steps={self.max_steps}, "
                f"controller={self.controller!r}, stop_at_end={self.stop_at_end}, embedded={self.embedded!r})")

    # ------------------------------------------------------------------------------------------ one step
    def rk_step(self, f: ODEFunc, z: torch.Tensor, t: float, dt: float, f0: torch.Tensor | None = None) -> RKStep:
        """One Dormand-Prince step of size ``dt`` from ``(t, z)``: ``(z_new, error, stages)``.

        ``error = dt * sum_i (b_i - bhat_i) k_i`` (the 5th- minus the 4th-order solution); ``stages`` are
        ``k1..k7`` with ``k7 = f(t + dt, z_new)``. ``f0`` reuses a known ``f(t, z)`` as ``k1`` (6 evaluations
        instead of 7). Differentiable in ``z``, in ``f``'s parameters and in ``f0``; ``t`` and ``dt`` are numbers.
        """
        tensor("z", z, floating=True)
        t = real_scalar("t", t)
        dt = real_scalar("dt", dt)
        if dt == 0.0:
            raise ArgumentError("dt must be non-zero, got 0.0")
        fc = f if isinstance(f, _Counted) else _Counted(f)
        return self._step(fc, z, t, dt, fc(t, z) if f0 is None else f0)

    def _step(self, f: _Counted, z: torch.Tensor, t: float, dt: float, k1: torch.Tensor) -> RKStep:
        tab = self.tableau
        ks = [k1]
        for i in range(1, 6):
            zi = z + dt * _combine(ks, tab.a[i])
            ks.append(f(t + tab.c[i] * dt, zi))
        z_new = z + dt * _combine(ks, tab.a[6])
        ks.append(f(t + dt, z_new))
        error = dt * _combine(ks, self._e)
        return RKStep(z_new, error, tuple(ks))

    def stage_state(self, z: torch.Tensor, dt: float, stages: Sequence[torch.Tensor], i: int) -> torch.Tensor:
        """The state at which stage ``i`` (1-based, 2..7) is evaluated: z + dt * sum_j a_ij k_j."""
        i = int(i)
        if not 2 <= i <= 7:
            raise ArgumentError(f"i must be a stage index in [2, 7], got {i}")
        return z + dt * _combine(stages, self.tableau.a[i - 1])

    def error_estimate(self, step: RKStep, z: torch.Tensor) -> torch.Tensor:
        """EEst of a step from ``z`` (its scaled RMS error norm with this solver's tolerances)."""
        return scaled_rms_error(step.error, z, step.z, self.rtol, self.atol)

    # ------------------------------------------------------------------------------------------ step sizes
    @torch.no_grad()
    def initial_dt(self, f: ODEFunc, z: torch.Tensor, t: float, f0: torch.Tensor | None = None,
                   direction: float = 1.0) -> float:
        """Hairer's initial step size (Solving ODEs I, II.4): 2 evaluations of ``f`` (1 when ``f0`` is given).

        d0 = ||z / s||, d1 = ||f0 / s|| with s = atol + rtol |z| (RMS norms); h0 = 0.01 d0 / d1 (1e-6 when
        either is < 1e-5); d2 = ||f(t + h0, z + h0 f0) - f0|| / s / h0; h1 = (0.01 / max(d1, d2))^(1/5);
        returns min(100 h0, h1) (positive; ``direction`` = -1 integrates backwards).
        """
        tensor("z", z, floating=True)
        t = real_scalar("t", t)
        fc = f if isinstance(f, _Counted) else _Counted(f)
        if f0 is None:
            f0 = fc(t, z)
        z, f0 = z.detach(), f0.detach()
        scale = self.atol + self.rtol * z.abs()
        d0 = float((z / scale).square().mean().sqrt())
        d1 = float((f0 / scale).square().mean().sqrt())
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        f1 = fc(t + direction * h0, z + direction * h0 * f0)
        d2 = float(((f1.detach() - f0) / scale).square().mean().sqrt()) / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / self.tableau.order)
        h = min(100.0 * h0, h1)
        if not math.isfinite(h) or h <= 0.0:
            raise ODESolverError(f"the initial step size is {h!r} at t={t:g}: the state or f(t, z) is not finite")
        return h

    def _next_dt(self, h: float, eest: float, accepted: bool, prev_eest: float, after_reject: bool) -> float:
        """The controller: the size of the next step after one of size ``h`` with error ``eest``."""
        if self.controller == "i":
            if eest == 0.0:
                return h * self.max_factor
            factor = min(self.max_factor, max(self.safety * eest ** (-1.0 / self.tableau.order), self.min_factor))
            if accepted and eest < 1.0:
                factor = max(factor, 1.0)
            return h * factor
        expo = 1.0 / self.tableau.order - 0.75 * self.beta
        e = max(eest, 1e-10)
        if accepted:
            factor = self.safety * e ** (-expo) * prev_eest ** self.beta
            factor = min(self.max_factor, max(self.min_factor, factor))
            if after_reject:
                factor = min(factor, 1.0)
        else:
            factor = max(self.min_factor, self.safety * e ** (-expo))
        return h * factor

    # ------------------------------------------------------------------------------------------ solve
    def solve(self, f: ODEFunc, z0: torch.Tensor, t0: float, t1: float, saveat: Any = None, *,
              save_steps: bool = False) -> ODESolution:
        """Integrate ``dz/dt = f(t, z)`` from ``z(t0) = z0`` to ``t1``.

        f: ``f(t, z) -> dz/dt`` with ``t`` a 0-dim tensor of ``z0``'s dtype/device (a module or any callable).
        saveat: output times in [t0, t1], ordered from t0 towards t1 (default: ``(t0, t1)``); states between
        step ends come from the dense output. save_steps: also keep the state at every accepted step end.
        Raises :class:`ODESolverError` when ``max_steps`` steps do not reach ``t1`` (naming the time reached),
        when the step size underflows or when the state or the error estimate becomes non-finite.
        """
        tensor("z0", z0, floating=True, finite=True)
        t0 = real_scalar("t0", t0)
        t1 = real_scalar("t1", t1)
        if t1 == t0:
            raise ArgumentError(f"t1 must differ from t0, got t0 = t1 = {t0!r}")
        save_steps = boolean("save_steps", save_steps)
        out_t = self.output_times(saveat, t0, t1)
        direction = 1.0 if t1 > t0 else -1.0
        fc = _Counted(f)

        t, z = t0, z0
        k1 = fc(t, z)
        h = self.first_step if self.first_step is not None else self.initial_dt(fc, z, t, f0=k1, direction=direction)
        outputs: list[torch.Tensor | None] = [None] * len(out_t)
        nxt = 0
        while nxt < len(out_t) and out_t[nxt] == t0:
            outputs[nxt] = z0
            nxt += 1
        accepted_t: list[float] = []
        sizes: list[float] = []
        errors: list[torch.Tensor] = []
        rejected: list[float] = []
        step_y: list[torch.Tensor] = []
        prev_eest, after_reject, steps = 1e-4, False, 0
        while direction * (t1 - t) > 0:
            if steps >= self.max_steps:
                raise ODESolverError(
                    f"Dopri5: max_steps={self.max_steps} exhausted ({len(accepted_t)} accepted, {len(rejected)} "
                    f"rejected) at t={t:.6g}, before reaching t1={t1:.6g} (last step size {h:.3g}, "
                    f"rtol={self.rtol:g}, atol={self.atol:g}); raise max_steps or loosen the tolerances")
            last = False
            if self.stop_at_end and direction * (t + 1.01 * direction * h - t1) >= 0:
                h, last = abs(t1 - t), True
            dt = direction * h
            t_new = t1 if last else t + dt
            if t_new == t:
                raise ODESolverError(f"Dopri5: step size underflow at t={t:.17g} (h={h:.3g}) before reaching "
                                     f"t1={t1:.6g}; the problem may be stiff or the tolerances too tight")
            step = self._step(fc, z, t, dt, k1)
            eest_t = self.error_estimate(step, z)
            eest = float(eest_t.detach())
            steps += 1
            if not math.isfinite(eest):
                raise ODESolverError(f"Dopri5: non-finite state or error estimate in the step from t={t:.6g} "
                                     f"(h={h:.3g}); f(t, z) overflowed or returned NaN")
            if eest <= 1.0:
                # outputs inside (t, t_new]: dense output (the step end itself when it is an output time)
                while nxt < len(out_t) and direction * (out_t[nxt] - t_new) <= 0:
                    ot = out_t[nxt]
                    outputs[nxt] = step.z if ot == t_new else self._dense(z, step, dt, (ot - t) / dt)
                    nxt += 1
                h_next = self._next_dt(h, eest, True, prev_eest, after_reject)
                prev_eest, after_reject = max(eest, 1e-4), False
                accepted_t.append(t_new)
                sizes.append(dt)
                errors.append(eest_t)
                if save_steps:
                    step_y.append(step.z)
                t, z, k1 = t_new, step.z, step.stages[-1]
            else:
                h_next = self._next_dt(h, eest, False, prev_eest, after_reject)
                after_reject = True
                rejected.append(eest)
            h = h_next
        ref = z0
        return ODESolution(
            t=torch.tensor(out_t, dtype=ref.dtype, device=ref.device),
            y=torch.stack(outputs),
            nfe=fc.calls,
            n_accepted=len(accepted_t),
            n_rejected=len(rejected),
            accepted_t=tuple(accepted_t),
            step_sizes=tuple(sizes),
            errors=torch.stack(errors) if errors else ref.new_zeros(0),
            rejected_errors=tuple(rejected),
            t0=t0,
            t1=t1,
            step_y=tuple(step_y) if save_steps else None,
        )

    def _dense(self, z: torch.Tensor, step: RKStep, dt: float, theta: float) -> torch.Tensor:
        """Hairer's 4th-order continuous extension at ``t + theta dt`` (theta in [0, 1])."""
        ks = step.stages
        r2 = step.z - z
        r3 = dt * ks[0] - r2
        r4 = r2 - dt * ks[-1] - r3
        r5 = dt * _combine(ks, self.tableau.d)
        return z + theta * (r2 + (1.0 - theta) * (r3 + theta * (r4 + (1.0 - theta) * r5)))

    @staticmethod
    def output_times(saveat: Any, t0: float, t1: float) -> list[float]:
        """``saveat`` checked and converted to a list of floats in [t0, t1], ordered from t0 towards t1
        (``None``: ``[t0, t1]``); raises :class:`~gradkit._validate.ArgumentError` naming the bad entry."""
        if saveat is None:
            return [t0, t1]
        if isinstance(saveat, torch.Tensor):
            if saveat.dim() > 1 or saveat.is_complex() or not (saveat.is_floating_point() or saveat.dtype in (
                    torch.int32, torch.int64)):
                raise ArgumentError(f"saveat must be a 1-D sequence of real times, got a tensor of shape "
                                    f"{tuple(saveat.shape)} and dtype {saveat.dtype}")
            values = [float(v) for v in saveat.detach().reshape(-1).cpu().tolist()]
        else:
            try:
                values = [real_scalar("saveat[i]", v) for v in saveat]
            except TypeError:
                raise ArgumentError(f"saveat must be a 1-D sequence of real times or None, got "
                                    f"{type(saveat).__name__}") from None
        if not values:
            raise ArgumentError("saveat must hold at least one time, got an empty sequence")
        lo, hi = min(t0, t1), max(t0, t1)
        sign = 1.0 if t1 > t0 else -1.0
        for i, v in enumerate(values):
            if not (math.isfinite(v) and lo <= v <= hi):
                raise ArgumentError(f"saveat[{i}] must be in [{lo:g}, {hi:g}] (between t0 and t1), got {v!r}")
            if i and sign * (v - values[i - 1]) < 0:
                raise ArgumentError(f"saveat must run from t0 towards t1 (non-decreasing in that direction), got "
                                    f"saveat[{i - 1}]={values[i - 1]!r} then saveat[{i}]={v!r}")
        return values
