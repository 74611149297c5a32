"""Tests of locally regularised neural ODEs (paper slug: local-reg-node): the dopri5 solver, the local and
global regularisers, the neural ODE module, the weight schedule, the claim, the benchmark and the docs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradkit._validate import ArgumentError
from gradkit.schedules.exp_decay import exp_decay_weight
from gradkit.solvers.local_reg import (DOPRI5_STABILITY_SIZE, LocalErrorRegularizer, global_error_regularizer)
from gradkit.solvers.neural_ode import Autonomous, NeuralODE
from gradkit.solvers.ode import DOPRI5_TABLEAU, Dopri5, ODESolution, ODESolverError, scaled_rms_error

D = torch.float64
SPIRAL = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=D)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Counting(nn.Module):
    """A vector field that counts its calls: f(t, z) = scale * net(z) (+ t, when ``timed``)."""

    def __init__(self, dim: int = 3, hidden: int = 16, scale: float = 1.0, seed: int = 0, timed: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(D)
        self.scale, self.timed, self.calls = scale, timed, 0

    def forward(self, t, z):
        self.calls += 1
        out = self.scale * self.net(z)
        return out + torch.sin(t) if self.timed else out


def vdp(mu: float = 5.0):
    def f(t, z):
        x, v = z[..., 0], z[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)
    return f


# ---------------------------------------------------------------------------------------- the tableau
def test_tableau_orders():
    """Row sums equal the nodes; b satisfies the order conditions up to 5 (quadrature part), b_hat up to 4."""
    t = DOPRI5_TABLEAU
    for c, row in zip(t.c, t.a):
        assert abs(sum(row) - c) < 1e-14
    for q in range(1, 6):
        assert abs(sum(b * c ** (q - 1) for b, c in zip(t.b, t.c)) - 1 / q) < 1e-14
    for q in range(1, 5):
        assert abs(sum(b * c ** (q - 1) for b, c in zip(t.b_hat, t.c)) - 1 / q) < 1e-14
    assert t.b == t.a[6] + (0.0,)  # FSAL: z_new is the 7th stage's state


def test_stability_size_is_where_the_region_meets_the_real_axis():
    t = DOPRI5_TABLEAU
    A = np.zeros((7, 7))
    for i, row in enumerate(t.a):
        A[i, :len(row)] = row
    b = np.array(t.b)

    def R(x):
        return 1 + x * b @ np.linalg.solve(np.eye(7) - x * A, np.ones(7))

    assert abs(abs(R(-DOPRI5_STABILITY_SIZE)) - 1) < 1e-3
    assert abs(R(-DOPRI5_STABILITY_SIZE + 0.05)) < 1 < abs(R(-DOPRI5_STABILITY_SIZE - 0.05))


# ---------------------------------------------------------------------------------------- one step
def naive_step(f, z, t, h, weights):
    """A textbook explicit RK step with the tableau's rows and the given weights (no FSAL, no reuse)."""
    tab = DOPRI5_TABLEAU
    ks = []
    for i in range(7):
        zi = z + h * sum((a * k for a, k in zip(tab.a[i], ks)), torch.zeros_like(z))
        ks.append(f(torch.tensor(t + tab.c[i] * h, dtype=z.dtype), zi))
    return z + h * sum(w * k for w, k in zip(weights, ks))


@pytest.mark.parametrize("embedded", ["dormand-prince", "shampine"])
def test_error_vector_is_the_fifth_minus_the_fourth_order_solution(embedded):
    f = Counting(timed=True)
    solver = Dopri5(embedded=embedded)
    z = torch.randn(4, 3, dtype=D, generator=gen(1))
    step = solver.rk_step(f, z, t=0.3, dt=0.2)
    z5 = naive_step(f, z, 0.3, 0.2, solver.tableau.b)
    z4 = naive_step(f, z, 0.3, 0.2, solver.tableau.b_hat)
    torch.testing.assert_close(step.z, z5, rtol=0, atol=1e-13)
    torch.testing.assert_close(step.error, z5 - z4, rtol=0, atol=1e-13)
    torch.testing.assert_close(step.stages[-1], f(torch.tensor(0.5, dtype=D), step.z), rtol=0, atol=1e-14)


