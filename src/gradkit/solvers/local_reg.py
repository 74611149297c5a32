"""Local regularisation of a neural ODE: the error estimate of one solver step at a random time
(paper slug: ``local-reg-node``).

Pal, Edelman, Rackauckas (ICML 2023): instead of summing the solver's local error estimates over every step
(ERNODE, the "global" regulariser, which needs gradients through the whole solve), take ONE extra
Dormand-Prince step from the state ``z(tau)`` at a random time ``tau`` and penalise its error estimate::

    k1..k7 = the stages of one step of size dt from (tau, z(tau))  (dt: the solver's initial-step heuristic)
    EEst   = sqrt(mean((dt * sum_i (b_i - bhat_i) k_i / (atol + rtol * max(|z(tau)|, |z_new|)))^2))
    R_E    = EEst * dt                                  kind="error"
    R_S    = rms(k7 - k6) / (rms(z_new - g6) + eps) / 3.3066   kind="stiffness" (g6: the 6th stage's state)
    R_glob = sum_j EEst_j * dt_j over the accepted steps of the solve   (global_error_regularizer)

``z(tau)`` and ``dt`` are constants for the regulariser (``detach_state=True``, as the official code), so its
gradient flows only through the evaluations of ``f`` in that one step: 8 extra evaluations (7 stages, the
heuristic's one), whatever the main solve's adjoint or step count.

Example::

    reg = LocalErrorRegularizer(Dopri5(rtol=1e-6, atol=1e-6))
    r = reg(func, z_tau, tau)            # a 0-dim tensor; loss = task_loss + w * r
    r_glob = global_error_regularizer(solver.solve(func, z0, 0.0, 1.0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validate import ArgumentError, boolean, choice, positive, real_scalar, tensor
from .ode import Dopri5, ODEFunc, ODESolution

__all__ = ["LocalErrorRegularizer", "LocalStep", "global_error_regularizer", "DOPRI5_STABILITY_SIZE"]

# Where dopri5's stability region meets the negative real axis: |R(-3.3066)| = 1 for its stability
# polynomial R (Tsit5's, in the official code, is 3.5068).
DOPRI5_STABILITY_SIZE = 3.3066


@dataclass(frozen=True)
class LocalStep:
    """One regulariser step: its value (differentiable), EEst, the step size, the time and the evaluations of ``f``."""

    value: torch.Tensor
    eest: torch.Tensor
    dt: float
    tau: float
    nfe: int


class LocalErrorRegularizer:
    """The local error (or stiffness) estimate of one solver step from ``(tau, z(tau))`` (``local-reg-node``).

    solver: the :class:`~gradkit.solvers.ode.Dopri5` whose tolerances the main solve uses (the step must use
    the same ones). kind: ``"error"`` (R_E = EEst * dt) or ``"stiffness"`` (R_S, not multiplied by dt).
    detach_state: treat ``z(tau)`` as a constant (gradients reach only ``f``'s parameters); False lets the
    gradient also flow into ``z(tau)`` and through it into the main solve. stability_size: the divisor of R_S.
    eps: added to the denominator of R_S.

    Example::

        reg = LocalErrorRegularizer(Dopri5(rtol=1e-6, atol=1e-6))
        step = reg.step(func, z_tau, tau=0.3)      # step.value, step.eest, step.dt, step.nfe (= 8)
        loss = task_loss + w_reg * reg(func, z_tau, 0.3)
    """

    def __init__(self, solver: Dopri5 | None = None, *, kind: str = "error", detach_state: bool = True,
                 stability_size: float = DOPRI5_STABILITY_SIZE, eps: float = 1e-8) -> None:
        if solver is None:
            solver = Dopri5()
        if not isinstance(solver, Dopri5):
            raise ArgumentError(f"solver must be a gradkit.solvers.ode.Dopri5, got {type(solver).__name__}")
        self.solver = solver
        self.kind = choice("kind", kind, ("error", "stiffness"))
        self.detach_state = boolean("detach_state", detach_state)
        self.stability_size = positive("stability_size", stability_size, tensor_ok=False)
        self.eps = positive("eps", eps, tensor_ok=False)

    def __repr__(self) -> str:
        return f"LocalErrorRegularizer({self.solver!r}, kind={self.kind!r}, detach_state={self.detach_state})"

    def step(self, f: ODEFunc, z: torch.Tensor, tau: float, dt: float | None = None) -> LocalStep:
        """Take the regulariser's step from ``(tau, z)``; ``dt`` None: the solver's initial-step heuristic
        (as a fresh integrator would, 8 evaluations of ``f``), else that step size (7 evaluations)."""
        tensor("z", z, floating=True, finite=True)
        tau = real_scalar("tau", tau)
        if self.detach_state:
            z = z.detach()
        calls = [0]

        def counted(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return f(t, x)

        k1 = counted(torch.as_tensor(tau, dtype=z.dtype, device=z.device), z)
        if dt is None:
            dt = self.solver.initial_dt(counted, z, tau, f0=k1)
        else:
            dt = real_scalar("dt", dt)
            if dt == 0.0:
                raise ArgumentError("dt must be non-zero, got 0.0")
        s = self.solver.rk_step(counted, z, tau, dt, f0=k1)
        eest = self.solver.error_estimate(s, z)
        if self.kind == "error":
            value = eest * abs(dt)
        else:
            g6 = self.solver.stage_state(z, dt, s.stages, 6)
            n = math.sqrt(max(z.numel(), 1))
            num = torch.linalg.vector_norm(s.stages[6] - s.stages[5]) / n   # RMS, with a zero gradient at 0
            den = torch.linalg.vector_norm(s.z - g6) / n + self.eps
            value = num / den / self.stability_size
        return LocalStep(value=value, eest=eest, dt=float(dt), tau=tau, nfe=calls[0])

    def __call__(self, f: ODEFunc, z: torch.Tensor, tau: float, dt: float | None = None) -> torch.Tensor:
        """The regulariser's value (a differentiable 0-dim tensor); see :meth:`step`."""
        return self.step(f, z, tau, dt).value


def global_error_regularizer(solution: ODESolution) -> torch.Tensor:
    """ERNODE's global regulariser: sum_j EEst_j * |dt_j| over the accepted steps of a solve (``local-reg-node``).

    Differentiable through every step of the solve (backprop through the solver). Example::

        sol = Dopri5(rtol=1e-6, atol=1e-6).solve(func, z0, 0.0, 1.0)
        loss = task_loss + w_reg * global_error_regularizer(sol)
    """
    if not isinstance(solution, ODESolution):
        raise ArgumentError(f"solution must be an ODESolution, got {type(solution).__name__}")
    dts = torch.tensor([abs(h) for h in solution.step_sizes], dtype=solution.errors.dtype,
                       device=solution.errors.device)
    return (solution.errors * dts).sum()
