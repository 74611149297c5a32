"""Benchmark: the implicit (IFT) backward of the NLLS layer vs the backward through 100 unrolled
Levenberg-Marquardt iterations (paper slug: pihc-moe).

The problem is one hard-constraint solve of the claim's size: 16 rows (4 instances x 4 experts), N = 8 bases,
a diffusion-sorption PDE residual at 256 sampled points plus 32 initial-condition rows and a ridge term, in
float64. Both graphs are built once (100 LM iterations each; the unrolled one keeps every iteration); a step is
one backward pass (``retain_graph``) into the basis terms. A second benchmark times forward + backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...data.diffusion_sorption import diffusion_sorption_residual
from ...functional.implicit_nlls import implicit_nlls, unrolled_nlls

ROWS, POINTS, N, IC_ROWS, ITERS = 16, 256, 8, 32, 100


def _residual(w: Tensor, u: Tensor, u_t: Tensor, u_xx: Tensor, ic: Tensor, u0: Tensor) -> Tensor:
    c = [(t @ w.unsqueeze(-1)).squeeze(-1) for t in (u, u_t, u_xx, ic)]
    return torch.cat([diffusion_sorption_residual(c[0], c[1], c[2]), c[3] - u0], dim=-1)


def _problem() -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    u = (0.1 * torch.rand(ROWS, POINTS, N, generator=g, dtype=dt)).requires_grad_(True)
    u_t = (1e-3 * torch.randn(ROWS, POINTS, N, generator=g, dtype=dt)).requires_grad_(True)
    u_xx = torch.randn(ROWS, POINTS, N, generator=g, dtype=dt).requires_grad_(True)
    ic = (0.1 * torch.rand(ROWS, IC_ROWS, N, generator=g, dtype=dt)).requires_grad_(True)
    u0 = 0.2 * torch.rand(ROWS, IC_ROWS, generator=g, dtype=dt)
    return [u, u_t, u_xx, ic, u0], torch.ones(ROWS, N, dtype=dt)


def _solve(unrolled: bool):
    theta, w0 = _problem()
    if unrolled:
        return unrolled_nlls(_residual, w0, *theta, iters=ITERS, ridge=1e-4), theta
    return implicit_nlls(_residual, w0, *theta, iters=ITERS, ridge=1e-4, gtol=1e-300), theta


def _backward_only(repeats: int) -> BenchResult:
    (w_u, th_u), (w_i, th_i) = _solve(True), _solve(False)
    wanted_u, wanted_i = th_u[:4], th_i[:4]

    def unrolled() -> None:
        torch.autograd.grad(w_u.sum(), wanted_u, retain_graph=True)

    def implicit() -> None:
        torch.autograd.grad(w_i.sum(), wanted_i, retain_graph=True)

    res = compare_steps(unrolled, implicit, repeats=repeats, warmup=2)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"rows": ROWS, "points": POINTS, "bases": N, "lm_iterations": ITERS,
                              "max_abs_solution_gap": float((w_u - w_i).detach().abs().max())})


def _forward_backward(repeats: int) -> BenchResult:
    def step(unrolled: bool):
        def run() -> None:
            w, theta = _solve(unrolled)
            torch.autograd.grad(w.sum(), theta[:4])
        return run

    res = compare_steps(step(True), step(False), repeats=repeats, warmup=1)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"lm_iterations": ITERS})


register_benchmark(Benchmark(
    name="pihc-moe-ift-backward",
    slug="pihc-moe",
    description=f"NLLS layer backward, {ROWS} rows x N={N}, {POINTS} PDE + {IC_ROWS} IC rows: implicit-function "
                f"backward vs backward through {ITERS} unrolled LM iterations",
    target=0.2,
    baseline=f"autograd through {ITERS} unrolled LM iterations",
    run=_backward_only,
))

register_benchmark(Benchmark(
    name="pihc-moe-ift-forward-backward",
    slug="pihc-moe",
    description=f"NLLS layer forward ({ITERS} LM iterations) + backward: implicit layer vs the unrolled solve",
    target=None,
    baseline=f"autograd through {ITERS} unrolled LM iterations",
    run=_forward_backward,
))