def test_rk_step_counts_and_reuses_f0():
    f = Counting()
    z = torch.randn(2, 3, dtype=D, generator=gen(2))
    Dopri5().rk_step(f, z, 0.0, 0.1)
    assert f.calls == 7
    f.calls = 0
    Dopri5().rk_step(f, z, 0.0, 0.1, f0=f(torch.tensor(0.0, dtype=D), z))
    assert f.calls == 1 + 6


def test_fixed_step_global_order_is_five():
    """dz/dt = lambda z with N equal steps: the error at t = 1 falls as h^5."""
    lam, solver = -1.3, Dopri5()
    errs = []
    for n in (8, 16, 32):
        z, h = torch.ones(1, dtype=D), 1.0 / n
        for i in range(n):
            z = solver.rk_step(lambda t, x: lam * x, z, i * h, h).z
        errs.append(abs(float(z) - math.exp(lam)))
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(4.6 < o < 5.4 for o in orders), orders


def test_local_error_estimate_is_fifth_order_in_h():
    """The embedded error of one step of dz/dt = lambda z is ~ C h^5 (4th-order method's local error)."""
    solver, z = Dopri5(), torch.ones(1, dtype=D)
    e = [float(solver.rk_step(lambda t, x: -2.0 * x, z, 0.0, h).error.abs()) for h in (0.1, 0.05)]
    assert 4.7 < math.log2(e[0] / e[1]) < 5.3


def test_rk_step_gradcheck():
    torch.manual_seed(3)
    b1, b2, w2 = torch.randn(4, dtype=D), torch.randn(2, dtype=D), torch.randn(2, 4, dtype=D)
    z = torch.randn(3, 2, dtype=D, requires_grad=True)
    w1 = torch.randn(4, 2, dtype=D, requires_grad=True)
    solver = Dopri5(1e-3, 1e-3)

    def fn(z_, w1_):
        s = solver.rk_step(lambda t, x: torch.tanh(x @ w1_.T + b1) @ w2.T + b2, z_, 0.1, 0.3)
        return s.z, s.error, solver.error_estimate(s, z_)

    assert torch.autograd.gradcheck(fn, (z, w1))


# ---------------------------------------------------------------------------------------- the solve
@pytest.mark.parametrize("lam", [-2.0, 0.7])
@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_exponential_within_tolerance(lam, tol):
    z0 = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    ts = [0.0, 0.25, 0.5, 0.9, 1.0]
    sol = Dopri5(rtol=tol, atol=tol).solve(lambda t, z: lam * z, z0, 0.0, 1.0, saveat=ts)
    exact = torch.stack([z0 * math.exp(lam * t) for t in ts])
    assert sol.y.shape == (5, 3) and sol.t.tolist() == ts
    err = (sol.y - exact).abs() / (tol + tol * exact.abs())
    assert float(err.max()) < 10.0  # global error ~ tolerance (dense output included)
    assert sol.nfe == 2 + 6 * sol.n_steps
    assert len(sol.accepted_t) == sol.n_accepted == len(sol.step_sizes) == sol.errors.numel()
    assert sol.accepted_t[-1] == 1.0 and float(sol.errors.max()) <= 1.0


def test_nfe_equals_calls_with_rejections():
    calls = [0]
    f = vdp()

    def counted(t, z):
        calls[0] += 1
        return f(t, z)

    sol = Dopri5(rtol=1e-6, atol=1e-6).solve(counted, torch.tensor([2.0, 0.0], dtype=D), 0.0, 6.0)
    assert sol.n_rejected > 0 and len(sol.rejected_errors) == sol.n_rejected
    assert all(e > 1.0 for e in sol.rejected_errors)
    assert calls[0] == sol.nfe == 2 + 6 * (sol.n_accepted + sol.n_rejected)


