"""LPN claim: proximal matching makes a learned proximal network the MAP prox; L2 training gives the MMSE one.

Fang, Buchanan, Sulam, "What's in a Prior? Learned Proximal Networks for Inverse Problems", ICLR 2024
(arXiv 2310.14344). The paper's 1-D Laplacian experiment: ``x ~ Laplace(0, b)``, ``y = x + sigma n``,
``n ~ N(0, 1)``, fresh draws every step. The MAP denoiser of this problem is soft-thresholding at
``sigma^2 / b`` (a dead zone around 0), its regulariser ``R(x) = sigma^2 |x| / b``; the MMSE denoiser (the
posterior mean, what L2 training learns) shrinks smoothly and has no dead zone.

Every arm trains the same LPN, ``f = grad psi`` of an ICNN (width 50, 4 constrained layers, softplus beta 10,
constrained weights from ``exp(N(-10, 0.1))`` and clamped after every Adam step), from the same
initialisation and the same data stream:

- ``pm`` (ours): L1 pretraining, then the proximal matching loss with gamma 0.5, 0.4, 0.3, 0.2, 0.1;
- ``l2`` (baseline, the MMSE prox): the L2 loss;
- ``l1`` (the paper's other baseline, a median-type prox): the L1 loss.

Each arm's learning rate is tuned on the same grid with the same budget: one shortened run per value
(``trial_fraction`` of every stage), scored by the arm's own loss on a fixed validation sample (fresh
draws, never the evaluation grid); the chosen value is then trained at the full budget. Metrics on a grid
of ``y`` in [-2.5, 2.5] against soft-thresholding ``S(y)``: the dead zone ``max |f(y)|`` over ``|y| <= 0.7``,
the mean and max ``|f(y) - S(y)|``, ``f(0.5)``; the recovered prior ``R(x) - R(0)`` (by convex inversion)
against ``sigma^2 |x| / b`` on [-2, 2]; validation MSE / MAE of every arm. The numbers are the protocol's
(:class:`LpnProtocol`, ``gradkit show lpn``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ...nn.icnn import ICNN, clamp_after_step
from ...solvers.proximal import GammaSchedule, LearnedProx, invert_gradient, proximal_matching_loss
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllOf, Compare, Ratio
from .tuning import tune

SLUG = "lpn"
OURS, BASELINE, L1 = "pm", "l2", "l1"
ARMS = (OURS, BASELINE, L1)
VAL_SEED_OFFSET = 1_000_003  # the validation sample's generator: seed + offset (never the training stream)


@dataclass(frozen=True)
class LpnProtocol(Protocol):
    """The 1-D Laplacian denoising experiment; every arm gets the same model, steps per loss and lr grid."""

    laplace_b: float = 1.0
    sigma: float = 1.0
    hidden: int = 50
    layers: int = 4
    beta: float = 10.0
    init_log_mean: float = -10.0  # constrained weights start at exp(N(init_log_mean, init_log_std))
    init_log_std: float = 0.1
    batch: int = scaled(smoke=200, quick=500, full=2000)
    baseline_steps: int = scaled(smoke=100, quick=1000, full=20000)  # the l2 and l1 arms
    pretrain_steps: int = scaled(smoke=60, quick=500, full=20000)  # pm: L1 first
    pm_gammas: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
    pm_stage_steps: int = scaled(smoke=60, quick=400, full=4000)  # pm: steps per gamma
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)  # Adam; the same grid for every arm
    trial_fraction: float = 0.25  # a tuning trial runs this fraction of every stage
    n_val: int = scaled(smoke=5000, quick=20000)
    grid_lim: float = 2.5  # f is evaluated on y in [-grid_lim, grid_lim]
    grid_points: int = 501
    dead_zone: float = 0.7  # criterion (i): max |f(y)| over |y| <= dead_zone
    probe_y: float = 0.5  # f(probe_y): > 0.15 for the MMSE shrinkage
    prior_lim: float = 2.0
    prior_points: int = 81
    prior_inner: float = 1.0  # prior_dev_inner: the deviation over |x| <= prior_inner only
    inv_iters: int = scaled(smoke=30, quick=100)
    inv_tol: float = 1e-6  # inversion in float64


# ------------------------------------------------------------------------------------------ data and training
def laplace_pairs(n: int, b: float, sigma: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, x)`` of shape (n, 1): ``x ~ Laplace(0, b)`` (difference of two exponentials), ``y = x + sigma N(0,1)``."""
    e = torch.empty(2, n, 1).exponential_(generator=gen)
    x = b * (e[0] - e[1])
    return x + sigma * torch.randn(n, 1, generator=gen), x


