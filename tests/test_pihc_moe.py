"""pihc-moe: the implicit NLLS layer, the hard-constraint mixture of experts, finite-difference terms, the PDE
data and the claim's smoke-scale invariants."""
import math

import pytest
import torch

from gradkit._validate import ArgumentError
from gradkit.data.diffusion_sorption import (diffusion_sorption_problems, diffusion_sorption_residual, heat_problems,
                                              retardation)
from gradkit.functional.implicit_nlls import implicit_nlls, lm_solve, unrolled_nlls
from gradkit.nn.hard_constraint_moe import (HardConstraintMoE, contract, fd_terms, merge_experts, solve_hard_constraint,
                                            split_experts)

DT = torch.float64


def _lin(w, a, y):
    return (a @ w.unsqueeze(-1)).squeeze(-1) - y


def _nonlin(w, b, c):
    u = (b @ w.unsqueeze(-1)).squeeze(-1)
    return u + 0.3 * u ** 3 - c


def _ridge_solution(a, y, ridge):
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return torch.linalg.solve(a.mT @ a + ridge ** 2 * eye, (a.mT @ y.unsqueeze(-1))).squeeze(-1)


# ------------------------------------------------------------------------------------------ the NLLS layer
def test_linear_residual_gives_the_ridge_solution():
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(3, 20, 4, generator=g, dtype=DT), torch.randn(3, 20, generator=g, dtype=DT)
    res = lm_solve(_lin, torch.zeros(3, 4, dtype=DT), a, y, ridge=0.1, gtol=1e-13, iters=50)
    assert torch.allclose(res.omega, _ridge_solution(a, y, 0.1), atol=1e-10)
    assert float(res.optimality.max()) <= 1e-13
    assert res.cost[-1] <= res.cost[0]


@pytest.mark.parametrize("hessian", ["gn", "exact"])
def test_gradcheck_linear_residual(hessian):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 2, generator=g, dtype=DT).requires_grad_(True)
    y = torch.randn(2, 5, generator=g, dtype=DT).requires_grad_(True)

    def f(a, y):
        return implicit_nlls(_lin, torch.zeros(2, 2, dtype=DT), a, y, ridge=0.1, gtol=1e-14, iters=50, hessian=hessian)

    assert torch.autograd.gradcheck(f, (a, y), fast_mode=True)
    gi = torch.autograd.grad(f(a, y).sum(), (a, y))
    gc = torch.autograd.grad(_ridge_solution(a, y, 0.1).sum(), (a, y))
    for x, z in zip(gi, gc):
        assert torch.allclose(x, z, atol=1e-9)


def test_ift_gradient_equals_gradient_through_100_unrolled_iterations():
    g = torch.Generator().manual_seed(2)
    b = (0.5 * torch.randn(2, 15, 3, generator=g, dtype=DT)).requires_grad_(True)
    c = torch.randn(2, 15, generator=g, dtype=DT).requires_grad_(True)
    weights = torch.arange(1.0, 4.0, dtype=DT)
    w = implicit_nlls(_nonlin, torch.zeros(2, 3, dtype=DT), b, c, ridge=1e-2, hessian="exact", iters=100, gtol=1e-14)
    gi = torch.autograd.grad((w * weights).sum(), (b, c))
    wu = unrolled_nlls(_nonlin, torch.zeros(2, 3, dtype=DT), b, c, ridge=1e-2, iters=100)
    gu = torch.autograd.grad((wu * weights).sum(), (b, c))
    assert torch.allclose(w, wu, atol=1e-10)
    for x, z in zip(gi, gu):
        assert (x - z).abs().max() <= 1e-6