def test_backward_in_time():
    z0 = torch.tensor([2.0], dtype=D)
    sol = Dopri5(rtol=1e-9, atol=1e-9).solve(lambda t, z: -z, z0, 1.0, 0.0, saveat=[1.0, 0.5, 0.0])
    torch.testing.assert_close(sol.y[:, 0], 2.0 * torch.exp(torch.tensor([0.0, 0.5, 1.0], dtype=D)),
                               rtol=1e-7, atol=0)
    assert all(h < 0 for h in sol.step_sizes)


def test_more_output_times_do_not_change_the_steps():
    f = Counting(scale=2.0)
    z0 = torch.randn(5, 3, dtype=D, generator=gen(5))
    s1 = Dopri5(1e-6, 1e-6).solve(f, z0, 0.0, 2.0)
    s2 = Dopri5(1e-6, 1e-6).solve(f, z0, 0.0, 2.0, saveat=torch.linspace(0, 2, 41, dtype=D))
    assert s1.accepted_t == s2.accepted_t and s1.nfe == s2.nfe
    torch.testing.assert_close(s1.y[-1], s2.y[-1], rtol=0, atol=1e-14)


def test_solve_gradient_matches_closed_form():
    """z(1) = z0 exp(a): dz(1)/dz0 = exp(a), dz(1)/da = z0 exp(a) (backprop through the steps)."""
    a = torch.tensor(-0.8, dtype=D, requires_grad=True)
    z0 = torch.tensor([1.5], dtype=D, requires_grad=True)
    sol = Dopri5(rtol=1e-10, atol=1e-10).solve(lambda t, z: a * z, z0, 0.0, 1.0)
    ga, gz = torch.autograd.grad(sol.y_final.sum(), (a, z0))
    assert abs(float(gz) - math.exp(-0.8)) < 1e-8
    assert abs(float(ga) - 1.5 * math.exp(-0.8)) < 1e-8
    assert sol.errors.requires_grad


def test_float32_dtype_and_no_grad():
    f = Counting()
    f.net.float()
    z0 = torch.randn(4, 3, generator=gen(6))
    with torch.no_grad():
        sol = Dopri5(1e-5, 1e-5).solve(f, z0, 0.0, 1.0, save_steps=True)
    assert sol.y.dtype == torch.float32 and sol.t.dtype == torch.float32 and not sol.y.requires_grad
    assert len(sol.step_y) == sol.n_accepted
    torch.testing.assert_close(sol.step_y[-1], sol.y_final, rtol=0, atol=0)


def test_step_index():
    sol = Dopri5(1e-6, 1e-6).solve(vdp(1.0), torch.tensor([2.0, 0.0], dtype=D), 0.0, 2.0)
    for i, end in enumerate(sol.accepted_t):
        start = 0.0 if i == 0 else sol.accepted_t[i - 1]
        assert sol.step_index((start + end) / 2) == i
    assert sol.step_index(0.0) == 0 and sol.step_index(2.0) == sol.n_accepted - 1


def test_torchdiffeq_like_preset_differs_from_default_only_in_rules():
    d, t = Dopri5(), Dopri5.torchdiffeq_like()
    assert (d.controller, d.stop_at_end, d.embedded) == ("pi", True, "dormand-prince")
    assert (t.controller, t.stop_at_end, t.embedded) == ("i", False, "shampine")
    assert t.tableau.b == d.tableau.b and t.tableau.b_hat != d.tableau.b_hat


# ---------------------------------------------------------------------------------------- torchdiffeq oracle
@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("problem", ["mlp", "vdp"])
def test_agrees_with_torchdiffeq_dopri5(tol, problem):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    if problem == "mlp":
        f, z0, ts = Counting(scale=2.0), torch.randn(5, 3, dtype=D, generator=gen(7)), torch.linspace(0, 2, 7, dtype=D)
    else:
        f, z0, ts = vdp(), torch.tensor([2.0, 0.0], dtype=D), torch.linspace(0, 6, 13, dtype=D)
    calls = [0]

    def counted(t, z):
        calls[0] += 1
        return f(t, z)

    ref = torchdiffeq.odeint(counted, z0, ts, rtol=tol, atol=tol, method="dopri5")
    ref_nfe, calls[0] = calls[0], 0
    sol = Dopri5.torchdiffeq_like(tol, tol).solve(counted, z0, float(ts[0]), float(ts[-1]), saveat=ts)
    assert sol.nfe == calls[0] == ref_nfe
    torch.testing.assert_close(sol.y, ref, rtol=1e-10, atol=1e-12)