def soft_threshold(y: torch.Tensor, lam: float) -> torch.Tensor:
    """``sign(y) max(|y| - lam, 0)``: the prox of ``lam |x|``."""
    return torch.sign(y) * (y.abs() - lam).clamp_min(0)


def _stages(p: LpnProtocol, arm: str, fraction: float) -> list[tuple[str, float, int]]:
    """``(loss, gamma, steps)`` of every stage of an arm (gamma is 0 for L1/L2)."""
    def n(steps: int) -> int:
        return max(1, round(steps * fraction))

    if arm == OURS:
        sched = GammaSchedule(p.pm_gammas, n(p.pm_stage_steps))
        return [("l1", 0.0, n(p.pretrain_steps))] + [("pm", g, s) for g, s in zip(sched.gammas, sched.steps)]
    return [(arm, 0.0, n(p.baseline_steps))]


def _loss(kind: str, out: torch.Tensor, x: torch.Tensor, gamma: float) -> torch.Tensor:
    if kind == "pm":
        return proximal_matching_loss(out, x, gamma)
    if kind == "l2":
        return (out - x).pow(2).mean()
    return (out - x).abs().mean()


def _train(ctx: ArmContext, lr: float, fraction: float) -> tuple[LearnedProx, list[float]]:
    """One arm's training run from the run's seed (same init and data stream for every arm and trial)."""
    p, dev = ctx.p, ctx.device
    torch.manual_seed(ctx.seed)
    psi = ICNN(1, p.hidden, p.layers, p.beta, init_log_mean=p.init_log_mean, init_log_std=p.init_log_std,
               device=dev)
    prox = LearnedProx(psi).train()
    opt = torch.optim.Adam(psi.parameters(), lr=lr)
    clamp_after_step(opt, psi)  # projected gradient: psi stays convex through training
    gen = torch.Generator().manual_seed(ctx.seed)
    stages = _stages(p, ctx.arm, fraction)
    bar = ctx.progress(total=sum(s for _, _, s in stages), desc=f"{SLUG}/{ctx.arm} lr={lr:g}")
    losses, acc, step, log_every = [], 0.0, 0, 50
    try:
        for kind, gamma, steps in stages:
            for _ in range(steps):
                y, x = (t.to(dev) for t in laplace_pairs(p.batch, p.laplace_b, p.sigma, gen))
                loss = _loss(kind, prox(y), x, gamma)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                acc, step = acc + loss.detach(), step + 1
                bar.update(1)
                if step % log_every == 0:  # the mean training loss of every 50 steps
                    losses.append(float(acc) / log_every)
                    acc = 0.0
    finally:
        bar.close()
    return prox.eval(), losses