def test_gauss_newton_backward_is_exact_for_a_zero_residual_problem():
    g = torch.Generator().manual_seed(3)
    b = (0.5 * torch.randn(2, 10, 3, generator=g, dtype=DT)).requires_grad_(True)
    w_true = torch.randn(2, 3, generator=g, dtype=DT)
    u = (b @ w_true.unsqueeze(-1)).squeeze(-1)
    c = (u + 0.3 * u ** 3).detach().requires_grad_(True)  # consistent: r(w_true) = 0
    grads = {}
    for hessian in ("gn", "exact"):
        w = implicit_nlls(_nonlin, torch.zeros(2, 3, dtype=DT), b, c, hessian=hessian, iters=60, gtol=1e-14)
        assert torch.allclose(w, w_true, atol=1e-8)
        grads[hessian] = torch.autograd.grad(w.sum(), (b, c))
    for x, z in zip(grads["gn"], grads["exact"]):
        assert torch.allclose(x, z, atol=1e-7)


def test_solve_hard_constraint_and_info():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 8, 3, generator=g, dtype=DT, requires_grad=True)
    y = torch.randn(2, 8, generator=g, dtype=DT)
    w, info = solve_hard_constraint({"a": a, "y": y}, lambda w, t: _lin(w, t["a"], t["y"]), torch.zeros(2, 3, dtype=DT),
                                    ridge=0.0, gtol=1e-12, return_info=True)
    assert torch.allclose(w, torch.linalg.lstsq(a, y.unsqueeze(-1)).solution.squeeze(-1), atol=1e-9)
    assert info["iterations"] >= 1 and info["optimality"].shape == (2,)
    w.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


# ------------------------------------------------------------------------------------------ finite differences, MoE
def test_fd_terms_exact_on_quadratics():
    nt, nx = 7, 9
    t = torch.linspace(0, 2, nt, dtype=DT).view(nt, 1)
    x = torch.linspace(0, 1, nx, dtype=DT).view(1, nx)
    u = 1.5 * t ** 2 - 0.7 * x ** 2 + 0.3 * t * x + 2 * x - t + 0.5
    terms = fd_terms(u.unsqueeze(0).unsqueeze(-1), dx=1 / (nx - 1), dt=2 / (nt - 1))
    expect = {"u": u, "u_x": -1.4 * x + 0.3 * t + 2, "u_xx": torch.full_like(u, -1.4), "u_t": 3 * t + 0.3 * x - 1}
    for k, v in expect.items():
        assert (terms[k][0, ..., 0] - v.expand(nt, nx)).abs().max() <= 1e-10, k


def test_split_and_merge_are_inverse():
    grid = torch.arange(2 * 6 * 8 * 3, dtype=DT).view(2, 6, 8, 3)
    blocks = split_experts(grid, (2, 4))
    assert blocks.shape == (2, 8, 6, 3)
    assert torch.equal(blocks[0, 5], grid[0, 3:6, 2:4].reshape(6, 3))  # expert (i_t=1, i_x=1)
    assert torch.equal(merge_experts(blocks, (2, 4), (6, 8)), grid)


def _local_fit(loc, sh, data):
    return torch.cat([loc["u_t"] - 0.1 * loc["u_xx"], loc["u"] - 0.5], dim=-1)


def test_experts_without_coupling_equal_separate_solves():
    g = torch.Generator().manual_seed(5)
    basis = torch.randn(2, 8, 12, 3, generator=g, dtype=DT)
    terms = {k: v for k, v in fd_terms(basis, dx=0.1, dt=0.1).items() if k in ("u", "u_t", "u_xx")}
    moe = HardConstraintMoE(_local_fit, experts=(1, 3), ridge=1e-3, iters=40, gtol=1e-13)
    u = moe(terms)
    single = HardConstraintMoE(_local_fit, experts=(1, 1), ridge=1e-3, iters=40, gtol=1e-13)
    for k in range(3):
        part = single({n: v[:, :, 4 * k:4 * (k + 1)] for n, v in terms.items()})
        assert torch.allclose(u[:, :, 4 * k:4 * (k + 1)], part, atol=1e-9)


