"""PI-HC-MoE claim: per-subdomain hard constraints beat one global hard constraint and a soft constraint
(paper slug: pihc-moe).

Data (generated in code, cached per process): 1-D diffusion-sorption on x in [0, 1], t in [0, 500] with Gaussian
bump initial conditions a exp(-(x - b)^2 / 0.01); references by the method of lines (BDF) on a 4x finer x grid,
sampled on the nt x nx training grid (``gradkit.data.diffusion_sorption``). At smoke scale the linear heat
equation with its closed form stands in. Backbone: a small 2-D FNO over (t, x) fed (t, x, u0(x)), float64.
Arms, each from the same seed: ``pi_sc`` (the FNO outputs u; soft physics loss), ``pi_hc`` (N bases, one global
NLLS over P sampled points), ``pi_hc_moe`` (N bases, K experts along x, P/K points each) and ``moe_untrained``
(the MoE layer on the untrained backbone: the negative control). Every trained arm minimises the same physics
loss (PDE residual + initial + boundary conditions of the final u on the full grid) with Adam; the learning rate
is picked from the same grid for each arm on a validation split of the training initial conditions. Metric:
mean relative L2 error to the reference on held-out initial conditions. Numbers: :class:`PIHCProtocol`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...data import Split
from ...data.diffusion_sorption import (DS_CONSTANTS, PDEProblems, diffusion_sorption_problems,
                                         diffusion_sorption_residual, heat_problems)
from ...data.batches import TensorBatches
from ...engine import fit
from ...nn.hard_constraint_moe import HardConstraintMoE, fd_terms
from ...nn.fno import FNO2d
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, Compare
from .tuning import holdout, tune

SLUG = "pihc-moe"
ARMS = ("pi_sc", "pi_hc", "pi_hc_moe", "moe_untrained")
HEAT_KAPPA = 0.1


@dataclass(frozen=True)
class PIHCProtocol(Protocol):
    """Problem, grid, backbone, constraint layer and training budget (equal for every arm)."""

    pde: str = scaled(smoke="heat", quick="diffusion_sorption")
    nt: int = scaled(smoke=16, quick=32, full=64)
    nx: int = scaled(smoke=16, quick=32, full=64)
    n_train: int = scaled(smoke=8, quick=100, full=200)
    n_test: int = scaled(smoke=4, quick=30, full=50)
    n_basis: int = scaled(smoke=4, quick=8, full=16)
    experts: tuple[int, int] = scaled(smoke=(1, 2), quick=(1, 4))  # (k_t, k_x) blocks of the MoE arm
    points: int = scaled(smoke=128, quick=1024, full=4096)      # PDE points per solve: P (PI-HC), P/K per expert
    modes: int = scaled(smoke=4, quick=6, full=8)
    width: int = scaled(smoke=8, quick=8, full=32)
    layers: int = 3
    steps: int = scaled(smoke=20, quick=100, full=4000)         # Adam steps of every trained arm
    batch_size: int = 4
    lr_grid: tuple[float, ...] = scaled(smoke=(1e-3,), quick=(1e-3, 3e-3))
    tune_steps: int = scaled(smoke=0, quick=20, full=400)     # steps of each trial (0: a one-value grid only)
    val_fraction: float = 0.2
    lm_iters: int = 10
    ridge: float = 1e-4
    hessian: str = "gn"
    ic_eps: float = 1e-2         # the initial-condition row is (u - u0) / (|u0| + ic_eps) for diffusion-sorption
    pde_scale: float = 500.0     # diffusion-sorption PDE rows times this (= the residual in time t / 500)


# ------------------------------------------------------------------------------------------ model
def fno_net(out: int, modes: int, width: int, layers: int) -> nn.Module:
    """(batch, 3, nt, nx) of (t, x, u0) -> (batch, nt, nx, out): :class:`gradkit.nn.fno.FNO2d`, channels last."""
    return nn.Sequential(FNO2d(3, out, width, modes, layers), _ChannelsLast())


class _ChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ physics
class Physics:
    """The constraints of one PDE on the grid: the NLLS residual of an expert and the training loss."""

    def __init__(self, prob: PDEProblems, ic_eps: float, pde_scale: float = 1.0) -> None:
        self.pde, self.dt, self.dx, self.ic_eps, self.pde_scale = prob.name, prob.dt, prob.dx, ic_eps, pde_scale
        t = (prob.t / prob.t[-1]).view(1, -1, 1).expand(1, len(prob.t), len(prob.x))
        x = prob.x.view(1, 1, -1).expand(1, len(prob.t), len(prob.x))
        self.coords = torch.cat([t, x])  # (2, nt, nx)
        self.interior = torch.ones(len(prob.t), len(prob.x), dtype=torch.bool)
        self.interior[0] = False         # PDE rows for t > 0: the t = 0 row is the initial condition's

    def inputs(self, u0: Tensor) -> Tensor:
        b, nx = u0.shape
        c = self.coords.to(u0).unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([c, u0.view(b, 1, 1, nx).expand(b, 1, c.shape[2], nx)], dim=1)

    def pieces(self, v: dict[str, Tensor], u0: Tensor) -> list[Tensor]:
        """[PDE, IC, BC...] residual rows from values ``v`` (u, u_t, u_xx at PDE points; ic on t = 0 without the
        corner x = 0, which belongs to the left boundary condition; left and right_u, right_ux for t > 0)."""
        if self.pde == "heat":
            pde = v["u_t"] - HEAT_KAPPA * v["u_xx"]
            return [pde, v["ic"] - u0[:, 1:], v["left"], v["right_u"]]
        pde = self.pde_scale * diffusion_sorption_residual(v["u"], v["u_t"], v["u_xx"])
        ic = (v["ic"] - u0[:, 1:]) / (u0[:, 1:].abs() + self.ic_eps)
        return [pde, ic, v["left"] - 1.0, v["right_u"] - DS_CONSTANTS["D"] * v["right_ux"]]

    @staticmethod
    def boundary(terms: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"ic": terms["u"][:, 0, 1:], "left": terms["u"][:, 1:, 0], "right_u": terms["u"][:, 1:, -1],
                "right_ux": terms["u_x"][:, 1:, -1]}

    def loss(self, u: Tensor, u0: Tensor) -> Tensor:
        """Physics loss of u (batch, nt, nx): mean squares of the PDE (t > 0), IC and BC residuals on the grid."""
        terms = {k: v[..., 0] for k, v in fd_terms(u.unsqueeze(-1), self.dx, self.dt).items()}
        vals = {**{k: terms[k][:, 1:].flatten(1) for k in ("u", "u_t", "u_xx")}, **self.boundary(terms)}
        return sum(p.pow(2).mean() for p in self.pieces(vals, u0))

    def nlls_residual(self, local: dict[str, Tensor], shared: dict[str, Tensor], data: dict[str, Tensor]) -> Tensor:
        return torch.cat([p.flatten(1) for p in self.pieces({**local, **shared}, data["u0"])], dim=1)


class Solver(nn.Module):
    """The backbone and, for hard-constrained arms, the (MoE) constraint layer: u0 (batch, nx) -> u."""

    def __init__(self, physics: Physics, p: PIHCProtocol, experts: tuple[int, int] | None) -> None:
        super().__init__()
        self.physics = physics
        self.net = fno_net(1 if experts is None else p.n_basis, p.modes, p.width, p.layers).double()
        self.layer = None
        if experts is not None:
            k = experts[0] * experts[1]
            self.layer = HardConstraintMoE(physics.nlls_residual, experts, max(1, p.points // k), ridge=p.ridge,
                                           hessian=p.hessian, iters=p.lm_iters,
                                           omega_init=1.0 if physics.pde == "diffusion_sorption" else 0.0)
        self.generator: torch.Generator | None = None

    def forward(self, u0: Tensor) -> Tensor:
        out = self.net(self.physics.inputs(u0))
        if self.layer is None:
            return out[..., 0]
        terms = fd_terms(out, self.physics.dx, self.physics.dt)
        return self.layer({k: terms[k] for k in ("u", "u_t", "u_xx")}, self.physics.boundary(terms), {"u0": u0},
                          generator=self.generator, where=self.physics.interior.to(u0.device))


def _experts(arm: str, p: PIHCProtocol) -> tuple[int, int] | None:
    return None if arm == "pi_sc" else (1, 1) if arm == "pi_hc" else tuple(p.experts)


def rel_l2(model: Solver, u0: Tensor, u_ref: Tensor, batch: int = 8) -> tuple[float, Tensor]:
    """Mean relative L2 error over instances (and the predictions), evaluated without gradients."""
    model.generator = torch.Generator().manual_seed(1234)  # the same evaluation points for every model
    with torch.no_grad():
        pred = torch.cat([model(u0[i:i + batch]) for i in range(0, len(u0), batch)])
    err = torch.linalg.vector_norm((pred - u_ref).flatten(1), dim=1) / torch.linalg.vector_norm(u_ref.flatten(1), dim=1)
    model.generator = None
    return float(err.mean()), pred


def _train(model: Solver, split: Split, lr: float, steps: int, ctx: ArmContext) -> tuple[list[float], float, list]:
    """Adam on the physics loss for ``steps`` steps; returns per-epoch losses, seconds per step, LM iterations."""
    physics, p = model.physics, ctx.p
    batches = TensorBatches(split.x_train, batch_size=p.batch_size, shuffle=True, generator=ctx.generator)
    per_epoch = len(batches)
    epochs = max(1, -(-steps // per_epoch))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.generator = ctx.generator
    inner: list[int] = []

    def loss_fn(m: Solver, batch) -> Tensor:
        u0 = batch[0]
        loss = physics.loss(m(u0), u0)
        if m.layer is not None:
            inner.append(m.layer.last_info["iterations"])
        return loss

    t0 = time.perf_counter()
    hist = fit(model, opt, batches, epochs=epochs, compute_loss=loss_fn, progress=ctx.progress,
               desc=f"{SLUG}/{ctx.arm}")
    sec = (time.perf_counter() - t0) / max(1, hist.steps)
    model.generator = None
    return hist.series("train_loss"), sec, inner


def _setup(ctx: ArmContext) -> dict:
    p = ctx.p
    n = p.n_train + p.n_test
    if p.pde == "heat":
        prob = heat_problems(n, p.nt, p.nx, kappa=HEAT_KAPPA, seed=0)
    elif p.pde == "diffusion_sorption":
        prob = diffusion_sorption_problems(n, p.nt, p.nx, seed=0)
    else:
        raise ValueError(f"pde must be 'heat' or 'diffusion_sorption', got {p.pde!r}")
    # a fixed, seed-independent split of the generated instances
    split = Split(prob.u0[:p.n_train], prob.u[:p.n_train], prob.u0[p.n_train:], prob.u[p.n_train:], prob.name)
    return {"prob": prob, "split": split, "physics": Physics(prob, p.ic_eps, p.pde_scale)}


def _arm(ctx: ArmContext) -> ArmResult:
    p, data, arm = ctx.p, ctx.data, ctx.arm
    physics, split = data["physics"], data["split"]
    experts = _experts("pi_hc_moe" if arm == "moe_untrained" else arm, p)

    def build() -> Solver:
        return Solver(physics, p, experts).to(ctx.device)

    model = build()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    untrained, _ = rel_l2(model, split.x_test, split.y_test)
    metrics: dict[str, float] = {"untrained_rel_l2": untrained}
    curves: dict[str, list[float]] = {}
    info: dict = {}
    if arm != "moe_untrained":
        fit_split, val_split = holdout(split, fraction=p.val_fraction, seed=ctx.seed)

        def trial(lr: float) -> float:
            if len(p.lr_grid) == 1 or p.tune_steps == 0:
                return 0.0
            m = build()
            m.load_state_dict(init_state)
            _train(m, fit_split, lr, p.tune_steps, ctx)
            return rel_l2(m, val_split.x_test, val_split.y_test)[0]

        tuned = tune(p.lr_grid, trial, mode="min")
        model.load_state_dict(init_state)
        losses, sec, inner = _train(model, split, tuned.value, p.steps, ctx)
        metrics.update({"train_loss": losses[-1], "first_loss": losses[0], "step_ms": 1e3 * sec,
                        "lr": float(tuned.value)})
        if inner:
            metrics["inner_iters"] = sum(inner) / len(inner)
        curves["train_loss"] = losses
        info["tuned"] = tuned.as_info()
    err, pred = rel_l2(model, split.x_test, split.y_test)
    metrics["test_rel_l2"] = err
    with torch.no_grad():
        metrics["test_physics_loss"] = float(physics.loss(pred, split.x_test))
    if model.layer is not None:
        t0 = time.perf_counter()
        rel_l2(model, split.x_test[:p.batch_size], split.y_test[:p.batch_size], batch=p.batch_size)
        metrics["infer_ms"] = 1e3 * (time.perf_counter() - t0)
        metrics["optimality"] = float(model.layer.last_info["optimality"].max())
    curves["abs_err_t_end"] = (pred[0, -1] - split.y_test[0, -1]).abs().tolist()
    return ArmResult(metrics, curves, info)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    prob = ctx.data["prob"]
    out.info["curve_axes"] = {
        "train_loss": {"xlabel": "epoch", "ylabel": "physics loss", "log": True},
        "abs_err_t_end": {"xlabel": "x", "x": prob.x.tolist(), "ylabel": "|u - u_ref| at t_end (test IC 0)",
                          "log": True},
    }
    out.info["grid"] = [len(prob.t), len(prob.x)]


CLAIM = register(Claim(
    slug=SLUG,
    title="Scaling physics-informed hard constraints with mixture-of-experts",
    arxiv="2402.13412",
    statement=(
        "On 1-D diffusion-sorption (physics-only training, equal steps and learning-rate grid), hard constraints "
        "solved per subdomain (PI-HC-MoE, K experts along x) give a test relative L2 error no higher than one "
        "global hard constraint (PI-HC, same total constraint points) and lower than the soft constraint (PI-SC)"
    ),
    paper_figure=(
        "Diffusion-sorption and 2-D Navier-Stokes (Tables 1-2 of the paper): PI-HC-MoE has a lower test relative L2 "
        "error than the single global hard constraint (PI-HC) and far lower than the soft constraint (PI-SC), with "
        "more stable training than PI-HC and lower training time per epoch and inference time, largest with "
        "experts on separate GPUs (see the paper's tables for the exact values)"
    ),
    protocol=PIHCProtocol,
    data="procedural-pde",
    setup=_setup,
    arms={arm: _arm for arm in ARMS},
    finish=_finish,
    criterion=AllOf(
        Compare("test_rel_l2", "pi_hc_moe", "<=", "pi_hc"),
        Compare("test_rel_l2", "pi_hc_moe", "<", "pi_sc"),
        AllFinite(),
    ),
    primary=Primary(metric="test_rel_l2", ours="pi_hc_moe", baseline="pi_hc", ceiling=0.0, ceiling_tol=1e-3),
    control={"pi_hc_moe": "moe_untrained"},
    control_note="the MoE layer on the untrained backbone stands in for the trained PI-HC-MoE",
    uses=("gradkit.nn.hard_constraint_moe.HardConstraintMoE", "gradkit.nn.hard_constraint_moe.fd_terms",
          "gradkit.functional.implicit_nlls.ImplicitNLLS", "gradkit.functional.implicit_nlls.implicit_nlls",
          "gradkit.data.diffusion_sorption.diffusion_sorption_problems"),
    notes=(
        "Why the task can discriminate: the soft-constrained FNO must learn the front from the residual loss alone "
        "and stays well above zero error, and the hard-constrained arms differ only in K (the same backbone, "
        "basis count and total PDE points), so the comparison isolates the mixture of experts. Part of the MoE "
        "advantage at this scale is K*N degrees of freedom per instance instead of N: the negative control, the "
        "MoE layer on the untrained backbone, must not already beat the trained baselines (if it does, the "
        "verdict is INCONCLUSIVE: training was not what made the difference); untrained_rel_l2 of every arm "
        "shows the trained gain. The paper's speed claim rests on experts on separate devices and is not checked "
        "here: step_ms, infer_ms and inner_iters (LM iterations per solve) are reported for PI-HC and PI-HC-MoE. "
        "The backbone is a small FNO (the paper's has 5 layers, width 64, 16 bases and 20000 points per "
        "constraint); the IC row is divided by |u0| + ic_eps (the paper divides by u0, which vanishes away from "
        "the bump) and leaves out the corner x = 0, which belongs to the left boundary condition u = 1 (u0 is ~0 "
        "there); PDE rows use t > 0 only (on the 32x32 grid the jump to 1 at x = 0 makes the t = 0 row's "
        "finite-difference residual of the reference itself ~1e4 times that of later rows); the PDE rows are "
        "written in time t / 500 (pde_scale), else they are O(1e-3) beside O(1) IC/BC rows and weigh nothing. "
        "The learning rate is chosen per arm from the same grid on a validation split. With quick's 100 Adam "
        "steps (the paper trains ~4k) every arm stays far from the reference, so the verdict compares partly "
        "trained models; test_physics_loss and untrained_rel_l2 show how far each got. At smoke scale "
        "the linear heat equation (closed-form reference) checks the pipeline, not the claim."
    ),
    plots=("train_loss", "abs_err_t_end"),
    bounds={"test_rel_l2": (0.0, float("inf")), "untrained_rel_l2": (0.0, float("inf")),
            "train_loss": (0.0, float("inf")), "first_loss": (0.0, float("inf")),
            "test_physics_loss": (0.0, float("inf")), "step_ms": (0.0, float("inf")),
            "infer_ms": (0.0, float("inf")), "inner_iters": (0.0, 1000.0), "optimality": (0.0, 1.0),
            "lr": (0.0, 1.0)},
))
