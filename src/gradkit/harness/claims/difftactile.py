"""DiffTactile claim: gradient-based system identification beats Nelder-Mead at equal simulator calls
(paper slug: difftactile).

Scene: a 2-D neo-Hookean FEM pad (``rectangle_mesh(nx, ny)``, width 2, height 0.42, damping 50/s) whose
top row is driven down onto a rigid circle (radius 0.5) for the first half of the control steps, then
slid sideways for the second half; penalty contact with Coulomb-capped friction (``gradkit.physics``).
Ground truth: mu = 1294, lam = 9201, k_n = 1500, mu_f = 0.5 (k_d, k_t known). "Observed" data, drawn per
seed: the marker displacements (every other bottom node) and the mean total contact force per control
step, plus 1% Gaussian noise (relative to each channel's RMS). Each seed also draws the start: every one of
the four parameters multiplied by 1 +- U(0.25, 0.5) (random sign).

Loss: the mean squared marker error over the markers' mean square plus the same for the force. Arms
(4 log-parameters, the same start and the same budget of simulator calls, a forward+backward rollout
counted as 3 forward rollouts -- one forward plus a backward counted as two):

- ``gradient``: Adam (lr 0.05) on the log-parameters for ``iters`` forward+backward rollouts, state
  gradients clamped to +-1000 per substep;
- ``nelder_mead``: ``scipy.optimize.minimize(method="Nelder-Mead")`` with ``3 * iters`` forward rollouts
  (initial simplex: +-``simplex`` in each log-parameter);
- ``random_search`` (negative control): ``3 * iters`` forward rollouts at log-parameters drawn uniformly
  within +-log(2) of the start, keeping the best.

Metric: mean relative parameter error (%) of the returned parameters against the ground truth.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..._validate import ArgumentError
from ...physics import Circle, DiffSim2D, PenaltyContact, SoftBody2D, energy_drift, rectangle_mesh
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, AtMost, Ratio

SLUG = "difftactile"
TRUE = {"mu": 1294.0, "lam": 9201.0, "kn": 1500.0, "mu_f": 0.5}
NAMES = tuple(TRUE)
KD, KT = 10.0, 20.0
CALLS_PER_BACKWARD = 2  # a backward pass counts as two forward rollouts
FAILED_LOSS = 1e6  # the loss of a parameter set outside the stability bound (a counted call)


@dataclass(frozen=True)
class SysIdProtocol(Protocol):
    """Pad size, rollout length, the data noise and the optimisers' budgets."""

    nx: int = scaled(smoke=6, quick=20)  # pad nodes along x
    ny: int = scaled(smoke=3, quick=5)  # pad nodes along y
    steps: int = 10  # control steps: half pressing, half sliding
    substeps: int = 10
    dt: float = 2e-4
    depth: float = 0.04  # base travel down (the circle's top starts 0.005 below the pad)
    slide: float = 0.15  # base travel sideways over the sliding half
    noise: float = 0.01  # relative noise on the observations
    perturb: tuple[float, float] = (0.25, 0.5)  # start = truth * (1 +- U(lo, hi))
    iters: int = scaled(smoke=4, quick=40)  # Adam steps (forward+backward rollouts)
    lr: float = 0.05
    simplex: float = 0.2  # Nelder-Mead's initial simplex step in log-parameter space
    search_radius: float = math.log(2.0)  # random search box half-width in log space


# ------------------------------------------------------------------------------------------ scene
def build_sim(p: SysIdProtocol, params: dict[str, float] | None = None) -> DiffSim2D:
    """The pad-on-circle scene in float64 with the given (default: ground-truth) parameters."""
    params = dict(TRUE if params is None else params)
    mesh = rectangle_mesh(p.nx, p.ny, dtype=torch.float64)
    body = SoftBody2D(mesh, mu=params["mu"], lam=params["lam"], damping=50.0).double()
    contact = PenaltyContact(kn=params["kn"], kd=KD, kt=KT, mu_f=params["mu_f"]).double()
    return DiffSim2D(body, contact, Circle(0.5, center=(0.0, -0.505)), dt=p.dt, substeps=p.substeps)


def base_trajectory(p: SysIdProtocol) -> torch.Tensor:
    """(steps, 2) base offsets: down to ``depth`` over the first half, then sideways by ``slide``."""
    press = p.steps // 2
    slide = p.steps - press
    rows = [[0.0, -p.depth * (k + 1) / press] for k in range(press)]
    rows += [[p.slide * (k + 1) / slide, -p.depth] for k in range(slide)]
    return torch.tensor(rows, dtype=torch.float64)