def test_where_mask_selects_the_local_points():
    g = torch.Generator().manual_seed(7)
    basis = torch.randn(2, 8, 8, 3, generator=g, dtype=DT)
    terms = {k: v for k, v in fd_terms(basis, dx=0.1, dt=0.1).items() if k in ("u", "u_t", "u_xx")}
    moe = HardConstraintMoE(_local_fit, experts=(1, 2), ridge=1e-3, iters=40, gtol=1e-13)
    everywhere = torch.ones(8, 8, dtype=torch.bool)
    assert torch.allclose(moe(terms, where=everywhere), moe(terms), atol=1e-10)
    later = everywhere.clone()
    later[0] = False                                   # no PDE rows at t = 0
    cropped = {k: v[:, 1:] for k, v in terms.items()}  # the same rows, the t = 0 row dropped
    full = moe(terms, where=later)
    w_rows = HardConstraintMoE(_local_fit, experts=(1, 2), ridge=1e-3, iters=40, gtol=1e-13)(cropped)
    assert torch.allclose(full[:, 1:], w_rows, atol=1e-9)
    with pytest.raises(ArgumentError, match="where must be a bool tensor"):
        moe(terms, where=torch.ones(8, 7, dtype=torch.bool))
    none_right = everywhere.clone()
    none_right[:, 4:] = False
    with pytest.raises(ArgumentError, match="without points"):
        moe(terms, where=none_right)


def test_moe_optimality_and_gradients():
    g = torch.Generator().manual_seed(6)
    basis = torch.randn(2, 8, 8, 4, generator=g, dtype=DT, requires_grad=True)
    terms = fd_terms(basis, dx=1 / 7, dt=1 / 7)
    u0 = torch.rand(2, 8, generator=g, dtype=DT)

    def heat(loc, sh, data):
        return torch.cat([loc["u_t"] - 0.1 * loc["u_xx"], sh["ic"] - data["u0"]], dim=-1)

    moe = HardConstraintMoE(heat, experts=(2, 2), points_per_expert=10, iters=30)
    u = moe({k: terms[k] for k in ("u", "u_t", "u_xx")}, {"ic": terms["u"][:, 0]}, {"u0": u0},
            generator=torch.Generator().manual_seed(0))
    assert u.shape == (2, 8, 8)
    assert float(moe.last_info["optimality"].max()) <= 1e-8
    u.pow(2).sum().backward()
    assert basis.grad is not None and torch.isfinite(basis.grad).all() and basis.grad.abs().sum() > 0
    assert "experts=(2, 2)" in repr(moe)


def test_contract_shapes():
    w = torch.randn(3, 4)
    out = contract({"a": torch.randn(3, 5, 6, 4), "b": torch.randn(3, 4)}, w)
    assert out["a"].shape == (3, 5, 6) and out["b"].shape == (3,)


# ------------------------------------------------------------------------------------------ data
def test_heat_problems_solve_the_heat_equation():
    prob = heat_problems(3, nt=40, nx=40, kappa=0.1, seed=0)
    terms = fd_terms(prob.u.unsqueeze(-1), prob.dx, prob.dt)
    r = terms["u_t"] - 0.1 * terms["u_xx"]
    assert r[:, 1:-1, 1:-1].abs().max() < 2e-2 * prob.u.abs().max()
    assert prob.u[:, :, 0].abs().max() < 1e-12 and torch.allclose(prob.u[:, 0], prob.u0)


def test_diffusion_sorption_reference():
    prob = diffusion_sorption_problems(2, nt=8, nx=8, seed=0)
    assert prob.u.shape == (2, 8, 8) and torch.isfinite(prob.u).all()
    assert torch.allclose(prob.u[:, :, 0], torch.ones(2, 8, dtype=DT))  # u(t, 0) = 1
    assert torch.allclose(prob.u[:, 0, 1:], prob.u0[:, 1:])
    assert 0.0 < float(prob.u0.max()) <= 0.2
    # retardation: the clamp keeps it finite at and below zero
    r = retardation(torch.tensor([-1.0, 0.0, 1e-8, 0.5], dtype=DT))
    assert torch.isfinite(r).all() and r[0] == r[1] and (r >= 1).all()
    assert torch.isfinite(diffusion_sorption_residual(prob.u, prob.u, prob.u)).all()


