"""A neural ODE block solved by the in-library Dormand-Prince solver, with local or global error
regularisation (paper slug: ``local-reg-node``).

    z(t1) = z(t0) + int_{t0}^{t1} func(t, z(t)) dt                      (adaptive dopri5, backprop through steps)
    training: loss = task_loss + w_reg * R
      R = EEst(tau) * dt(tau), tau ~ U(t0, t1), z(tau) from the same solve  regularize="unbiased"
      R = the same at tau drawn from the solver's accepted step ends        regularize="biased"
      R = sum_j EEst_j * dt_j over every accepted step (ERNODE)            regularize="global"

The module returns ``(z(t1), R)`` in training mode and ``(z(t1), None)`` in eval mode (no regulariser step,
so NFE measured in eval mode is the cost of prediction alone). ``last_nfe`` holds the evaluations of ``func``
in the last forward, the regulariser's step included; ``last_solution`` the solver's result.

Example::

    field = Autonomous(nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)))   # f(t, z) = net(z)
    node = NeuralODE(field, regularize="unbiased", solver=Dopri5(rtol=1e-6, atol=1e-6))
    z1, reg = node(z0); loss = mse(z1, target) + 2.5 * reg
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .._validate import ArgumentError, boolean, choice, optional_generator, real_scalar, tensor
from .local_reg import LocalErrorRegularizer, global_error_regularizer
from .ode import Dopri5, ODESolution

__all__ = ["NeuralODE", "Autonomous", "REGULARIZERS"]

REGULARIZERS = (None, "unbiased", "biased", "global")


class Autonomous(nn.Module):
    """An autonomous vector field ``f(t, z) = net(z)`` from any module ``net`` (``local-reg-node``).

    Example: ``NeuralODE(Autonomous(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))))``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ArgumentError(f"net must be an nn.Module, got {type(net).__name__}")
        self.net = net

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class NeuralODE(nn.Module):
    """``z0 -> z(t1)`` of ``dz/dt = func(t, z)``, optionally regularised by solver error estimates (``local-reg-node``).

    func: ``func(t, z) -> dz/dt`` (an ``nn.Module`` is registered as a submodule). t_span: ``(t0, t1)``.
    solver: a :class:`~gradkit.solvers.ode.Dopri5` (default ``Dopri5(rtol=1e-6, atol=1e-6)``).
    regularize: None, ``"unbiased"``, ``"biased"`` (local, one step at a random time) or ``"global"`` (ERNODE).
    kind: ``"error"`` or ``"stiffness"`` for the local regularisers. step_size: the local step's size,
    ``"heuristic"`` (a fresh integrator's initial step, as the official code) or ``"solver"`` (the size of the
    main solve's step at tau). detach_state: z(tau) is a constant for the local regulariser.
    generator: a ``torch.Generator`` for tau (default: the global RNG).

    Example::

        node = NeuralODE(Autonomous(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))),
                         regularize="unbiased")
        z1, reg = node(z0)                      # training mode: reg is a 0-dim tensor
        node.eval(); z1, none = node(z0)        # eval mode: no regulariser step; node.last_nfe is the solve's NFE
    """

    def __init__(self, func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], t_span: Any = (0.0, 1.0),
                 solver: Dopri5 | None = None, regularize: str | None = None, *, kind: str = "error",
                 step_size: str = "heuristic", detach_state: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not callable(func):
            raise ArgumentError(f"func must be callable as func(t, z), got {type(func).__name__}")
        self.func = func
        try:
            t0, t1 = t_span
        except (TypeError, ValueError):
            raise ArgumentError(f"t_span must be a pair (t0, t1), got {t_span!r}") from None
        self.t0, self.t1 = real_scalar("t_span[0]", t0), real_scalar("t_span[1]", t1)
        if self.t0 == self.t1:
            raise ArgumentError(f"t_span must have t0 != t1, got {t_span!r}")
        if solver is None:
            solver = Dopri5()
        if not isinstance(solver, Dopri5):
            raise ArgumentError(f"solver must be a gradkit.solvers.ode.Dopri5, got {type(solver).__name__}")
        self.solver = solver
        self.regularize = choice("regularize", regularize, REGULARIZERS)
        self.kind = choice("kind", kind, ("error", "stiffness"))
        if self.regularize == "global" and self.kind != "error":
            raise ArgumentError(f"kind must be 'error' with regularize='global', got {kind!r}")
        self.step_size = choice("step_size", step_size, ("heuristic", "solver"))
        self.detach_state = boolean("detach_state", detach_state)
        self.generator = optional_generator(generator)
        self.regularizer = LocalErrorRegularizer(solver, kind=self.kind, detach_state=self.detach_state)
        self.last_solution: ODESolution | None = None
        self.last_nfe = 0
        self.last_tau: float | None = None

    def extra_repr(self) -> str:
        return (f"t_span=({self.t0:g}, {self.t1:g}), solver={self.solver!r}, regularize={self.regularize!r}, "
                f"kind={self.kind!r}")

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def forward(self, z0: torch.Tensor, saveat: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z(t1), R)`` in training mode with a regulariser, else ``(z(t1), None)``.

        saveat: output times in ``t_span`` (ordered from t0 to t1); then the first element is the trajectory at
        those times, shape ``(len(saveat), *z0.shape)``. The unbiased regulariser's tau is inserted into the
        solve's output times and removed again, so the outputs (and the steps taken) do not depend on it.
        """
        tensor("z0", z0, floating=True)
        mode = self.regularize if self.training else None
        solver, f = self.solver, self.func
        times = [self.t1] if saveat is None else solver.output_times(saveat, self.t0, self.t1)
        self.last_tau = None
        if mode == "unbiased":
            tau = self.t0 + self._uniform() * (self.t1 - self.t0)
            sign = 1.0 if self.t1 > self.t0 else -1.0
            at = next((i for i, v in enumerate(times) if sign * (v - tau) > 0), len(times))
            sol = solver.solve(f, z0, self.t0, self.t1, saveat=times[:at] + [tau] + times[at:])
            z_tau = sol.y[at]
            ys = torch.cat([sol.y[:at], sol.y[at + 1:]])
        else:
            sol = solver.solve(f, z0, self.t0, self.t1, saveat=times, save_steps=mode == "biased")
            ys = sol.y
        self.last_solution, self.last_nfe = sol, sol.nfe
        out = ys[-1] if saveat is None else ys
        if mode is None:
            return out, None
        if mode == "global":
            return out, global_error_regularizer(sol)
        if mode == "biased":
            j = min(int(self._uniform() * sol.n_accepted), sol.n_accepted - 1)
            tau, z_tau = sol.accepted_t[j], sol.step_y[j]
            dt = sol.step_sizes[min(j + 1, sol.n_accepted - 1)] if self.step_size == "solver" else None
        else:
            dt = sol.step_sizes[sol.step_index(tau)] if self.step_size == "solver" else None
        step = self.regularizer.step(f, z_tau, tau, dt)
        self.last_nfe += step.nfe
        self.last_tau = tau
        return out, step.value
