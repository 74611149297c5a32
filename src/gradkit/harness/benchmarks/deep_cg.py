"""Benchmark: one deep-conjugate-direction iteration vs one CG iteration (paper slug: deep-cg).

The 2-D Dirichlet Poisson system at N = 128 (n = 16384), one smooth right-hand side, float64 outer loops.
Baseline: :func:`gradkit.solvers.krylov.cg` (one sparse product and a few vector updates per iteration).
Candidate: :func:`gradkit.solvers.deep_cg.dcdm` with the paper's 2-D network (16 channels, float32), k = 2,
``r = b - A x`` recomputed each step as in the paper: one network forward, two sparse products and the
A-orthogonalisation per iteration. Both run a fixed ITERS iterations (an unreachable tolerance), so the
ratio is the per-iteration cost. DCDM is faster in wall-clock only when the ratio is below CG's iteration
count over DCDM's (the claim ``gradkit run deep-cg`` measures both counts): ``extra`` records CG's count here.
"""
from __future__ import annotations

import torch

from ...data.poisson2d import poisson2d, smooth_random_rhs
from ...nn.deep_cg import DCDMNet2d
from ...solvers.deep_cg import dcdm
from ...solvers.krylov import cg
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark

N = 128
ITERS = 10


def _run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    A = poisson2d(N)
    b = smooth_random_rhs(N, 1, generator=torch.Generator().manual_seed(0))[:, 0]
    net = DCDMNet2d(channels=16).eval()

    def base() -> None:
        cg(A, b, tol=1e-300, maxiter=ITERS, check=False)

    def cand() -> None:
        dcdm(A, b, net, k=2, tol=1e-300, maxiter=ITERS, grid=(N, N), check=False)

    res = compare_steps(base, cand, repeats=repeats, warmup=2)
    cg_iters = cg(A, b, tol=1e-6).iterations
    return BenchResult(res.baseline_s / ITERS, res.candidate_s / ITERS,
                       extra={"N": N, "n": N * N, "iterations_timed": ITERS, "channels": 16,
                              "cg_iterations_to_1e-6": cg_iters,
                              "note": "DCDM wins wall-clock only if this ratio < cg iterations / dcdm iterations"})


register_benchmark(Benchmark(
    name="deep-cg-iteration-n128",
    slug="deep-cg",
    description=f"one DCDM iteration (2-D network forward + 2 sparse products + k=2 A-orthogonalisation) vs one "
                f"CG iteration, 2-D Poisson N={N} (n={N * N}), float64 outer loop",
    target=None,
    baseline="CG iteration (gradkit.solvers.krylov.cg)",
    run=_run,
))