# ------------------------------------------------------------------------------------------ errors
def test_bad_arguments():
    w0 = torch.zeros(2, 3, dtype=DT)
    a, y = torch.randn(2, 5, 3, dtype=DT), torch.randn(2, 5, dtype=DT)
    with pytest.raises(ArgumentError, match="omega0 must have shape"):
        implicit_nlls(_lin, torch.zeros(3, dtype=DT), a, y)
    with pytest.raises(ArgumentError, match="omega0 must be finite"):
        implicit_nlls(_lin, torch.full((2, 3), math.nan, dtype=DT), a, y)
    with pytest.raises(ArgumentError, match="iters"):
        implicit_nlls(_lin, w0, a, y, iters=0)
    with pytest.raises(ArgumentError, match="ridge"):
        implicit_nlls(_lin, w0, a, y, ridge=-1.0)
    with pytest.raises(ArgumentError, match="gtol"):
        lm_solve(_lin, w0, a, y, gtol=0.0)
    with pytest.raises(ArgumentError, match="hessian"):
        implicit_nlls(_lin, w0, a, y, hessian="newton")
    with pytest.raises(ArgumentError, match="residual_fn must return"):
        implicit_nlls(lambda w, a, y: _lin(w, a, y)[0], w0, a, y)
    with pytest.raises(ArgumentError, match="residual_fn must be callable"):
        implicit_nlls(3, w0, a, y)
    with pytest.raises(ArgumentError, match="jacobian_fn"):
        lm_solve(_lin, w0, a, y, jacobian_fn=1)


def test_bad_moe_and_fd_arguments():
    terms = fd_terms(torch.randn(1, 6, 8, 2, dtype=DT), dx=0.1, dt=0.1)
    with pytest.raises(ArgumentError, match="experts must be a pair"):
        HardConstraintMoE(_local_fit, experts=(0, 2))
    with pytest.raises(ArgumentError, match="points_per_expert"):
        HardConstraintMoE(_local_fit, points_per_expert=0)
    with pytest.raises(ArgumentError, match="residual_fn must be callable"):
        HardConstraintMoE(None)
    with pytest.raises(ArgumentError, match="equal blocks"):
        HardConstraintMoE(_local_fit, experts=(1, 3))(terms)
    with pytest.raises(ArgumentError, match="must contain 'u'"):
        HardConstraintMoE(_local_fit)({"u_t": terms["u_t"]})
    with pytest.raises(ArgumentError, match=r"terms\['u_t'\] must have the shape"):
        HardConstraintMoE(_local_fit)({"u": terms["u"], "u_t": terms["u_t"][:, :5]})
    with pytest.raises(ArgumentError, match="batch size"):
        HardConstraintMoE(_local_fit, experts=(1, 2))(terms, data={"u0": torch.zeros(3, 8, dtype=DT)})
    with pytest.raises(ArgumentError, match="basis size"):
        HardConstraintMoE(_local_fit, experts=(1, 2))(terms, shared={"ic": torch.zeros(1, 8, 5, dtype=DT)})
    with pytest.raises(ArgumentError, match="dx"):
        fd_terms(torch.randn(1, 6, 8, 2), dx=0.0, dt=0.1)
    with pytest.raises(ArgumentError, match="nt, nx >= 4"):
        fd_terms(torch.randn(1, 3, 8, 2), dx=0.1, dt=0.1)
    with pytest.raises(ArgumentError, match="n must be a positive int"):
        diffusion_sorption_problems(0)
    with pytest.raises(ArgumentError, match="kappa"):
        heat_problems(2, kappa=-1.0)


# ------------------------------------------------------------------------------------------ the claim at smoke scale
def test_smoke_claim_optimality_and_loss_decrease(smoke_run):
    out = smoke_run("pihc-moe")
    for arm in ("pi_hc", "pi_hc_moe", "moe_untrained"):
        assert out.metrics[arm]["optimality"] <= 1e-8, arm  # ||J^T r|| <= 1e-8 ||J|| ||r|| at every expert
    for arm in ("pi_sc", "pi_hc", "pi_hc_moe"):
        assert out.metrics[arm]["train_loss"] < out.metrics[arm]["first_loss"], arm