def test_gradients_agree_with_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = Counting(scale=1.5, seed=8)
    z0 = torch.randn(4, 3, dtype=D, generator=gen(9))
    ts = torch.tensor([0.0, 1.0], dtype=D)
    ps = list(f.parameters())
    g_ref = torch.autograd.grad(torchdiffeq.odeint(f, z0, ts, rtol=1e-9, atol=1e-9)[-1].square().sum(), ps)
    sol = Dopri5.torchdiffeq_like(1e-9, 1e-9).solve(f, z0, 0.0, 1.0, saveat=ts)
    g = torch.autograd.grad(sol.y[-1].square().sum(), ps)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------- regularisers
def test_local_regularizer_value_and_nfe():
    f = Counting(seed=10)
    solver = Dopri5(1e-6, 1e-6)
    reg = LocalErrorRegularizer(solver)
    z = torch.randn(3, 3, dtype=D, generator=gen(11))
    f.calls = 0
    step = reg.step(f, z, 0.4)
    assert f.calls == step.nfe == 8 and step.dt > 0 and step.tau == 0.4
    s = solver.rk_step(f, z, 0.4, step.dt)
    eest = scaled_rms_error(s.error, z, s.z, solver.rtol, solver.atol)  # the same tolerances as the solve
    torch.testing.assert_close(step.eest, eest, rtol=1e-12, atol=0)
    torch.testing.assert_close(step.value, eest * step.dt, rtol=1e-12, atol=0)
    f.calls = 0
    given = reg.step(f, z, 0.4, dt=0.05)
    assert f.calls == given.nfe == 7 and given.dt == 0.05


def test_local_regularizer_gradcheck():
    torch.manual_seed(12)
    lin1, lin2 = nn.Linear(2, 4).to(D), nn.Linear(4, 2).to(D)
    z = torch.randn(3, 2, dtype=D, generator=gen(13))
    reg = LocalErrorRegularizer(Dopri5(1e-3, 1e-3))

    def fn(w1, w2):
        f = lambda t, x: torch.tanh(x @ w1.T + lin1.bias) @ w2.T + lin2.bias  # noqa: E731
        return reg(f, z, 0.0, dt=0.2)

    w1 = lin1.weight.detach().clone().requires_grad_(True)
    w2 = lin2.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (w1, w2))


def test_stiffness_estimate_of_a_linear_system_is_its_rate():
    """For dz/dt = lambda z: k7 - k6 = lambda (z_new - g6), so R_S = |lambda| / stability size."""
    reg = LocalErrorRegularizer(Dopri5(), kind="stiffness", eps=1e-30)
    r = reg(lambda t, z: -4.0 * z, torch.tensor([1.0, 2.0], dtype=D), 0.0, dt=0.1)
    assert abs(float(r) - 4.0 / DOPRI5_STABILITY_SIZE) < 1e-9


def test_regularizer_with_detached_state_reaches_only_parameters():
    f = Counting(seed=14)
    z0 = torch.randn(2, 3, dtype=D, generator=gen(15), requires_grad=True)
    node = NeuralODE(f, solver=Dopri5(1e-6, 1e-6), regularize="unbiased", generator=gen(16))
    _, reg = node(z0)
    reg.backward()
    assert z0.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in f.parameters())
    z1 = z0.detach().clone().requires_grad_(True)
    node2 = NeuralODE(f, solver=Dopri5(1e-6, 1e-6), regularize="unbiased", detach_state=False, generator=gen(16))
    node2(z1)[1].backward()
    assert z1.grad is not None and float(z1.grad.abs().sum()) > 0


def test_zero_error_has_a_zero_gradient():
    """A zero field has an exactly zero error vector: EEst = 0 with a finite (zero) gradient, not NaN."""
    c = torch.zeros(2, dtype=D, requires_grad=True)
    r = LocalErrorRegularizer(Dopri5())(lambda t, z: c.expand_as(z), torch.ones(3, 2, dtype=D), 0.0, dt=0.1)
    (g,) = torch.autograd.grad(r, c)
    assert float(r.detach()) == 0.0 and torch.isfinite(g).all()


