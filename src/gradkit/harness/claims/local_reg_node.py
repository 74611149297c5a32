"""Claim ``local-reg-node``: regularising the solver's error estimate of ONE step at a random time cuts a
neural ODE's function evaluations (NFE) about as much as the global (ERNODE) regulariser, at similar accuracy.

Pal, Edelman, Rackauckas, "Locally Regularized Neural Differential Equations: Some Black Boxes Were Meant
to Remain Closed!", ICML 2023 (arXiv 2303.02262).

Data: MNIST-1D generated offline (4000 train / 1000 test, 40-d signals, 10 classes). Model: Linear(40 -> 32)
-> neural ODE on [0, 1] with f(t, z) = Linear(64 -> 32)(tanh(Linear(32 -> 64)(z))) -> Linear(32 -> 10),
solved by the in-library dopri5 (rtol = atol = 1e-6), backprop through the solver's steps in every arm.
Adam 1e-3, batch 256; per seed every arm starts from the same initial weights and sees the same batches.
Arms: ``vanilla`` (no regulariser), ``local`` (ours: unbiased local regulariser EEst(tau) * dt, tau ~ U(0, 1),
dt from a fresh integrator's initial-step heuristic, as the official code), ``global`` (ERNODE: sum of
EEst_j * dt_j over every accepted step) and ``local_solver_dt`` (the local regulariser with the main
solve's own step size at tau; reported, not gated). The regularisers' weight decays exponentially
2.5 -> 1.0 over training. Metrics: test accuracy; mean NFE per test batch in eval mode (no regulariser
step); wall time of a test pass; wall time per training epoch. Sizes and epochs: ``gradkit show local-reg-node``.
Every run also fits a 2-D spiral trajectory with the local regulariser and records checks of the
components (``info["checks"]``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ...data import Split, TensorBatches, load_mnist1d
from ...engine import fit
from ...schedules.exp_decay import exp_decay_weight
from ...solvers.neural_ode import Autonomous, NeuralODE
from ...solvers.ode import Dopri5
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, Check, Criterion, Drop, Ratio, fmt, mean, seed_values

SLUG = "local-reg-node"
VANILLA, LOCAL, GLOBAL, LOCAL_SOLVER_DT = "vanilla", "local", "global", "local_solver_dt"
REGULARIZE = {VANILLA: None, LOCAL: "unbiased", GLOBAL: "global", LOCAL_SOLVER_DT: "unbiased"}
NFE_RATIO = 0.8      # NFE(local) <= 0.8 x NFE(vanilla)
ACC_DROP = 1.5       # accuracy(local) >= accuracy(vanilla) - 1.5 points
MIN_BASE_NFE = 30.0  # below this the unregularised dynamics are too easy to tell anything: INCONCLUSIVE
TAU_SEED_OFFSET = 7919  # the generator of tau: seed + offset (the same tau sequence in both local arms)
SPIRAL_A = ((-0.1, 2.0), (-2.0, -0.1))


@dataclass(frozen=True)
class LocalRegProtocol(Protocol):
    """MNIST-1D neural-ODE classifier, four arms; the spiral fit of the component checks."""

    n_samples: int = 5000                                  # MNIST-1D samples (80/20 train/test split)
    n_train: int | None = scaled(smoke=512, quick=None)    # a fixed training subset (None: all 4000)
    n_test: int | None = scaled(smoke=256, quick=None)     # a fixed test subset (None: all 1000)
    epochs: int = scaled(smoke=1, quick=20, full=100)
    batch_size: int = 256
    eval_batch: int = 256
    lr: float = 1e-3
    width: int = 32                                        # the ODE state
    hidden: int = 64                                       # the vector field's hidden layer
    rtol: float = 1e-6
    atol: float = 1e-6
    max_steps: int = 10_000
    w_start: float = 2.5                                   # regulariser weight, exponential decay
    w_end: float = 1.0
    spiral_steps: int = 200                                # Adam steps of the spiral fit (component checks)
    spiral_tol: float = 1e-4


# ------------------------------------------------------------------------------------------ model
class NODEClassifier(nn.Module):
    """Linear(d_in -> width) -> neural ODE (tanh MLP field) -> Linear(width -> classes); ``reg`` holds the
    last forward's regulariser value (None in eval mode or without a regulariser)."""

    def __init__(self, d_in: int, width: int, hidden: int, classes: int, node_kwargs: dict) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        field = Autonomous(nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width)))
        self.node = NeuralODE(field, t_span=(0.0, 1.0), **node_kwargs)
        self.out = nn.Linear(width, classes)
        self.reg: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, self.reg = self.node(self.inp(x))
        return self.out(z)


