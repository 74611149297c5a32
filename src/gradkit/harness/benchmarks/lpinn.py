"""Benchmark: one LPINN training step vs one Eulerian PINN step on the same collocation grid (paper slug: lpinn).

The step is the full-batch loss (residuals by autograd with create_graph, the initial condition), backward
and an Adam (amsgrad) update. The LPINN evaluates two branches, the X-branch's time derivative and one
more forward at t = 0; the PINN one network with u_t and u_x. Two shapes: the claim's quick setting
(64 x 32 grid, width 32, 3 layers) and the paper's (256 x 100 grid, width 50, u: 5 layers, X: 2 layers).
The paper makes no cost claim: the ratio is reported (no target) beside the claim's accuracy gap.
"""
from __future__ import annotations

import math

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...solvers.lpinn import LagrangianPINN, PeriodicMLP, lpinn_loss, pinn_loss

C = 30.0
SHAPES = {"quick": (64, 32, 32, 3, 2), "paper": (256, 100, 50, 5, 2)}  # n_xi, n_t, width, depth_u, depth_x


def _step(model, loss_fn):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model).total.backward()
        opt.step()

    return step


def _runner(shape: str):
    n_xi, n_t, width, depth_u, depth_x = SHAPES[shape]

    def run(repeats: int) -> BenchResult:
        torch.manual_seed(0)
        xi, t = torch.linspace(0, 2 * math.pi, n_xi), torch.linspace(0, 1, n_t)
        pinn = _step(PeriodicMLP(width, depth_u), lambda m: pinn_loss(m, xi, t, torch.sin, flux=C))
        lpinn = _step(LagrangianPINN(width, depth_u, depth_x), lambda m: lpinn_loss(m, xi, t, torch.sin, flux=C))
        res = compare_steps(pinn, lpinn, repeats=repeats, warmup=3)
        return BenchResult(res.baseline_s, res.candidate_s,
                           extra={"grid": [n_xi, n_t], "width": width, "depth_u": depth_u, "depth_x": depth_x})

    return run


for _shape, (_n, _m, _w, _du, _dx) in SHAPES.items():
    register_benchmark(Benchmark(
        name=f"lpinn-step-{_shape}",
        slug="lpinn",
        description=f"full-batch training step on a {_n} x {_m} collocation grid: LPINN (width {_w}, u {_du} / "
                    f"X {_dx} tanh layers) vs the Eulerian PINN (width {_w}, {_du} layers), Adam",
        target=None,
        baseline="Eulerian PINN step (plain autograd)",
        run=_runner(_shape),
    ))