def test_global_regularizer_is_the_sum_over_accepted_steps():
    f = Counting(scale=2.0, seed=17)
    sol = Dopri5(1e-6, 1e-6).solve(f, torch.randn(3, 3, dtype=D, generator=gen(18)), 0.0, 1.0)
    r = global_error_regularizer(sol)
    manual = sum(float(e) * abs(h) for e, h in zip(sol.errors.detach(), sol.step_sizes))
    assert abs(float(r.detach()) - manual) < 1e-12
    grads = torch.autograd.grad(r, list(f.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_unbiased_estimate_tracks_the_time_integral():
    """(t1 - t0) * R_E(tau), tau ~ U(t0, t1), averaged over draws, matches the time integral of R_E(z(t))."""
    f = lambda t, z: (z ** 3) @ SPIRAL  # noqa: E731
    z0 = torch.tensor([[2.0, 0.0]], dtype=D)
    solver = Dopri5(1e-6, 1e-6)
    node = NeuralODE(f, t_span=(0.0, 2.0), solver=solver, regularize="unbiased", generator=gen(19))
    draws, taus = [], []
    for _ in range(300):
        _, r = node(z0)
        draws.append(2.0 * float(r))
        taus.append(node.last_tau)
    grid = torch.linspace(0.0, 2.0, 401, dtype=D).tolist()
    traj = solver.solve(f, z0, 0.0, 2.0, saveat=grid).y
    reg = LocalErrorRegularizer(solver)
    vals = [float(reg(f, traj[i], t)) for i, t in enumerate(grid)]
    integral = float(np.trapezoid(vals, grid)) if hasattr(np, "trapezoid") else float(np.trapz(vals, grid))
    mc, se = float(np.mean(draws)), float(np.std(draws) / math.sqrt(len(draws)))
    assert abs(mc - integral) < 4 * se + 1e-3 * abs(integral), (mc, integral, se)
    assert 0.0 <= min(taus) and max(taus) < 2.0 and abs(np.mean(taus) - 1.0) < 0.15


# ---------------------------------------------------------------------------------------- the module
def test_inserting_tau_does_not_change_the_outputs():
    f = Counting(scale=2.0, seed=20)
    z0 = torch.randn(4, 3, dtype=D, generator=gen(21))
    ts = [0.0, 0.3, 0.6, 1.0]
    node = NeuralODE(f, solver=Dopri5(1e-6, 1e-6), regularize="unbiased", generator=gen(22))
    traj_train, reg = node(z0, saveat=ts)
    sol_train = node.last_solution
    node.eval()
    traj_eval, none = node(z0, saveat=ts)
    assert none is None and reg is not None and traj_train.shape == (4, 4, 3)
    torch.testing.assert_close(traj_train, traj_eval, rtol=0, atol=1e-14)
    assert sol_train.accepted_t == node.last_solution.accepted_t
    z1_train, _ = node.train()(z0)
    torch.testing.assert_close(z1_train, traj_eval[-1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode, extra", [(None, 0), ("unbiased", 8), ("biased", 8), ("global", 0)])
def test_module_nfe_counts_the_regulariser_step(mode, extra):
    f = Counting(seed=23)
    node = NeuralODE(f, solver=Dopri5(1e-6, 1e-6), regularize=mode, generator=gen(24))
    f.calls = 0
    z1, reg = node(torch.randn(2, 3, dtype=D, generator=gen(25)))
    assert f.calls == node.last_nfe == node.last_solution.nfe + extra
    assert (reg is None) == (mode is None)
    if mode == "biased":
        assert node.last_tau in node.last_solution.accepted_t
    node.eval()
    f.calls = 0
    _, reg = node(torch.randn(2, 3, dtype=D, generator=gen(25)))
    assert reg is None and f.calls == node.last_nfe == node.last_solution.nfe  # eval: no regulariser step


@pytest.mark.parametrize("mode", ["unbiased", "biased"])
def test_solver_step_size_option(mode):
    f = Counting(seed=26)
    node = NeuralODE(f, solver=Dopri5(1e-6, 1e-6), regularize=mode, step_size="solver", generator=gen(27))
    f.calls = 0
    node(torch.randn(2, 3, dtype=D, generator=gen(28)))
    assert f.calls == node.last_nfe == node.last_solution.nfe + 7


def test_autonomous_wrapper_and_parameters_registered():
    net = nn.Linear(3, 3)
    node = NeuralODE(Autonomous(net))
    assert set(map(id, node.parameters())) == set(map(id, net.parameters()))
    assert "regularize=None" in repr(node)


def test_exp_decay_weight():
    assert exp_decay_weight(0, 10, 2.5, 1.0) == 2.5
    assert exp_decay_weight(10, 10, 2.5, 1.0) == 1.0 and exp_decay_weight(50, 10, 2.5, 1.0) == 1.0
    assert abs(exp_decay_weight(5, 10, 2.5, 1.0) - math.sqrt(2.5)) < 1e-12
    ws = [exp_decay_weight(s, 10, 2.5, 1.0) for s in range(11)]
    assert all(a > b for a, b in zip(ws, ws[1:]))


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(rtol=0.0), "rtol must be finite and > 0, got 0.0"),
    (dict(rtol=-1e-6), "rtol must be finite and > 0"),
    (dict(atol=0), "atol must be finite and > 0, got 0"),
    (dict(atol=float("nan")), "atol must be finite"),
    (dict(max_steps=0), "max_steps must be a positive int"),
    (dict(controller="p"), "controller must be one of"),
    (dict(embedded="x"), "embedded must be one of"),
    (dict(min_factor=1.5), "min_factor must be in"),
    (dict(max_factor=0.5), "max_factor must be > 1"),
    (dict(safety=0.0), "safety must be in"),
    (dict(first_step=-0.1), "first_step must be finite and > 0"),
])
def test_solver_arguments(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        Dopri5(**kwargs)


def test_step_budget_exhausted_names_the_time_reached():
    with pytest.raises(ODESolverError, match=r"max_steps=5 exhausted .* at t=[0-9.e-]+, before reaching t1=30"):
        Dopri5(1e-8, 1e-8, max_steps=5).solve(vdp(), torch.tensor([2.0, 0.0], dtype=D), 0.0, 30.0)


def test_non_finite_dynamics_raise_with_the_time():
    f = lambda t, z: z * (1e300 if float(t) > 0.5 else 1.0)  # noqa: E731
    with pytest.raises(ODESolverError, match=r"non-finite .* t=0\.\d+"):
        Dopri5().solve(f, torch.ones(2, dtype=D), 0.0, 1.0)


@pytest.mark.parametrize("call, match", [
    (lambda s: s.solve(lambda t, z: z, torch.ones(2), 1.0, 1.0), "t1 must differ from t0"),
    (lambda s: s.solve(lambda t, z: z, torch.ones(2), 0.0, 1.0, saveat=[0.5, 1.5]), r"saveat\[1\] must be in \[0, 1\]"),
    (lambda s: s.solve(lambda t, z: z, torch.ones(2), 0.0, 1.0, saveat=[0.5, 0.2]), "saveat must run from t0"),
    (lambda s: s.solve(lambda t, z: z, torch.ones(2), 0.0, 1.0, saveat=[]), "at least one time"),
    (lambda s: s.solve(lambda t, z: z, torch.ones(2, dtype=torch.int64), 0.0, 1.0), "floating-point"),
    (lambda s: s.solve(lambda t, z: z, torch.tensor([1.0, float("nan")]), 0.0, 1.0), "z0 must be finite"),
    (lambda s: s.solve(lambda t, z: z.sum(), torch.ones(2), 0.0, 1.0), r"f\(t, z\) must return a tensor"),
    (lambda s: s.rk_step(lambda t, z: z, torch.ones(2), 0.0, 0.0), "dt must be non-zero"),
    (lambda s: s.solve(lambda t, z: z, torch.ones(2), 0.0, float("inf")), "t1 must be finite"),
])
def test_solve_bad_input(call, match):
    with pytest.raises(ArgumentError, match=match):
        call(Dopri5())


def test_regularizer_and_module_bad_input():
    with pytest.raises(ArgumentError, match="kind must be one of"):
        LocalErrorRegularizer(kind="jacobian")
    with pytest.raises(ArgumentError, match="solver must be a gradkit.solvers.ode.Dopri5"):
        LocalErrorRegularizer(solver="dopri5")
    with pytest.raises(ArgumentError, match="regularize must be one of"):
        NeuralODE(lambda t, z: z, regularize="local")
    with pytest.raises(ArgumentError, match="t_span must have t0 != t1"):
        NeuralODE(lambda t, z: z, t_span=(1.0, 1.0))
    with pytest.raises(ArgumentError, match="t_span must be a pair"):
        NeuralODE(lambda t, z: z, t_span=1.0)
    with pytest.raises(ArgumentError, match="kind must be 'error' with regularize='global'"):
        NeuralODE(lambda t, z: z, regularize="global", kind="stiffness")
    with pytest.raises(ArgumentError, match="func must be callable"):
        NeuralODE(3)
    with pytest.raises(ArgumentError, match="solution must be an ODESolution"):
        global_error_regularizer(None)
    with pytest.raises(ArgumentError, match="step_size must be one of"):
        NeuralODE(lambda t, z: z, step_size="fixed")
    for args, match in [((-1, 10, 2.5, 1.0), "step must be a non-negative int"), ((0, 0, 2.5, 1.0), "total must be"),
                        ((0, 10, 0.0, 1.0), "w_start must be finite and > 0"), ((0, 10, 1.0, -1.0), "w_end must be")]:
        with pytest.raises(ArgumentError, match=match):
            exp_decay_weight(*args)


def test_solution_step_index_out_of_range():
    sol = Dopri5().solve(lambda t, z: -z, torch.ones(1, dtype=D), 0.0, 1.0)
    assert isinstance(sol, ODESolution)
    with pytest.raises(ArgumentError, match=r"t must be in the solved interval \[0, 1\], got 2.0"):
        sol.step_index(2.0)


# ---------------------------------------------------------------------------------------- claim, bench, docs
def test_claim_smoke_checks(smoke_run):
    out = smoke_run("local-reg-node")
    checks = out.info["checks"]
    for k in ("reg_all_finite", "reg_grad_reaches_params", "reg_grad_skips_state", "nfe_equals_calls"):
        assert checks[k] == 1.0, k
    assert checks["spiral_mse_last"] < 0.5 * checks["spiral_mse_first"]
    m = out.metrics
    assert m["local"]["train_nfe"] >= 8 + 8 and m["vanilla"]["train_nfe"] >= 8  # a solve + the regulariser's step
    assert m["vanilla"]["final_reg"] == 0.0 and m["global"]["final_reg"] > 0


def test_criterion_gate_and_control():
    from gradkit.harness.claims.local_reg_node import CRITERION

    def seeds(v_nfe, l_nfe, v_acc=40.0, l_acc=40.0):
        return [{"vanilla": {"test_nfe": v_nfe, "test_acc": v_acc}, "local": {"test_nfe": l_nfe, "test_acc": l_acc}}]

    assert CRITERION.evaluate(seeds(50.0, 38.0))[0]
    assert not CRITERION.evaluate(seeds(50.0, 42.0))[0]
    assert not CRITERION.evaluate(seeds(50.0, 30.0, l_acc=38.0))[0]
    ok, checks = CRITERION.evaluate(seeds(20.0, 20.0))  # too easy: vacuous pass (INCONCLUSIVE with the control)
    assert ok and checks[0].detail.startswith("vacuous")


def test_benchmark_runs():
    import gradkit.harness.benchmarks.local_reg_node  # noqa: F401  (registers the benchmarks)
    from gradkit.harness.bench import BENCHMARKS

    res = BENCHMARKS.get("local-reg-node-step-local").run(1)
    assert res.baseline_s > 0 and res.candidate_s > 0
    assert res.extra["candidate_nfe"] == res.extra["solve_nfe"] + 8