def log_params(sim: DiffSim2D) -> list[torch.Tensor]:
    """The four identified log-parameters (log mu, log lam, log k_n, log mu_f) in ``NAMES`` order."""
    return [sim.body.log_mu, sim.body.log_lam, sim.contact.log_kn, sim.contact.log_muf]


def set_log_params(sim: DiffSim2D, values) -> None:
    with torch.no_grad():
        for t, v in zip(log_params(sim), values):
            t.fill_(float(v))


def rel_errors(values) -> dict[str, float]:
    """Relative error (%) of each parameter given as log-values."""
    return {n: 100.0 * abs(math.exp(float(v)) / TRUE[n] - 1.0) for n, v in zip(NAMES, values)}


class Objective:
    """The system-identification loss of one scene, counting forward-equivalent simulator calls."""

    def __init__(self, sim: DiffSim2D, traj: torch.Tensor, obs: dict[str, torch.Tensor]) -> None:
        self.sim, self.traj, self.obs = sim, traj, obs
        self.scale = {k: obs[k].pow(2).mean() for k in ("markers", "contact_force")}
        self.calls = 0
        self.best = float("inf")
        self.best_values: list[float] | None = None
        self.trace: list[float] = []  # best loss so far after each counted call

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(((out[k] - self.obs[k]).pow(2).mean() / self.scale[k]) for k in self.scale)

    def _record(self, value: float, values, calls: int) -> None:
        if math.isfinite(value) and value < self.best:
            self.best, self.best_values = value, [float(v) for v in values]
        self.calls += calls
        self.trace += [self.best] * calls

    def forward(self, values) -> float:
        """One forward rollout at log-parameters ``values``; FAILED_LOSS outside the stability bound."""
        set_log_params(self.sim, values)
        try:
            with torch.no_grad():
                value = float(self.loss(self.sim.rollout(self.traj)))
        except ArgumentError:
            value = FAILED_LOSS
        value = value if math.isfinite(value) else FAILED_LOSS
        self._record(value, values, 1)
        return value

    def forward_backward(self) -> float:
        """Loss and gradients at the current parameters (1 + CALLS_PER_BACKWARD calls)."""
        values = [float(t.detach()) for t in log_params(self.sim)]
        loss = self.loss(self.sim.rollout(self.traj))
        loss.backward()
        self._record(float(loss.detach()), values, 1 + CALLS_PER_BACKWARD)
        return float(loss.detach())


def _setup(ctx: ArmContext) -> dict:
    """Observed data (truth + 1% noise) and the perturbed start, both from the seed."""
    p = ctx.p
    sim = build_sim(p)
    traj = base_trajectory(p)
    with torch.no_grad():
        clean = sim.rollout(traj)
    g = torch.Generator().manual_seed(10_000 + ctx.seed)
    obs = {}
    for k in ("markers", "contact_force"):
        rms = clean[k].pow(2).mean().sqrt()
        obs[k] = clean[k] + p.noise * rms * torch.randn(clean[k].shape, generator=g, dtype=torch.float64)
    rng = np.random.RandomState(ctx.seed)
    factors = 1.0 + rng.choice([-1.0, 1.0], size=4) * rng.uniform(*p.perturb, size=4)
    start = [math.log(TRUE[n] * f) for n, f in zip(NAMES, factors)]
    return {"traj": traj, "obs": obs, "clean_force": clean["contact_force"], "start": start}


# ------------------------------------------------------------------------------------------ arms
def _result(ctx: ArmContext, obj: Objective, values, extra: dict | None = None) -> ArmResult:
    errs = rel_errors(values)
    set_log_params(obj.sim, values)
    with torch.no_grad():
        fitted = obj.sim.rollout(obj.traj)["contact_force"]
    metrics = {"param_err": float(np.mean(list(errs.values()))), "final_loss": obj.best,
               "sim_calls": float(obj.calls), **{f"err_{n}": e for n, e in errs.items()}}
    curves = {"fit_loss": obj.trace, "force_normal": fitted[:, 1].tolist(), "force_shear": fitted[:, 0].tolist()}
    return ArmResult(metrics, curves, {"fitted": {n: math.exp(v) for n, v in zip(NAMES, values)}, **(extra or {})})