def _predict(prox: LearnedProx, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return prox(y)


def _val_scores(prox: LearnedProx, val: tuple[torch.Tensor, torch.Tensor], gamma: float) -> dict[str, float]:
    y, x = val
    out = _predict(prox, y)
    return {"val_mse": float((out - x).pow(2).mean()), "val_mae": float((out - x).abs().mean()),
            "val_pm": float(proximal_matching_loss(out, x, gamma))}


def _own_score(arm: str) -> str:
    return {OURS: "val_pm", BASELINE: "val_mse", L1: "val_mae"}[arm]


# ------------------------------------------------------------------------------------------ setup, arms, finish
def _setup(ctx: ArmContext) -> dict:
    p = ctx.p
    gen = torch.Generator().manual_seed(ctx.seed + VAL_SEED_OFFSET)
    y, x = laplace_pairs(p.n_val, p.laplace_b, p.sigma, gen)
    grid = torch.linspace(-p.grid_lim, p.grid_lim, p.grid_points, dtype=torch.float64)[:, None]
    xs = torch.linspace(-p.prior_lim, p.prior_lim, p.prior_points, dtype=torch.float64)[:, None]
    return {"val": (y.to(ctx.device), x.to(ctx.device)), "grid": grid.to(ctx.device), "prior_x": xs.to(ctx.device)}


def _evaluate(p: LpnProtocol, prox: LearnedProx, data: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Shape of f against soft-thresholding and the recovered prior, in float64."""
    lam = p.sigma ** 2 / p.laplace_b
    model = copy.deepcopy(prox).double().eval()
    grid, xs = data["grid"], data["prior_x"]
    f = _predict(model, grid)
    s = soft_threshold(grid, lam)
    err = f - s
    inner = grid.abs() <= p.dead_zone + 1e-12
    probe = _predict(model, torch.tensor([[p.probe_y]], dtype=torch.float64, device=grid.device))
    inv = invert_gradient(model.potential, xs, iters=p.inv_iters, tol=p.inv_tol)
    with torch.no_grad():
        r = (xs * inv.y).sum(1) - 0.5 * xs.pow(2).sum(1) - model.potential(inv.y)
    # R is +inf outside the range of f (f never outputs such x): those points are left out of the prior metrics
    ok = inv.residuals <= p.inv_tol
    prior_err = (r - r[xs[:, 0].abs().argmin()]) - lam * xs[:, 0].abs()
    prior_err = torch.where(ok, prior_err, torch.full_like(prior_err, float("nan")))
    kept = prior_err[ok].abs()
    inner_kept = prior_err[ok & (xs[:, 0].abs() <= p.prior_inner + 1e-12)].abs()
    nan = float("nan")
    metrics = {
        "dead_zone": float(f[inner].abs().max()), "mae_soft": float(err.abs().mean()),
        "sup_soft": float(err.abs().max()), "f_probe": float(probe),
        "prior_dev": float(kept.mean()) if len(kept) else nan, "prior_dev_max": float(kept.max()) if len(kept) else nan,
        "prior_dev_inner": float(inner_kept.mean()) if len(inner_kept) else nan,
        "prior_coverage": float(ok.double().mean()),
    }
    step = max(1, (p.grid_points - 1) // 100)
    curves = {"prox": f[::step, 0].tolist(), "prox_error": err[::step, 0].tolist(), "prior_error": prior_err.tolist()}
    return metrics, curves


def _arm(ctx: ArmContext) -> ArmResult:
    p, data = ctx.p, ctx.data
    gamma_val = p.pm_gammas[-1]
    key = _own_score(ctx.arm)

    def trial(lr: float) -> float:
        prox, _ = _train(ctx, lr, p.trial_fraction)
        return _val_scores(prox, data["val"], gamma_val)[key]

    tuned = tune(p.lr_grid, trial, mode="min")
    prox, losses = _train(ctx, tuned.value, 1.0)
    metrics, curves = _evaluate(p, prox, data)
    metrics.update(_val_scores(prox, data["val"], gamma_val))
    metrics["lr"] = float(tuned.value)
    curves["train_loss"] = losses
    return ArmResult(metrics, curves, info={"tuned": tuned.as_info(), "tuned_on": key})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p = ctx.p
    step = max(1, (p.grid_points - 1) // 100)
    grid = ctx.data["grid"][::step, 0].tolist()
    out.info["curve_axes"] = {
        "prox": {"xlabel": "noisy input y", "x": grid, "ylabel": "f(y)"},
        "prox_error": {"xlabel": "noisy input y", "x": grid, "ylabel": "f(y) - soft-threshold(y)"},
        "prior_error": {"xlabel": "x", "x": ctx.data["prior_x"][:, 0].tolist(),
                        "ylabel": "R(x) - R(0) - sigma^2 |x| / b"},
        "train_loss": {"xlabel": "step / 50"},
    }


# ------------------------------------------------------------------------------------------ criterion


CRITERION = AllOf(
    Ratio("dead_zone", OURS, BASELINE, 0.6),
    Ratio("mae_soft", OURS, BASELINE, 0.9),
    Compare("f_probe", BASELINE, ">", 0.15, text="f_probe[l2] > 0.15 (mean): the MMSE shrinkage has no dead zone"),
)

CLAIM = register(Claim(
    slug=SLUG,
    title="What's in a Prior? Learned Proximal Networks for Inverse Problems",
    arxiv="2310.14344",
    statement=(
        "On 1-D Laplace(0, 1) signals in unit Gaussian noise, an LPN trained with proximal matching (L1 "
        "pretraining, gamma 0.5 -> 0.1) is closer to the MAP prox (soft-thresholding at 1) than the same LPN "
        "trained with L2 (the MMSE prox): its dead zone max |f(y)| over |y| <= 0.7 is <= 0.6x the L2 one and its "
        "mean |f(y) - S_1(y)| on [-2.5, 2.5] is <= 0.9x the L2 one (seed means), while the L2 prox keeps "
        "f(0.5) > 0.15 (no dead zone)"
    ),
    paper_figure=(
        "Fig. 2 (Laplacian, b = 1, sigma = 1): the PM-trained LPN recovers soft-thresholding and its learned "
        "prior R ~ |x| (the negative log-density), while L2 and L1 training give smooth shrinkage without a dead "
        "zone and priors that are not |x|; MNIST: the learned prior is lowest on clean digits (curves, no "
        "single number)"
    ),
    protocol=LpnProtocol,
    data="laplace-1d",
    setup=_setup,
    arms={OURS: _arm, BASELINE: _arm, L1: _arm},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="dead_zone", ours=OURS, baseline=BASELINE, ceiling=0.0, ceiling_tol=0.01),
    control={OURS: BASELINE},
    control_note="the L2-trained LPN (the MMSE prox) stands in for the PM-trained one",
    uses=("gradkit.nn.icnn.ICNN", "gradkit.nn.icnn.clamp_after_step", "gradkit.solvers.proximal.LearnedProx",
          "gradkit.solvers.proximal.proximal_matching_loss", "gradkit.solvers.proximal.GammaSchedule",
          "gradkit.solvers.proximal.invert_gradient"),
    notes=(
        "Why the task discriminates: the MMSE denoiser of Laplace(0,1) + N(0,1) is smooth and strictly "
        "increasing (f(0.5) ~ 0.2), so the L2 baseline cannot have a dead zone and sits well above the floor 0 "
        "of dead_zone and mae_soft; substituting it for the PM arm fails the ratio checks (the negative control). "
        "The budgets are far below the paper's notebook (batch 2000, 20k L2/L1 steps, 2k-8k steps per gamma "
        "with a decaying lr): at this budget the PM prox does not reach soft-thresholding exactly (sup-norm "
        "deviation well above 0.2), so the criterion compares PM with L2 relatively instead of asking for an "
        "absolute fit. The lr of every arm is chosen from the same grid by its own loss on a validation sample "
        "(PM: the PM loss at the final gamma), with a shortened run per grid value. The recovered prior "
        "(prior_dev: mean |R(x) - R(0) - |x|| on [-2, 2]; prior_dev_inner: the same on |x| <= 1; by damped-Newton "
        "inversion of f in float64, over the x that f reaches: prior_coverage) is reported, not part of the "
        "criterion: at this budget the PM prox over-shrinks the tails (f(2.5) ~ 1.1 instead of 1.5), so its R "
        "follows |x| on |x| <= 1 but grows too fast beyond."
    ),
    plots=("prox", "prox_error", "prior_error"),
    bounds={"dead_zone": (0.0, float("inf")), "mae_soft": (0.0, float("inf")), "sup_soft": (0.0, float("inf")),
            "f_probe": (-float("inf"), float("inf")), "prior_dev": (0.0, float("inf")),
            "prior_dev_max": (0.0, float("inf")), "prior_coverage": (0.0, 1.0),
            "prior_dev_inner": (0.0, float("inf")),
            "val_mse": (0.0, float("inf")), "val_mae": (0.0, float("inf")), "val_pm": (0.0, 1.0),
            "lr": (0.0, float("inf"))},
))