def _setup(ctx: ArmContext) -> Split:
    p = ctx.p
    split = load_mnist1d(num_samples=p.n_samples)
    n_tr = len(split.y_train) if p.n_train is None else p.n_train
    n_te = len(split.y_test) if p.n_test is None else p.n_test
    return Split(split.x_train[:n_tr], split.y_train[:n_tr], split.x_test[:n_te], split.y_test[:n_te],
                 split.name).to(ctx.device)


@torch.no_grad()
def evaluate_node(model: NODEClassifier, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
    """Eval mode (no regulariser step): accuracy (%), mean NFE per batch, wall seconds of the pass."""
    was = model.training
    model.eval()
    t0 = time.perf_counter()
    correct, nfes = 0, []
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
        nfes.append(model.node.last_nfe)
    secs = time.perf_counter() - t0
    model.train(was)
    return {"test_acc": 100.0 * correct / max(len(x), 1), "test_nfe": sum(nfes) / len(nfes), "eval_s": secs}


def _train_arm(ctx: ArmContext) -> ArmResult:
    p, split, arm = ctx.p, ctx.data, ctx.arm
    solver = Dopri5(rtol=p.rtol, atol=p.atol, max_steps=p.max_steps)
    tau_gen = torch.Generator().manual_seed(ctx.seed + TAU_SEED_OFFSET)
    node_kwargs = dict(solver=solver, regularize=REGULARIZE[arm], generator=tau_gen,
                       step_size="solver" if arm == LOCAL_SOLVER_DT else "heuristic")
    model = NODEClassifier(split.num_features, p.width, p.hidden, split.num_classes, node_kwargs).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    batches = TensorBatches(split.x_train, split.y_train, batch_size=p.batch_size, shuffle=True,
                            generator=ctx.generator)
    total = max(1, p.epochs * len(batches))
    state = {"step": 0, "t0": 0.0}
    nfe_epoch: list[float] = []
    reg_epoch: list[float] = []
    curves: dict[str, list[float]] = {"train_nfe": [], "epoch_s": []}

    def on_step_start(step: int) -> None:
        state["step"] = step

    def compute_loss(m: NODEClassifier, batch) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(m(x), y)
        nfe_epoch.append(m.node.last_nfe)
        if m.reg is not None:
            reg_epoch.append(float(m.reg.detach()))
            loss = loss + exp_decay_weight(state["step"], total, p.w_start, p.w_end) * m.reg
        return loss

    def on_epoch_start(epoch: int) -> None:
        nfe_epoch.clear()
        reg_epoch.clear()
        state["t0"] = time.perf_counter()

    def on_epoch_end(epoch: int, hist) -> None:
        curves["epoch_s"].append(time.perf_counter() - state["t0"])
        curves["train_nfe"].append(sum(nfe_epoch) / max(len(nfe_epoch), 1))

    hist = fit(model, opt, batches, epochs=p.epochs, compute_loss=compute_loss, on_step_start=on_step_start,
               on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end, progress=ctx.progress,
               desc=f"{SLUG}/{arm}")
    ev = evaluate_node(model, split.x_test, split.y_test, p.eval_batch)
    metrics = {**ev, "train_s_per_epoch": sum(curves["epoch_s"]) / max(len(curves["epoch_s"]), 1),
               "train_nfe": curves["train_nfe"][-1] if curves["train_nfe"] else float("nan"),
               "final_reg": sum(reg_epoch) / len(reg_epoch) if reg_epoch else 0.0,
               "train_loss": hist.last("train_loss")}
    return ArmResult(metrics, {"train_nfe": curves["train_nfe"], "train_loss": hist.series("train_loss")})


# ------------------------------------------------------------------------------------------ component checks
def spiral_checks(seed: int, steps: int, tol: float, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fit a 2-D linear spiral's trajectory with the unbiased local regulariser for ``steps`` Adam steps and
    check the components: the fit improves, every regulariser value is finite, ``reg.backward()`` reaches only
    the parameters (not the input state), and the NFE counts equal the calls of a counting wrapper
    (2 + 6 x steps for a solve, + 8 for the regulariser's step)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor(SPIRAL_A, device=device)
    z0 = torch.tensor([[2.0, 0.0], [0.0, 1.0]], device=device)
    ts = torch.linspace(0.0, 3.0, 16).tolist()
    target = Dopri5(1e-8, 1e-8).solve(lambda t, z: z @ a, z0, 0.0, 3.0, saveat=ts).y
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).to(device)
    calls = [0]

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return net(z)

    solver = Dopri5(rtol=tol, atol=tol)
    node = NeuralODE(field, t_span=(0.0, 3.0), solver=solver, regularize="unbiased", generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    mses, regs, nfe_ok = [], [], True
    for _ in range(steps):
        calls[0] = 0
        traj, reg = node(z0, saveat=ts)
        nfe_ok &= calls[0] == node.last_nfe == node.last_solution.nfe + 8
        mse = (traj - target).square().mean()
        opt.zero_grad(set_to_none=True)
        (mse + reg).backward()
        opt.step()
        mses.append(float(mse.detach()))
        regs.append(float(reg.detach()))
    z_in = z0.clone().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    _, reg = node(z_in, saveat=ts)
    reg.backward()
    grads = [q.grad for q in net.parameters()]
    calls[0] = 0
    sol = solver.solve(field, z0, 0.0, 3.0)
    return {
        "spiral_mse_first": mses[0] if mses else float("nan"),
        "spiral_mse_last": mses[-1] if mses else float("nan"),
        "reg_all_finite": float(all(math.isfinite(r) for r in regs)),
        "reg_grad_reaches_params": float(all(q is not None and bool(torch.isfinite(q).all()) for q in grads)
                                         and any(bool(q.abs().sum() > 0) for q in grads)),
        "reg_grad_skips_state": float(z_in.grad is None),
        "nfe_equals_calls": float(nfe_ok and calls[0] == sol.nfe == 2 + 6 * sol.n_steps),
    }


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    m = out.metrics

    def ratio(a: str, b: str, key: str) -> float:
        x, y = m[a][key], m[b][key]
        return x / y if y > 0 else float("nan")

    out.info.update({
        "nfe_ratio_local_vs_vanilla": ratio(LOCAL, VANILLA, "test_nfe"),
        "nfe_ratio_global_vs_vanilla": ratio(GLOBAL, VANILLA, "test_nfe"),
        "nfe_ratio_local_vs_global": ratio(LOCAL, GLOBAL, "test_nfe"),
        "nfe_ratio_local_solver_dt_vs_vanilla": ratio(LOCAL_SOLVER_DT, VANILLA, "test_nfe"),
        "epoch_time_ratio_local_vs_global": ratio(LOCAL, GLOBAL, "train_s_per_epoch"),
        "epoch_time_ratio_local_vs_vanilla": ratio(LOCAL, VANILLA, "train_s_per_epoch"),
        "prediction_speedup_local": ratio(VANILLA, LOCAL, "eval_s"),
        "n_train": len(ctx.data.y_train), "n_test": len(ctx.data.y_test),
        "checks": spiral_checks(ctx.seed, ctx.p.spiral_steps, ctx.p.spiral_tol, ctx.device),
        "curve_axes": {"train_nfe": {"xlabel": "epoch", "unit": "NFE per training batch"}},
    })


# ------------------------------------------------------------------------------------------ criterion


@dataclass(frozen=True)
class UnlessTooEasy(Criterion):
    """``inner``, unless mean(metric[arm]) < at_least: then one vacuous passing check, so that the negative
    control (which leaves ``arm`` in place) passes too and the verdict is INCONCLUSIVE."""

    inner: Criterion
    metric: str
    arm: str
    at_least: float

    def describe(self) -> str:
        return (f"{self.inner.describe()} (INCONCLUSIVE when {self.metric}[{self.arm}] < {self.at_least:g}: the "
                "dynamics are too easy for a regulariser to matter)")

    def checks(self, per_seed):
        m = mean(seed_values(per_seed, self.arm, self.metric))
        if math.isfinite(m) and m < self.at_least:
            return [Check(self.describe(), True, f"vacuous: {self.metric}[{self.arm}] = {fmt(m)} < {self.at_least:g}, "
                                                 "too easy to discriminate")]
        return self.inner.checks(per_seed)


CRITERION = UnlessTooEasy(
    AllOf(Ratio("test_nfe", LOCAL, VANILLA, NFE_RATIO), Drop("test_acc", LOCAL, VANILLA, ACC_DROP), AllFinite()),
    metric="test_nfe", arm=VANILLA, at_least=MIN_BASE_NFE)

CLAIM = register(Claim(
    slug=SLUG,
    title="Locally Regularized Neural Differential Equations: Some Black Boxes Were Meant to Remain Closed!",
    arxiv="2303.02262",
    statement=(
        "Adding w * EEst(tau) * dt, the error estimate of one extra dopri5 step from z(tau) at tau ~ U(0, 1), to "
        "a neural ODE classifier's loss cuts its prediction NFE to <= 0.8x the unregularised model's (seed "
        "means, eval mode) while its test accuracy drops by at most 1.5 points (MNIST-1D, rtol = atol = 1e-6, "
        "w 2.5 -> 1.0); the global (ERNODE) regulariser is trained in the same run for comparison"
    ),
    paper_figure=(
        "NFE reduced to 0.556x-0.733x of the unregularised neural ODE/SDE and predictions 1.3x-2x faster "
        "(abstract), with accuracy similar to global regularisation (ERNODE) on MNIST, PhysioNet, CIFAR-10"
    ),
    protocol=LocalRegProtocol,
    data="mnist1d",
    setup=_setup,
    arms={arm: _train_arm for arm in (VANILLA, LOCAL, GLOBAL, LOCAL_SOLVER_DT)},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="test_nfe", ours=LOCAL, baseline=VANILLA, unit="NFE"),
    control={LOCAL: VANILLA},
    control_note="the unregularised ODE stands in for the locally regularised one (the global arm is the "
                 "positive control: it shows that NFE can be cut on this task)",
    uses=(
        "gradkit.solvers.ode.Dopri5",
        "gradkit.solvers.ode.ODESolution",
        "gradkit.solvers.local_reg.LocalErrorRegularizer",
        "gradkit.solvers.local_reg.global_error_regularizer",
        "gradkit.solvers.neural_ode.NeuralODE",
        "gradkit.solvers.neural_ode.Autonomous",
        "gradkit.schedules.exp_decay.exp_decay_weight",
    ),
    notes=(
        "All arms use the paper's fixed settings (Adam 1e-3, the MNIST-ODE weights 2.5 -> 1.0; official "
        "configs of other versions use 5 -> 2.5 or 5 -> 1): no hyperparameter is selected on any data, so the "
        "tuning budgets are equal (zero trials each). The task can discriminate: the unregularised ODE needs "
        "~40-50 NFE per test batch (far above the one-step floor of 8 and the 30 below which the verdict is "
        "INCONCLUSIVE), the global regulariser cuts it on the same task, and the control (the unregularised "
        "ODE in place of ours) cannot reach 0.8x its own NFE. The local step's size is the initial-step "
        "heuristic of a fresh integrator at z(tau), as the official code (whether the paper means the "
        "integrator's own step at tau is not stated); the arm local_solver_dt uses the main solve's step "
        "at tau instead and is reported, not gated. As in the official code z(tau) and dt are constants for "
        "the regulariser. All arms backpropagate through the solver, so the paper's training-time advantage "
        "(any adjoint for the main solve) is not what the per-epoch times measure (info "
        "epoch_time_ratio_*). NFE counts every evaluation: 2 + 6 per (accepted or rejected) step. The "
        "paper's MNIST (784-d state, tolerance 1.4e-8, 7500 steps), PhysioNet, CIFAR-10 and SDE runs are not "
        "reproduced. Wall times depend on machine load."
    ),
    findings=(
        "With the official step size (a fresh integrator's initial-step heuristic at z(tau)) the local "
        "regulariser is ~1e-6 and its gradient ~1e-5 of the task gradient, so the local arm trains exactly like "
        "the unregularised one (NFE ratio 1.00, same accuracy; measured at quick and, one seed, at full scale); "
        "the same regulariser with the main solve's own step at tau cuts prediction NFE as much as the global "
        "one (0.62x at quick, 0.47x at full scale, inside or below the paper's 0.556x-0.733x)."
    ),
    plots=("train_nfe", "train_loss"),
    bounds={"test_acc": (0.0, 100.0), "test_nfe": (8.0, float("inf")), "train_nfe": (8.0, float("inf")),
            "eval_s": (0.0, float("inf")), "train_s_per_epoch": (0.0, float("inf")),
            "final_reg": (0.0, float("inf")), "train_loss": (0.0, float("inf"))},
))
