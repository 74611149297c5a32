"""LPINN claim: a Lagrangian PINN solves fast convection where the Eulerian PINN fails (paper slug: lpinn).

Problem: ``u_t + c u_x = 0`` on ``[0, 2 pi)`` (periodic), ``u0 = sin x``, ``t in [0, T]``; the exact solution
``sin(x - c t)`` comes from :func:`gradkit.data.transport.convection_diffusion_solution` (a Fourier series, exact
for this initial condition). Arms, each from the same seed:

- ``lpinn``: :class:`gradkit.solvers.lpinn.LagrangianPINN` (periodic embedding, u- and X-branches) trained on
  :func:`~gradkit.solvers.lpinn.lpinn_loss` (L2 norms, weights (10, 1, 1000)); evaluated by mapping u back to
  the fixed grid with :func:`~gradkit.solvers.lpinn.lagrangian_to_eulerian`.
- ``pinn``: the Eulerian PINN (:class:`~gradkit.solvers.lpinn.PeriodicMLP`, the same embedding, width and
  depth as the u-branch) on :func:`~gradkit.solvers.lpinn.pinn_loss` (weights (1, 1000)).

Both: full-batch Adam (amsgrad), cosine decay over the run, the learning rate picked from the same grid by
the loss on a held-out collocation grid (the cell midpoints) after ``tune_steps`` steps; the exact solution
is never used for the choice. Metric: relative L2 error on a 256 x 100 Eulerian grid (2 edge points on each
side left out, as in the official evaluation), every number in the protocol (``gradkit show lpinn``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...data.transport import convection_diffusion_solution
from ...engine import seed_everything
from ...solvers.lpinn import (DEFAULT_WEIGHTS, PINN_WEIGHTS, LagrangianPINN, PeriodicMLP, characteristic_folds,
                              lagrangian_to_eulerian, lpinn_loss, lpinn_residuals, pinn_loss)
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, Compare, Ratio
from .tuning import tune

SLUG = "lpinn"
LPINN_MAX = 0.2  # LPINN rel-L2 must stay below this
PINN_MIN = 0.5  # the Eulerian PINN's rel-L2 must exceed this (it fails)
GAP = 3.0  # and be at least GAP x the LPINN's
IMG_SHAPE = (50, 128)  # (t, x) of the stored space-time images


@dataclass(frozen=True)
class LPINNProtocol(Protocol):
    """Convection at speed c; collocation grid n_xi x n_t; both arms get the same lr grid and step budget."""

    c: float = scaled(smoke=5.0, quick=30.0, full=50.0)
    t_end: float = 1.0
    n_xi: int = scaled(smoke=32, quick=64, full=256)  # collocation labels/points in [0, 2 pi], end point included
    n_t: int = scaled(smoke=10, quick=32, full=100)  # collocation times in [0, T]
    width: int = scaled(smoke=32, quick=32, full=50)
    depth_u: int = scaled(smoke=3, quick=3, full=5)  # tanh layers of the u-branch and of the Eulerian PINN
    depth_x: int = 2  # tanh layers of the X-branch
    share_trunk: bool = False  # True: the official code's shared layers between the branches
    steps: int = scaled(smoke=150, quick=2000, full=100_000)
    lr_grid: tuple[float, ...] = scaled(smoke=(3e-2,), quick=(3e-3, 1e-2), full=(3e-3, 1e-2, 3e-2))
    tune_steps: int = scaled(smoke=10, quick=300, full=5000)  # steps per lr trial
    weights_lpinn: tuple[float, float, float] = DEFAULT_WEIGHTS
    weights_pinn: tuple[float, float] = PINN_WEIGHTS
    n_eval_x: int = 256
    n_eval_t: int = 100
    edge: int = 2  # evaluation points left out at each end of the x grid
    log_every: int = scaled(smoke=10, quick=50, full=1000)
    eval_every: int = scaled(smoke=50, quick=250, full=5000)


# ------------------------------------------------------------------------------------------ setup
def _setup(ctx: ArmContext) -> dict:
    p, dev = ctx.p, ctx.device
    xi = torch.linspace(0.0, 2 * math.pi, p.n_xi)
    t = torch.linspace(0.0, p.t_end, p.n_t)
    # validation collocation grid: the midpoints of the training cells (never the exact solution)
    xi_val, t_val = 0.5 * (xi[1:] + xi[:-1]), 0.5 * (t[1:] + t[:-1])
    x_eval = np.linspace(0.0, 2 * math.pi, p.n_eval_x)
    t_eval = np.linspace(0.0, p.t_end, p.n_eval_t)
    ref = convection_diffusion_solution(np.sin, p.c, 0.0, x_eval, t_eval)  # (n_eval_t, n_eval_x)
    return {"xi": xi.to(dev), "t": t.to(dev), "xi_val": xi_val.to(dev), "t_val": t_val.to(dev),
            "x_eval": torch.tensor(x_eval, dtype=torch.float32, device=dev),
            "t_eval": torch.tensor(t_eval, dtype=torch.float32, device=dev),
            "ref": torch.tensor(ref, dtype=torch.float32, device=dev)}


def rel_l2(u: torch.Tensor, ref: torch.Tensor, edge: int) -> float:
    """||u - ref||_F / ||ref||_F over the grid, ``edge`` x-points left out at each end."""
    sl = slice(edge, ref.shape[-1] - edge if edge else None)
    return float(torch.linalg.vector_norm(u[..., sl] - ref[..., sl]) / torch.linalg.vector_norm(ref[..., sl]))


# ------------------------------------------------------------------------------------------ arms
def _lpinn_parts(ctx: ArmContext):
    p = ctx.p

    def make():
        return LagrangianPINN(p.width, p.depth_u, p.depth_x, share_trunk=p.share_trunk)

    def loss(model, xi, t):
        return lpinn_loss(model, xi, t, torch.sin, flux=p.c, weights=p.weights_lpinn).total

    @torch.no_grad()
    def field(model):
        xx, tt = torch.meshgrid(ctx.data["x_eval"], ctx.data["t_eval"], indexing="xy")
        u, X = model(xx, tt)  # labels xi = the evaluation grid, one row per time
        return lagrangian_to_eulerian(u, X, ctx.data["x_eval"], on_fold="ignore"), X

    return make, loss, field


def _pinn_parts(ctx: ArmContext):
    p = ctx.p

    def make():
        return PeriodicMLP(p.width, p.depth_u)

    def loss(model, x, t):
        return pinn_loss(model, x, t, torch.sin, flux=p.c, weights=p.weights_pinn).total

    @torch.no_grad()
    def field(model):
        xx, tt = torch.meshgrid(ctx.data["x_eval"], ctx.data["t_eval"], indexing="xy")
        return model(xx, tt), None

    return make, loss, field


def _train(ctx: ArmContext, make, loss_fn, field, lr: float, steps: int, record: bool):
    """Full-batch Adam (amsgrad) with cosine decay from a fresh, seeded model; loss/error curves if ``record``."""
    p, d = ctx.p, ctx.data
    seed_everything(ctx.seed)  # every trial and the final run start from the same initial weights
    model = make().to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    losses, errs, first = [], [], float("nan")
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, d["xi"], d["t"])
        loss.backward()
        opt.step()
        sched.step()
        if step == 0:
            first = float(loss.detach())
        if record and (step % p.log_every == 0 or step == steps - 1):
            losses.append(float(loss.detach()))
        if record and ((step + 1) % p.eval_every == 0 or step == steps - 1):
            errs.append(rel_l2(field(model)[0], d["ref"], p.edge))
    return model, first, losses, errs


def _arm(ctx: ArmContext) -> ArmResult:
    p, d = ctx.p, ctx.data
    make, loss_fn, field = (_lpinn_parts if ctx.arm == "lpinn" else _pinn_parts)(ctx)

    def val_loss(model) -> float:
        return float(loss_fn(model, d["xi_val"], d["t_val"]).detach())

    tuned = tune(p.lr_grid, lambda lr: val_loss(_train(ctx, make, loss_fn, field, lr, p.tune_steps, False)[0]),
                 mode="min")
    model, first, losses, errs = _train(ctx, make, loss_fn, field, tuned.value, p.steps, True)
    u, X = field(model)
    final = val_loss(model)
    metrics = {"rel_l2": rel_l2(u, d["ref"], p.edge),
               "rel_l2_at_T": rel_l2(u[-1], d["ref"][-1], p.edge),
               "train_loss": losses[-1], "val_loss": final,
               "loss_drop": first / max(losses[-1], 1e-30), "lr": float(tuned.value)}
    if ctx.arm == "lpinn":
        r_x, _ = lpinn_residuals(model, *torch.meshgrid(d["xi"], d["t"], indexing="xy"), flux=p.c)
        metrics["slope_err"] = abs(float(r_x.detach().mean()))  # |mean dX/dt - c| on the collocation grid
        metrics["fold_frac"] = float(characteristic_folds(X).float().mean())
    info = {"tuned": tuned.as_info(), "image": _image(u)}
    return ArmResult(metrics, curves={"loss": losses, "rel_l2": errs, "u_at_T": u[-1].cpu().tolist()}, info=info)


def _image(u: torch.Tensor) -> list:
    """A (t, x) field in [-1, 1] as an IMG_SHAPE grey image in [0, 1] (nested lists for the report)."""
    rows = np.linspace(0, u.shape[0] - 1, IMG_SHAPE[0]).astype(int)
    cols = np.linspace(0, u.shape[1] - 1, IMG_SHAPE[1]).astype(int)
    return ((u[rows][:, cols] + 1) / 2).clamp(0, 1).cpu().numpy().round(3).tolist()


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p, d = ctx.p, ctx.data
    arms = out.info.get("arms", {})
    ref = d["ref"]
    rows = {"exact": [_image(ref)]}
    for arm, info in arms.items():
        rows[arm] = [info.pop("image")]
    n_loss = len(next(iter(out.curves.get("loss", {}).values()), []))
    n_err = len(next(iter(out.curves.get("rel_l2", {}).values()), []))
    out.info.update({
        "images": {"u(x, t): rows t = 0..T (top to bottom), x in [0, 2 pi]": rows},
        "curve_axes": {
            "loss": {"xlabel": "Adam step", "ylabel": "training loss", "log": True,
                     "x": [min(i * p.log_every, p.steps - 1) for i in range(n_loss)]},
            "rel_l2": {"xlabel": "Adam step", "ylabel": "rel. L2 error vs exact", "log": True,
                       "x": [min((i + 1) * p.eval_every, p.steps) for i in range(n_err)]},
            "u_at_T": {"xlabel": "x (exact: sin(x - c T))", "ylabel": "u(x, T)",
                       "x": d["x_eval"].cpu().numpy().round(4).tolist()},
        },
        "exact_u_at_T": ref[-1].cpu().numpy().round(4).tolist(),
    })


# ------------------------------------------------------------------------------------------ claim
CLAIM = register(Claim(
    slug=SLUG,
    title="Lagrangian PINNs: A causality-conforming solution to failure modes of physics-informed neural networks",
    arxiv="2205.02902",
    statement=(
        f"On u_t + c u_x = 0 with c = 30 (u0 = sin x, periodic, T = 1), a Lagrangian PINN trained on the "
        f"characteristic-form residuals reaches a relative L2 error < {LPINN_MAX:g} while the Eulerian PINN with "
        f"the same embedding, width, depth, optimiser, step and tuning budget stays above {PINN_MIN:g}, and at "
        f"least {GAP:g}x the LPINN's error (seed means)"
    ),
    paper_figure=(
        "Convection, u0 = sin x: the PINN's relative error is O(1) for c >= 30 while the LPINN's stays ~1e-2 or "
        "below up to c = 50 (1e6 Adam steps, 256 x 100 collocation grid); the travelling Burgers front "
        "(u0 = sin x + C) likewise; the LPINN's Hessian spectrum stays benign as c grows"
    ),
    protocol=LPINNProtocol,
    data="convection (exact solution)",
    setup=_setup,
    arms={"lpinn": _arm, "pinn": _arm},
    finish=_finish,
    criterion=AllOf(
        Compare("rel_l2", "lpinn", "<", LPINN_MAX),
        Compare("rel_l2", "pinn", ">", PINN_MIN),
        Ratio("rel_l2", "lpinn", "pinn", at_most=1.0 / GAP),
        AllFinite(),
    ),
    primary=Primary(metric="rel_l2", ours="lpinn", baseline="pinn", unit="rel. L2", ceiling=0.0, ceiling_tol=1e-3),
    control={"lpinn": "pinn"},
    control_note="the Eulerian PINN stands in for the LPINN",
    uses=("gradkit.solvers.lpinn.LagrangianPINN", "gradkit.solvers.lpinn.lpinn_loss",
          "gradkit.solvers.lpinn.lpinn_residuals", "gradkit.solvers.lpinn.lagrangian_to_eulerian",
          "gradkit.solvers.lpinn.PeriodicMLP", "gradkit.solvers.lpinn.pinn_loss",
          "gradkit.data.transport.convection_diffusion_solution"),
    notes=(
        "Why the task can discriminate: the exact solution is known, the error's best value is 0 (the ceiling) "
        "and neither arm gets near it at this budget; the PINN has the same inputs, width, depth, loss form "
        "(L2 norms) and budget, so a PINN error < 0.5 or an LPINN error > 0.2 fails the claim, and the control "
        "(the PINN standing in for the LPINN) fails the LPINN bound. The paper's ~1e-2 LPINN error comes from up "
        "to 1e6 steps; at 2000 steps the LPINN's error is dominated by its characteristic branch (X must reach "
        "xi + 30 at t = 1, and a position error d costs ~d in u). The X-network outputs X itself, as in the "
        "official code: a network periodic in xi cannot represent xi exactly at the seam, so a few labels near "
        "xi = 2 pi fold back (fold_frac counts the evaluation times where the circular order breaks; they are "
        "interpolated anyway, as the official evaluation does). The learning rate is chosen per arm from the "
        "same grid by the loss on the cell-midpoint collocation grid after tune_steps steps (no exact solution "
        "used). The error is the Frobenius norm ratio on the full 256 x 100 grid (the official script prints a "
        "matrix 2-norm ratio). With the end point xi = 2 pi in the grid, the initial-condition term has a floor "
        "(1000 x ||X(., 0) - xi|| >= ~1000 x 2 pi / sqrt 2 ~ 4.4e3 for a periodic X-network), so the LPINN's loss "
        "levels off near 4.5e3 while its error keeps falling; the PINN reaches a far smaller loss (~25) at an O(1) "
        "error: the smooth wrong solution the paper describes. slope_err: |mean dX/dt - c| of the learned characteristics. The optional Burgers "
        "case and the Hessian-spectrum claim are not run here; gradkit.data.transport.burgers_solution provides "
        "the Burgers reference."
    ),
    plots=("rel_l2", "loss", "u_at_T"),
    bounds={"rel_l2": (0.0, float("inf")), "rel_l2_at_T": (0.0, float("inf")), "train_loss": (0.0, float("inf")),
            "val_loss": (0.0, float("inf")), "loss_drop": (0.0, float("inf")), "lr": (0.0, 1.0),
            "slope_err": (0.0, float("inf")), "fold_frac": (0.0, 1.0)},
))