def _objective(ctx: ArmContext) -> Objective:
    d = ctx.data
    sim = build_sim(ctx.p)
    set_log_params(sim, d["start"])
    return Objective(sim, d["traj"], d["obs"])


def _gradient(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    obj = _objective(ctx)
    params = log_params(obj.sim)
    opt = torch.optim.Adam(params, lr=p.lr)
    t0 = time.perf_counter()
    for _ in range(p.iters):
        opt.zero_grad(set_to_none=True)
        try:
            obj.forward_backward()
        except ArgumentError:  # Adam stepped past the stability bound: stop with the best so far
            break
        opt.step()
    per_fb = (time.perf_counter() - t0) / max(1, p.iters)
    return _result(ctx, obj, obj.best_values, {"seconds_per_forward_backward": per_fb})


def _nelder_mead(ctx: ArmContext) -> ArmResult:
    from scipy.optimize import minimize

    p = ctx.p
    obj = _objective(ctx)
    budget = p.iters * (1 + CALLS_PER_BACKWARD)
    x0 = np.array(ctx.data["start"])
    simplex = np.vstack([x0] + [x0 + p.simplex * e for e in np.eye(4)])
    t0 = time.perf_counter()
    minimize(obj.forward, x0, method="Nelder-Mead",
             options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-8, "fatol": 1e-12})
    per_f = (time.perf_counter() - t0) / max(1, obj.calls)
    return _result(ctx, obj, obj.best_values, {"seconds_per_forward": per_f})


