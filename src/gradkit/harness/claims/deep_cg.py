"""Deep conjugate direction method claim: iterations to 1e-6 vs CG on the 2-D Poisson problem (paper slug: deep-cg).

Kaneda et al., "A Deep Conjugate Direction Method for Iteratively Solving Linear Systems" (ICML 2023, arXiv
2205.10763). Problem: the Dirichlet 5-point Laplacian on N x N grids (:func:`gradkit.data.poisson2d.poisson2d`),
N in train_n * {1, 2, 4} (quick: 32, 64, 128). Test right-hand sides: ``n_rhs`` smooth random fields (spectral
decay k^-2) plus 0.1 x white noise, unit norm, fixed across seeds; the same arrays go to every solver.
Every solver starts at x0 = 0 and stops on the unpreconditioned true residual ``||b - A x|| <= tol ||b||``.

Arms:
- ``dcdm``: :class:`gradkit.nn.deep_cg.DCDMNet2d` (the paper's network in 2-D) trained at N = train_n only with
  the scale-invariant residual loss on Ritz right-hand sides (exact eigenvectors, lowest m/2 + theta boosted x9),
  Adam; then :func:`gradkit.solvers.deep_cg.dcdm` (k = 2, float64 outer loop, float32 network) unchanged on every
  grid (fully convolutional);
- ``cg``: ``scipy.sparse.linalg.cg``; ``ic0_pcg``: scipy's cg with the in-library IC(0) preconditioner
  (:class:`gradkit.solvers.krylov.IC0`); ``amg_pcg``: scipy's cg with a pyamg smoothed-aggregation V-cycle
  (present only when pyamg is installed);
- ``dcdm_identity`` (negative control): the same DCDM solver with the network replaced by the identity, i.e. the
  method with its learned part switched off (it reproduces CG).

Pass: seed means, DCDM iterations <= 0.5 x CG at N = train_n and 2 train_n, DCDM < CG at 4 train_n with every
right-hand side converged there (a capped count is only a lower bound), and ||x - x*||_A non-increasing along
the DCDM iterates. Reported, not gated: IC(0)/AMG iterations and wall times,
the growth iters(4 train_n) / iters(train_n) (the paper's flat-growth claim), DCDM's seconds per iteration.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch

from ...data.poisson2d import poisson2d, poisson2d_eigenpairs, smooth_random_rhs
from ...nn.deep_cg import DCDMNet2d
from ...solvers.deep_cg import dcdm, ritz_rhs_dataset, scale_invariant_residual_loss
from ...solvers.krylov import IC0, amg_preconditioner
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, AtLeast, Compare, Ratio

SLUG = "deep-cg"
MULTS = (1, 2, 4)

try:  # AMG-PCG is an optional baseline
    import pyamg  # noqa: F401
    HAVE_PYAMG = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_PYAMG = False


@dataclass(frozen=True)
class DeepCGProtocol(Protocol):
    """2-D Dirichlet Poisson; DCDM trained at train_n, tested at train_n * (1, 2, 4)."""

    train_n: int = scaled(smoke=8, quick=32, full=64)  # training grid; tests on 1x, 2x, 4x this N
    n_rhs: int = 3                      # test right-hand sides per grid (fixed across seeds)
    rhs_seed: int = 1234                # seed of the test right-hand sides
    rhs_decay: float = 2.0              # smooth part: spectral amplitude ~ k^-decay
    rhs_noise: float = 0.1              # plus this x unit white noise
    tol: float = 1e-6                   # relative, unpreconditioned true residual, every solver
    k: int = 2                          # directions DCDM A-orthogonalises against
    cap_per_n: float = scaled(smoke=10.0, quick=3.0, full=3.0)  # DCDM stops after cap_per_n * N iterations
    channels: int = 16                  # network width (the paper's)
    train_rhs: int = scaled(smoke=200, quick=2000, full=20000)  # Ritz right-hand sides for training
    theta_frac: float = 0.05            # theta / m: boosted modes are the lowest m/2 + theta
    low_boost: float = 9.0              # coefficient scale of the boosted modes
    steps: int = scaled(smoke=100, quick=300, full=5000)  # Adam steps
    batch: int = 16
    lr: float = 1e-3


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Grid:
    N: int
    A: Any            # scipy CSR, float64
    At: torch.Tensor  # torch CSR, float64
    B: torch.Tensor   # (n, n_rhs) float64 unit columns
    Xs: torch.Tensor  # direct solutions


def _setup(ctx: ArmContext) -> list[Grid]:
    p = ctx.p
    grids = []
    for mult in MULTS:
        N = p.train_n * mult
        A = poisson2d(N, format="scipy")
        B = smooth_random_rhs(N, p.n_rhs, decay=p.rhs_decay, noise=p.rhs_noise,
                              generator=torch.Generator().manual_seed(p.rhs_seed + N))
        lu = sla.splu(A.tocsc())
        Xs = torch.from_numpy(lu.solve(B.numpy()))
        grids.append(Grid(N, A, poisson2d(N), B, Xs))
    return grids


# ------------------------------------------------------------------------------------------ helpers
def _pad_geomean(histories: list[list[float]]) -> list[float]:
    """Geometric mean over right-hand sides of relative-residual histories, shorter ones held at their end."""
    n = max(len(h) for h in histories)
    a = np.array([h + [h[-1]] * (n - len(h)) for h in histories], dtype=float)
    return np.exp(np.log(np.maximum(a, 1e-300)).mean(0)).tolist()


def _record(metrics: dict, curves: dict, mult: int, iters: list[int], seconds: list[float], setup_s: float,
            final: list[float], hists: list[list[float]]) -> None:
    tag = f"x{mult}"
    metrics[f"iters_{tag}"] = float(np.mean(iters))
    metrics[f"time_{tag}"] = float(np.mean(seconds))
    metrics[f"setup_{tag}"] = float(setup_s)
    metrics[f"residual_{tag}"] = float(max(final))
    curves[f"residual_{tag}"] = _pad_geomean(hists)


def _finish_metrics(metrics: dict, curves: dict) -> ArmResult:
    metrics["growth"] = metrics["iters_x4"] / metrics["iters_x1"]
    curves["iterations"] = [metrics[f"iters_x{m}"] for m in MULTS]
    return ArmResult(metrics, curves)


def _scipy_arm(kind: str):
    def run(ctx: ArmContext) -> ArmResult:
        metrics: dict[str, float] = {}
        curves: dict[str, list[float]] = {}
        for mult, g in zip(MULTS, ctx.data):
            t0 = time.perf_counter()
            if kind == "cg":
                M = None
            else:
                M = (IC0(g.A) if kind == "ic0" else amg_preconditioner(g.A)).as_linear_operator(g.A.shape[0])
            setup_s = time.perf_counter() - t0
            iters, secs, final, hists = [], [], [], []
            for j in range(g.B.shape[1]):
                b = g.B[:, j].numpy()
                count = [0]

                def tick(_xk, count=count):
                    count[0] += 1

                t0 = time.perf_counter()
                x, info = sla.cg(g.A, b, rtol=ctx.p.tol, atol=0.0, M=M, callback=tick, maxiter=10 * len(b))
                secs.append(time.perf_counter() - t0)
                iters.append(count[0] if info == 0 else float("inf"))
                final.append(float(np.linalg.norm(b - g.A @ x) / np.linalg.norm(b)))
                hist = [1.0]  # an untimed rerun records ||b - A x_j|| / ||b|| per iteration

                def rec(xk, hist=hist, b=b):
                    hist.append(float(np.linalg.norm(b - g.A @ xk) / np.linalg.norm(b)))

                sla.cg(g.A, b, rtol=ctx.p.tol, atol=0.0, M=M, callback=rec, maxiter=10 * len(b))
                hists.append(hist)
            _record(metrics, curves, mult, iters, secs, setup_s, final, hists)
        return _finish_metrics(metrics, curves)

    return run


def _train(ctx: ArmContext) -> tuple[DCDMNet2d, list[float]]:
    """The direction network trained at N = train_n on Ritz right-hand sides (fixed step budget)."""
    p = ctx.p
    N = p.train_n
    m = N * N
    data = ritz_rhs_dataset(None, m=m, n_samples=p.train_rhs, theta=int(round(p.theta_frac * m)),
                            low_boost=p.low_boost, eigenpairs=poisson2d_eigenpairs(N), seed=ctx.seed).to(ctx.device)
    A32 = poisson2d(N, dtype=torch.float32).to(ctx.device)
    net = DCDMNet2d(channels=p.channels).to(ctx.device)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    losses = []
    bar = ctx.progress(total=p.steps, desc=f"{SLUG}/train")
    for _ in range(p.steps):
        idx = torch.randint(0, data.shape[0], (p.batch,), generator=ctx.generator)
        b = data[idx]
        loss = scale_invariant_residual_loss(A32, b, net(b.reshape(-1, 1, N, N)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
    bar.close()
    net.eval()
    return net, losses


def _dcdm_arm(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    identity = ctx.arm == "dcdm_identity"
    t0 = time.perf_counter()
    if identity:
        direction, losses = (lambda r: r), []
    else:
        direction, losses = _train(ctx)
    train_s = time.perf_counter() - t0
    metrics: dict[str, float] = {"train_seconds": train_s}
    curves: dict[str, list[float]] = {"train_loss": losses} if losses else {}
    for mult, g in zip(MULTS, ctx.data):
        grid, cap = (g.N, g.N), int(math.ceil(p.cap_per_n * g.N))
        At, B, Xs = g.At.to(ctx.device), g.B.to(ctx.device), g.Xs.to(ctx.device)
        t0 = time.perf_counter()
        res = dcdm(At, B, direction, k=p.k, tol=p.tol, maxiter=cap, grid=grid)
        solve_s = time.perf_counter() - t0
        iters = res.iterations.double().tolist()   # a column not converged counts as the cap
        metrics[f"converged_x{mult}"] = float(res.converged.double().mean())
        # the batch of n_rhs is solved together: per-RHS time is the batch time over n_rhs
        secs = [solve_s / g.B.shape[1]] * g.B.shape[1]
        rel = res.relative_residuals
        hists = [rel[: int(res.iterations[j]) + 1, j].tolist() for j in range(g.B.shape[1])]
        final = (B - At @ res.x).norm(dim=0).tolist()
        _record(metrics, curves, mult, iters, secs, 0.0, final, hists)
        metrics[f"sec_per_iter_x{mult}"] = solve_s / max(1.0, float(res.iterations.max()))
        if mult == 1:  # the paper's invariant: ||x_j - x*||_A never increases
            errs: list[torch.Tensor] = []

            def anorm(X: torch.Tensor) -> None:
                E = X - Xs
                errs.append((E * (At @ E)).sum(0).clamp_min(0).sqrt())

            dcdm(At, B, direction, k=p.k, tol=p.tol, maxiter=cap, grid=grid, callback=anorm)
            e0 = (Xs * (At @ Xs)).sum(0).sqrt()
            E = torch.stack([e0] + errs)
            rises = (E[1:] - E[:-1]) / e0
            metrics["anorm_monotone"] = float(bool((rises <= 1e-9).all()))
            metrics["anorm_max_rise"] = float(rises.max().clamp_min(0))
    return _finish_metrics(metrics, curves)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    grids = [g.N for g in ctx.data]
    axes = {f"residual_x{m}": {"xlabel": "iteration", "ylabel": f"relative residual, N = {N}", "log": True,
                               "unit": ""}
            for m, N in zip(MULTS, grids)}
    axes["iterations"] = {"xlabel": "grid N (DCDM trained at the first)", "x": grids,
                          "ylabel": f"iterations to {ctx.p.tol:g}", "unit": ""}
    axes["train_loss"] = {"xlabel": "Adam step", "ylabel": "scale-invariant residual loss", "log": True, "unit": ""}
    out.info["curve_axes"] = axes
    out.info["grids"] = grids
    m = out.metrics
    out.info["dcdm_vs_cg_iters"] = {f"N={N}": m["dcdm"][f"iters_x{k}"] / m["cg"][f"iters_x{k}"]
                                    for k, N in zip(MULTS, grids)}
    out.info["dcdm_vs_cg_time"] = {f"N={N}": m["dcdm"][f"time_x{k}"] / m["cg"][f"time_x{k}"]
                                   for k, N in zip(MULTS, grids)}


ARMS = {"dcdm": _dcdm_arm, "cg": _scipy_arm("cg"), "ic0_pcg": _scipy_arm("ic0")}
if HAVE_PYAMG:
    ARMS["amg_pcg"] = _scipy_arm("amg")
ARMS["dcdm_identity"] = _dcdm_arm

ITER_BOUND = (0.0, float("inf"))
CLAIM = register(Claim(
    slug=SLUG,
    title="A Deep Conjugate Direction Method for Iteratively Solving Linear Systems",
    arxiv="2205.10763",
    statement=(
        "A CNN trained without solutions (scale-invariant one-step residual loss on Ritz right-hand sides) at "
        "N = train_n, used as the direction generator of a conjugate direction method (k = 2), needs at most "
        "half of CG's iterations to reach ||b - A x|| <= 1e-6 ||b|| on the 2-D Dirichlet Poisson problem at "
        "N = train_n and 2 train_n, fewer than CG at 4 train_n, and never increases ||x - x*||_A"
    ),
    paper_figure=(
        "3-D pressure Poisson from smoke simulations, up to 256^3 unknowns: DCDM reaches the tolerance in a "
        "small, roughly grid-independent number of iterations and beats CG, IC-PCG and deflated PCG in "
        "iterations and wall-clock at large sizes; networks trained at 64^3/128^3 transfer to other "
        "geometries and to 256^3 (exact per-table numbers not quoted here)"
    ),
    protocol=DeepCGProtocol,
    data="poisson2d",
    setup=_setup,
    arms=ARMS,
    finish=_finish,
    criterion=AllOf(
        Ratio("iters_x1", "dcdm", "cg", at_most=0.5),
        Ratio("iters_x2", "dcdm", "cg", at_most=0.5),
        Compare("iters_x4", "dcdm", "<", "cg", text="iters_x4: dcdm < cg (seed means)"),
        Compare("converged_x4", "dcdm", ">=", 1.0, every_seed=True,
                text="converged_x4[dcdm] = 1: every right-hand side reaches the tolerance at 4 train_n (every seed)"),
        AtLeast("anorm_monotone", "dcdm", 1.0),
        AllFinite(),
    ),
    primary=Primary(metric="iters_x4", ours="dcdm", baseline="cg", unit="iterations"),
    control={"dcdm": "dcdm_identity"},
    control_note="the same DCDM solver with the identity in place of the trained network (it reproduces CG)",
    uses=("gradkit.solvers.deep_cg.dcdm", "gradkit.solvers.deep_cg.DeepConjugateDirection",
          "gradkit.solvers.deep_cg.scale_invariant_residual_loss", "gradkit.solvers.deep_cg.ritz_rhs_dataset",
          "gradkit.nn.deep_cg.DCDMNet2d", "gradkit.solvers.krylov.IC0", "gradkit.solvers.krylov.amg_preconditioner",
          "gradkit.data.poisson2d.poisson2d", "gradkit.data.poisson2d.poisson2d_eigenpairs"),
    notes=(
        "Why the task can discriminate: CG needs ~2.6 N iterations on this problem (no ceiling; the ratio "
        "criterion has room both ways), and the control, DCDM with the identity as its direction map, "
        "reproduces CG's iterates, so its ratio is 1 and it fails. Tuning: no arm is tuned; CG, IC(0)-PCG and "
        "AMG-PCG have no hyperparameters, DCDM uses the paper's network, lr and a fixed step budget set before "
        "any run. The baselines and test right-hand sides are seed-independent (recomputed per seed, same "
        "numbers); only the network's initialisation, training data and batches vary with the seed. Times are "
        "wall-clock per right-hand side on one thread (DCDM solves its n_rhs right-hand sides as one batch and "
        "reports the batch time / n_rhs; training time is train_seconds, preconditioner setup is setup_xK); "
        "they depend on machine load, iterations do not. DCDM stops after cap_per_n * N iterations (3N at quick, "
        "above CG's ~2.7N): a right-hand side not converged by then counts as 3N iterations (converged_xK is the "
        "converged fraction), since it has already lost to CG there. A capped count is only a lower bound on the "
        "iterations to tolerance, so a seed mean below CG's that includes one could not show that DCDM beats CG: "
        "the criterion therefore also asks every right-hand side at 4 train_n to converge (a reading of 'iterations "
        "to 1e-6' more faithful than averaging capped counts; at 1x and 2x the cap is far above the 0.5 x CG bound "
        "and cannot produce a pass). Smoke trains at N = 8 (grids 8/16/32, 100 steps on 200 eigen right-hand "
        "sides) to stay within its time budget; it checks the pipeline, convergence and the A-norm invariant. The paper trains for hours on a GPU at 64^3/128^3; "
        "here a few hundred Adam steps at N = 32, so its near-flat iteration growth is not expected."
    ),
    scale_note=(
        "At quick scale (300 Adam steps at N = 32, CPU) the learned directions do not transfer to 4x the training "
        "grid: DCDM needs 0.24x CG's iterations at N = 32 and 0.35x at N = 64, but at N = 128 only 1 of 3 seeds "
        "reaches 1e-6 on every right-hand side within 3N iterations (the others stall; 4/9 converged), so its "
        "iterations grow ~15x from N = 32 to 128 against ~3.9x for CG, the opposite of the paper's near-flat "
        "growth, while AMG-PCG needs 6-7 iterations at every N. One DCDM iteration costs ~40x a CG iteration on "
        "CPU (gradkit bench deep-cg-iteration-n128), so DCDM is slower than CG in wall-clock at every N here."
    ),
    plots=("residual_x4", "residual_x1", "iterations", "train_loss"),
    bounds={"iters_x1": ITER_BOUND, "iters_x2": ITER_BOUND, "iters_x4": ITER_BOUND,
            "residual_x1": (0.0, float("inf")), "residual_x2": (0.0, float("inf")), "residual_x4": (0.0, float("inf")),
            "anorm_monotone": (0.0, 1.0), "growth": (0.0, float("inf")), "converged_x1": (0.0, 1.0),
            "converged_x2": (0.0, 1.0), "converged_x4": (0.0, 1.0)},
))
