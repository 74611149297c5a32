"""Benchmark: the ADMM iteration's cost and its growth with the number of patterns P (paper slug: convex-relu).

``convex-relu-admm-iteration``: one iteration of :func:`admm_convex_relu` with the Cholesky factor of the
2dP x 2dP system computed once (two triangular solves plus block products with F and G: the paper's
``O((dP)^2 + n d P)``) against plain PyTorch solving the same system at every iteration
(``torch.linalg.solve``: ``O((dP)^3)``). Breast-cancer-sized data (n = 398, d = 31) at P = 12, 25, 50; the
ratio is reported at the largest P, and the growth exponent of each (the slope of log time against log dP over
the three sizes) against the paper's stated order 2 (3 for the re-solve).
"""
from __future__ import annotations

import math

import torch

from ...solvers.convex_relu import ConvexReLUProblem, admm_convex_relu
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark

SIZES = (12, 25, 50)  # patterns P
N, DIM, RHO, ITERS = 398, 31, 1.0, 3


def _problem(P: int, n: int, d: int) -> ConvexReLUProblem:
    g = torch.Generator().manual_seed(P)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64).sign()
    pats = (X @ torch.randn(d, P, generator=g, dtype=torch.float64) >= 0).T  # P distinct rows almost surely
    return ConvexReLUProblem(X, y, pats, beta=0.4)


def _slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def iteration_times(sizes=SIZES, n: int = N, d: int = DIM, repeats: int = 10) -> dict:
    """Seconds per ADMM iteration (factor cached) and per re-solved u-update at each P, with growth exponents."""
    cached, resolve = [], []
    for P in sizes:
        prob = _problem(P, n, d)
        prob.factor(RHO)  # once, outside the timing
        H = prob.system_matrix(RHO)
        rhs = torch.randn(H.shape[0], 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        res = compare_steps(lambda: torch.linalg.solve(H, rhs),
                            lambda: admm_convex_relu(prob, rho=RHO, max_iter=ITERS, tol=1e-300, record_objective=False),
                            repeats=repeats, warmup=1)
        resolve.append(res.baseline_s)
        cached.append(res.candidate_s / ITERS)
    dims = [2 * d * P for P in sizes]
    return {"sizes": list(sizes), "cached_s": cached, "resolve_s": resolve,
            "cached_exponent": _slope(dims, cached), "resolve_exponent": _slope(dims, resolve)}


def _run(repeats: int) -> BenchResult:
    t = iteration_times(repeats=repeats)
    return BenchResult(t["resolve_s"][-1], t["cached_s"][-1], extra={
        "n": N, "d": DIM, "patterns": t["sizes"], "unknowns_2dP": [2 * DIM * P for P in t["sizes"]],
        "ms_per_iteration": [round(1e3 * s, 3) for s in t["cached_s"]],
        "ms_per_resolve": [round(1e3 * s, 3) for s in t["resolve_s"]],
        "growth_exponent": round(t["cached_exponent"], 2), "resolve_growth_exponent": round(t["resolve_exponent"], 2),
        "paper_order": 2})


register_benchmark(Benchmark(
    name="convex-relu-admm-iteration",
    slug="convex-relu",
    description=f"ADMM iteration with the factor cached (n={N}, d={DIM}, P={SIZES[-1]}, 2dP={2 * DIM * SIZES[-1]}) vs "
                "solving the 2dP system at every iteration; growth exponent in dP over P = "
                + ", ".join(map(str, SIZES)),
    target=None,
    baseline="torch.linalg.solve of the ADMM system per iteration",
    run=_run,
))