def _random_search(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    obj = _objective(ctx)
    x0 = np.array(ctx.data["start"])
    rng = np.random.RandomState(ctx.seed + 1)
    obj.forward(x0)
    for _ in range(p.iters * (1 + CALLS_PER_BACKWARD) - 1):
        obj.forward(x0 + rng.uniform(-p.search_radius, p.search_radius, size=4))
    return _result(ctx, obj, obj.best_values)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    """The observed force, the start's error, and two simulator checks: energy drift and autograd vs FD."""
    p, d = ctx.p, ctx.data
    start_err = rel_errors(d["start"])
    out.info.update({
        "start_param_err": float(np.mean(list(start_err.values()))), "start_errors": start_err,
        "observed_force": d["obs"]["contact_force"].tolist(),
        "energy_drift_200_substeps": free_drift(p),
        "fd_rel_error_log_kn": fd_check(p, d["traj"]),
        "calls_note": f"a forward+backward rollout counts as {1 + CALLS_PER_BACKWARD} forward rollouts",
        "curve_axes": {"fit_loss": {"xlabel": "simulator calls (forward-equivalent)", "ylabel": "best loss so far",
                                    "log": True},
                       "force_normal": {"xlabel": "control step", "ylabel": "fitted normal force on the object"},
                       "force_shear": {"xlabel": "control step", "ylabel": "fitted shear force on the object"}},
    })


def free_drift(p: SysIdProtocol, dt: float = 2.5e-5, substeps: int = 200) -> float:
    """Energy drift of the claim's pad over ``substeps`` free substeps (no contact, damping or gravity)."""
    return energy_drift(SoftBody2D(rectangle_mesh(p.nx, p.ny, dtype=torch.float64)).double(), dt, substeps)


def fd_check(p: SysIdProtocol, traj: torch.Tensor, h: float = 1e-6) -> float:
    """|autograd - central difference| / |autograd| of sum(force^2) w.r.t. log k_n (float64, no clamp)."""
    sim = build_sim(p)
    sim.grad_clip = None
    k = sim.contact.log_kn

    def loss() -> torch.Tensor:
        return sim.rollout(traj)["contact_force"].pow(2).sum()

    g = float(torch.autograd.grad(loss(), k)[0])
    with torch.no_grad():
        k += h
        lp = float(loss())
        k -= 2 * h
        lm = float(loss())
        k += h
    return abs(g - (lp - lm) / (2 * h)) / max(abs(g), 1e-12)


# ------------------------------------------------------------------------------------------ claim
CLAIM = register(Claim(
    slug=SLUG,
    title="DiffTactile: A Physics-based Differentiable Tactile Simulator for Contact-rich Robotic Manipulation",
    arxiv="2403.08716",
    statement=(
        "Identifying a soft tactile pad's material and contact parameters (mu, lambda, k_n, mu_f) from noisy "
        "marker and contact-force trajectories, gradients through the differentiable simulator (Adam, 40 "
        "forward+backward rollouts) reach a mean relative parameter error below 5%, and Nelder-Mead with the "
        "same number of simulator calls (120 forward rollouts) ends at least 2x further off (seed means)"
    ),
    paper_figure=(
        "System identification and skill learning with the differentiable simulator: gradient-based "
        "optimisation fits real sensor forces and marker displacements and reaches lower task losses with far "
        "fewer simulations than CMA-ES and PPO/SAC baselines (exact numbers not restated here)"
    ),
    protocol=SysIdProtocol,
    data="procedural pad-on-circle press and slide",
    setup=_setup,
    arms={"gradient": _gradient, "nelder_mead": _nelder_mead, "random_search": _random_search},
    finish=_finish,
    criterion=AllOf(AtMost("param_err", "gradient", 5.0),
                    Ratio(metric="param_err", arm="gradient", ref="nelder_mead", at_most=0.5),
                    AllFinite()),
    primary=Primary(metric="param_err", ours="gradient", baseline="nelder_mead", unit="%", ceiling=0.0),
    control={"gradient": "random_search"},
    control_note="random search with the same number of simulator calls stands in for the gradient arm",
    uses=("gradkit.physics.DiffSim2D", "gradkit.physics.SoftBody2D", "gradkit.physics.PenaltyContact",
          "gradkit.physics.Circle", "gradkit.physics.rectangle_mesh", "gradkit.physics.clamp_grad_hook"),
    notes=(
        "Simulator calls are counted in forward-rollout equivalents: a forward+backward rollout counts as 3 "
        "(one forward, the backward as two), so 40 Adam steps match 120 Nelder-Mead or random-search rollouts "
        "(each arm's sim_calls; the measured wall-time ratio is in info['arms'], seconds_per_forward_backward vs "
        "seconds_per_forward -- on CPU a backward costs more than two forwards). No hyperparameters are tuned "
        "for any arm (Adam lr 0.05, the Nelder-Mead simplex step 0.2 and the random-search box +-log 2 are fixed "
        "settings), so the tuning budgets are equal (none). The rollout is 10 control steps x 10 substeps "
        "(half press, half slide) rather than 20 x 10, to keep three seeds within the quick budget on CPU. The "
        "task discriminates: the start is 25-50% off in every parameter, random search with the same calls "
        "does not reach 5% (the control must fail), and Nelder-Mead is not at the 0% floor. Identifiability: "
        "per-parameter errors (err_mu, err_lam, err_kn, err_mu_f) show which parameters the data pin down; "
        "lambda of a nearly incompressible plane-strain pad and k_n only act through contact and are the "
        "weakest. Out of reach here: DiffTactile's 3-D tetrahedral sensor, MPM/PBD objects, the optical "
        "tactile-image model, calibration against a real sensor, and the skill-learning tasks against "
        "CMA-ES/RL; the claim checks the system-identification core on a 2-D analogue. info: the start's "
        "error, the energy drift over 200 free substeps at dt=2.5e-5 and the autograd-vs-central-difference "
        "error of d sum(force^2) / d log k_n."
    ),
    findings=(
        "With equal simulator calls Nelder-Mead identified the four parameters better than gradients: at quick "
        "scale Adam (40 forward+backward rollouts) reached a mean relative error of 4.2 +- 1.7% -- mu, lambda "
        "and k_n within 1%, the friction coefficient mu_f 15 +- 8% off -- and Nelder-Mead (120 rollouts) "
        "0.9 +- 0.7%. The gradients are exact (autograd matches central differences to ~1e-9 relative for all "
        "four parameters), so the gap is the optimiser with a fixed step on a loss that is flat in mu_f, and "
        "a 4-parameter smooth problem is where a simplex method is strongest."
    ),
    scale_note=(
        "The paper's sample-efficiency advantage is shown for many-parameter trajectory optimisation in 3-D; "
        "system identification of 4 parameters in a 2-D pad does not reproduce it. A trajectory-optimisation "
        "task with tens of controls (or more identified parameters) would test the claim where it is made."
    ),
    plots=("fit_loss", "force_normal", "force_shear"),
    bounds={"param_err": (0.0, float("inf")), "final_loss": (0.0, float("inf")), "sim_calls": (1.0, float("inf")),
            **{f"err_{n}": (0.0, float("inf")) for n in NAMES}},
))
