"""Lagrangian PINNs (paper slug: lpinn): residuals against closed forms, the diffusion chain rule, the
Lagrangian -> Eulerian map and its fold check, the reference solutions, bad input, and the claim at smoke."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.data.transport import burgers_solution, convection_diffusion_solution, fourier_coefficients
from gradkit.solvers.lpinn import (CharacteristicFoldError, LagrangianPINN, PeriodicMLP, characteristic_folds,
                                   lagrangian_to_eulerian, lpinn_loss, lpinn_residuals, pinn_loss, pinn_residual)

TWO_PI = 2 * math.pi


class ClosedForm(nn.Module):
    """(u, X) given in closed form: a stand-in for a trained LagrangianPINN."""

    def __init__(self, u_fn, x_fn):
        super().__init__()
        self.u_fn, self.x_fn = u_fn, x_fn

    def forward(self, xi, t):
        xi, t = torch.broadcast_tensors(xi, t)
        return self.u_fn(xi, t), self.x_fn(xi, t)


def _pts(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * TWO_PI,
            torch.rand(n, generator=g, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ residuals
def test_residuals_vanish_on_exact_characteristics_convection():
    c = 30.0
    model = ClosedForm(lambda xi, t: torch.sin(xi) + 0 * t, lambda xi, t: xi + c * t)
    r_x, r_u = lpinn_residuals(model, *_pts(), flux=c)
    assert r_x.abs().max() < 1e-6 and r_u.abs().max() < 1e-6


def test_residuals_vanish_on_inviscid_burgers_characteristics():
    # before the shock, X = xi + u0(xi) t and u = u0(xi) solve u_t + u u_x = 0 exactly
    u0 = lambda s: 0.5 * torch.sin(s) + 2.0  # noqa: E731
    model = ClosedForm(lambda xi, t: u0(xi) + 0 * t, lambda xi, t: xi + u0(xi) * t)
    r_x, r_u = lpinn_residuals(model, *_pts(), flux=lambda u: u)
    assert r_x.abs().max() < 1e-6 and r_u.abs().max() < 1e-6


def test_physical_diffusion_uses_the_chain_rule_through_the_warped_map():
    # X = xi + 0.1 sin xi, u = sin(X): d2u/dX2 = -sin X, so R_u = u_t + nu sin X = nu sin X (u_t = 0)
    nu = 0.3
    model = ClosedForm(lambda xi, t: torch.sin(xi + 0.1 * torch.sin(xi)) + 0 * t,
                       lambda xi, t: xi + 0.1 * torch.sin(xi) + 0 * t)
    xi, t = _pts()
    _, r_u = lpinn_residuals(model, xi, t, flux=0.0, nu=nu, diffusion_wrt="physical")
    X = xi + 0.1 * torch.sin(xi)
    assert torch.allclose(r_u, nu * torch.sin(X), atol=1e-6)
    # and it matches a central finite difference in X (u as a function of X is sin X)
    h = 1e-3
    fd = (torch.sin(X + h) - 2 * torch.sin(X) + torch.sin(X - h)) / h ** 2
    assert torch.allclose(r_u, -nu * fd, atol=1e-4)
    # the label form differentiates in xi instead and differs here (X_xi != 1)
    _, r_label = lpinn_residuals(model, xi, t, flux=0.0, nu=nu, diffusion_wrt="label")
    assert (r_label - r_u).abs().max() > 1e-2


def test_label_and_physical_diffusion_agree_when_x_xi_is_one():
    model = ClosedForm(lambda xi, t: torch.exp(-0.2 * t) * torch.sin(xi), lambda xi, t: xi + 3.0 * t)
    xi, t = _pts()
    a = lpinn_residuals(model, xi, t, flux=3.0, nu=0.2, diffusion_wrt="physical")[1]
    b = lpinn_residuals(model, xi, t, flux=3.0, nu=0.2, diffusion_wrt="label")[1]
    assert torch.allclose(a, b, atol=1e-10) and a.abs().max() < 1e-6  # the exact convection-diffusion solution


def test_eulerian_residual_vanishes_on_the_exact_solution():
    c, nu = 7.0, 0.1
    u = lambda x, t: torch.exp(-nu * t) * torch.sin(x - c * t)  # noqa: E731
    r = pinn_residual(u, *_pts(), flux=c, nu=nu)
    assert r.abs().max() < 1e-6


def test_loss_is_zero_for_the_exact_lagrangian_solution_and_norm_forms_relate():
    c = 5.0
    model = ClosedForm(lambda xi, t: torch.sin(xi) + 0 * t, lambda xi, t: xi + c * t)
    xi = torch.linspace(0, TWO_PI, 16, dtype=torch.float64)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    assert float(lpinn_loss(model, xi, t, torch.sin, flux=c).total) < 1e-6
    net = LagrangianPINN(width=8, depth_u=2, depth_x=2).double()
    l2 = lpinn_loss(net, xi, t, torch.sin, flux=c)
    mse = lpinn_loss(net, xi, t, torch.sin, flux=c, norm="mse")
    assert torch.allclose(l2.r_x, (mse.r_x * xi.numel() * t.numel()).sqrt())
    assert torch.allclose(l2.ic_u, (mse.ic_u * xi.numel()).sqrt())
    assert torch.allclose(l2.total, 10 * l2.r_x + l2.r_u + 1000 * (l2.ic_x + l2.ic_u))


def test_losses_train_every_parameter():
    torch.manual_seed(0)
    xi, t = torch.linspace(0, TWO_PI, 12), torch.linspace(0, 1, 5)
    for share in (False, True):
        model = LagrangianPINN(width=8, depth_u=3, depth_x=2, share_trunk=share)
        lpinn_loss(model, xi, t, torch.sin, flux=2.0, nu=0.01).total.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    net = PeriodicMLP(width=8, depth=2)
    pinn_loss(net, xi, t, torch.sin(xi), flux=2.0, nu=0.01).total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------ networks
def test_networks_are_exactly_periodic_and_shapes_broadcast():
    torch.manual_seed(0)
    net = PeriodicMLP(width=8, depth=3).double()
    t = torch.rand(5, dtype=torch.float64)
    assert torch.allclose(net(torch.zeros(5, dtype=torch.float64), t),
                          net(torch.full((5,), TWO_PI, dtype=torch.float64), t), atol=1e-12)
    model = LagrangianPINN(width=8, depth_u=3, depth_x=2, x_offset=True).double()
    u0, X0 = model(torch.zeros(5, dtype=torch.float64), t)
    u1, X1 = model(torch.full((5,), TWO_PI, dtype=torch.float64), t)
    assert torch.allclose(u0, u1, atol=1e-12) and torch.allclose(X1 - X0, torch.full_like(X0, TWO_PI), atol=1e-12)
    u, X = model(torch.rand(4, 1, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    assert u.shape == X.shape == (4, 3)
    assert PeriodicMLP(8, 2, periodic=False)(torch.rand(3), torch.rand(3)).shape == (3,)


def test_share_trunk_reuses_the_u_branch():
    shared = LagrangianPINN(width=8, depth_u=3, depth_x=2, share_trunk=True)
    separate = LagrangianPINN(width=8, depth_u=3, depth_x=2)
    assert shared.x_net is None
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in separate.parameters())
    z = torch.rand(6)
    _, X = shared(z, z)
    expected = shared.u_net.out(shared.u_net.hidden(shared.u_net.embed(z, z), 2)).squeeze(-1)
    assert torch.allclose(X, expected)


# ------------------------------------------------------------------------------------------ Lagrangian -> Eulerian
def test_interpolation_is_exact_for_linear_data_across_the_seam():
    n, s = 16, 30.3
    xi = torch.arange(n, dtype=torch.float64) * (TWO_PI / n)
    X = xi + s
    w = torch.remainder(X, TWO_PI)
    u = 2.0 + 3.0 * w  # linear in the wrapped position, one jump at the seam
    q = torch.linspace(0, TWO_PI, 101, dtype=torch.float64)
    out = lagrangian_to_eulerian(u, X, q)
    wmin, wmax = float(w.min()), float(w.max())
    inside = (q >= wmin) & (q <= wmax)
    assert torch.allclose(out[inside], 2.0 + 3.0 * q[inside], atol=1e-10)
    # in the seam cell, the line from (wmax, u(wmax)) to (wmin + 2 pi, u(wmin))
    qs = torch.remainder(q[~inside], TWO_PI)
    qs = torch.where(qs < wmin, qs + TWO_PI, qs)
    lam = (qs - wmax) / (wmin + TWO_PI - wmax)
    expect = (2.0 + 3.0 * wmax) + lam * ((2.0 + 3.0 * wmin) - (2.0 + 3.0 * wmax))
    assert torch.allclose(out[~inside], expect, atol=1e-10)


def test_translation_maps_back_to_the_travelling_wave():
    c = 30.0
    xi = torch.linspace(0, TWO_PI, 257, dtype=torch.float64)  # end point included (a repeated label)
    t = torch.linspace(0, 1, 7, dtype=torch.float64)[:, None]
    u = torch.sin(xi).expand(7, -1)
    out = lagrangian_to_eulerian(u, xi + c * t, xi)
    assert (out - torch.sin(xi - c * t)).abs().max() < 1e-3  # linear interpolation, h = 2 pi / 256


def test_interpolation_is_differentiable_in_u_and_x():
    xi = torch.linspace(0, TWO_PI, 33, dtype=torch.float64)[:-1]
    u = torch.sin(xi).requires_grad_(True)
    X = (xi + 1.3).requires_grad_(True)
    lagrangian_to_eulerian(u, X, torch.linspace(0.1, 6.0, 20, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0


def test_folds_are_detected_and_refused():
    xi = torch.linspace(0, TWO_PI, 65, dtype=torch.float64)
    smooth = xi + 5.0 + 0.5 * torch.sin(xi)  # X_xi = 1 + 0.5 cos xi > 0: no fold
    folded = xi + 5.0 + 2.0 * torch.sin(xi)  # X_xi < 0 where cos xi < -1/2
    assert characteristic_folds(torch.stack([smooth, folded])).tolist() == [False, True]
    lagrangian_to_eulerian(torch.sin(xi), smooth, xi)
    with pytest.raises(CharacteristicFoldError, match="fold"):
        lagrangian_to_eulerian(torch.sin(xi), folded, xi)
    assert torch.isfinite(lagrangian_to_eulerian(torch.sin(xi), folded, xi, on_fold="ignore")).all()


# ------------------------------------------------------------------------------------------ references
def test_convection_diffusion_reference_matches_closed_form():
    x, t = np.linspace(0, TWO_PI, 50), np.linspace(0, 1, 9)
    u = convection_diffusion_solution(lambda s: np.sin(s) + 0.5 * np.cos(3 * s), 30.0, 0.05, x, t)
    X, T = np.meshgrid(x, t)
    expect = np.exp(-0.05 * T) * np.sin(X - 30 * T) + 0.5 * np.exp(-0.45 * T) * np.cos(3 * (X - 30 * T))
    assert np.abs(u - expect).max() < 1e-10
    w, coef = fourier_coefficients(np.cos, 8)
    assert np.allclose(coef, [0, 1, 0, 0, 0]) and np.allclose(w, np.arange(5))


def test_burgers_reference_small_amplitude_is_advected_diffusion():
    # u = C + e v with e small: v_t + C v_x = nu v_xx up to O(e^2)
    C, e, nu = 5.0, 1e-4, 0.05
    x = np.linspace(0, TWO_PI, 40)
    u = burgers_solution(lambda s: C + e * np.sin(s), nu, x, [0.0, 0.3], n=64, dt=1e-3)
    expect = C + e * np.exp(-nu * 0.3) * np.sin(x - C * 0.3)
    assert np.allclose(u[0], C + e * np.sin(x), atol=1e-12)
    assert np.abs(u[1] - expect).max() < 1e-6


def test_burgers_refuses_an_unstable_explicit_step():
    with pytest.raises(ValueError, match="dt must be <= the explicit RK4 stability bound"):
        burgers_solution(lambda s: np.sin(s) + 5.0, 0.01, np.linspace(0, 1, 4), [0.1], n=256, dt=0.01)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_with_clear_errors():
    model = LagrangianPINN(width=4, depth_u=2, depth_x=1)
    xi, t = torch.rand(5), torch.rand(5)
    grid, tg = torch.linspace(0, TWO_PI, 8), torch.linspace(0, 1, 4)
    cases = [
        (lambda: lpinn_residuals(model, xi, t, flux="fast"), "flux must be a wave speed"),
        (lambda: lpinn_residuals(model, xi, t, flux=float("inf")), "flux must be finite"),
        (lambda: lpinn_residuals(model, xi, t, nu=-1.0), "nu must be finite and >= 0"),
        (lambda: lpinn_residuals(model, xi, t, nu=0.1, diffusion_wrt="x"), "diffusion_wrt must be one of"),
        (lambda: lpinn_residuals(model, xi, torch.rand(3)), "broadcastable shapes"),
        (lambda: lpinn_residuals(model, xi.long(), t), "xi must be a floating-point tensor"),
        (lambda: lpinn_residuals(model, xi, t * float("nan")), "t must be finite"),
        (lambda: lpinn_residuals(model, xi, t, flux=lambda u: u.sum()), "flux\\(u\\) must return a tensor"),
        (lambda: lpinn_loss(model, grid, tg, torch.sin, weights=(1, 1)), "weights must be a tuple of 3"),
        (lambda: lpinn_loss(model, grid, tg, torch.sin, weights=(1, -1, 1)), "weights\\[1\\] must be finite"),
        (lambda: lpinn_loss(model, grid, tg, torch.sin, norm="l1"), "norm must be one of"),
        (lambda: lpinn_loss(model, grid, tg, torch.zeros(3)), "u0 must give one value per grid point"),
        (lambda: lpinn_loss(model, grid[:, None], tg, torch.sin), "xi_grid must be a 1-D tensor"),
        (lambda: pinn_loss(PeriodicMLP(4, 1), grid, tg[:1], torch.sin), "t_grid must be a 1-D tensor of >= 2"),
        (lambda: pinn_residual(lambda x, t: x[:2], xi, t), "u_net\\(x, t\\) must return a tensor of shape"),
        (lambda: PeriodicMLP(width=0), "width must be a positive int"),
        (lambda: PeriodicMLP(period=0.0), "period must be finite and > 0"),
        (lambda: LagrangianPINN(depth_u=2, depth_x=3, share_trunk=True), "depth_x must be <= depth_u"),
        (lambda: LagrangianPINN(periodic=1), "periodic must be a bool"),
        (lambda: lagrangian_to_eulerian(torch.rand(5), torch.rand(4), grid), "u and X must have the same shape"),
        (lambda: lagrangian_to_eulerian(torch.rand(5), torch.rand(5), grid[:, None]), "x_grid must be 1-D"),
        (lambda: lagrangian_to_eulerian(torch.rand(5), torch.rand(5), grid, on_fold="warn"), "on_fold must be one"),
        (lambda: lagrangian_to_eulerian(torch.rand(5), torch.rand(5), grid, period=-1.0), "period must be"),
        (lambda: characteristic_folds(torch.rand(1)), "X must hold >= 2 labels"),
        (lambda: convection_diffusion_solution(np.sin, 1.0, -0.1, [0.0], [0.0]), "nu must be finite and >= 0"),
        (lambda: convection_diffusion_solution(np.sin, 1.0, 0.0, [[0.0]], [0.0]), "x must be a 1-D array"),
        (lambda: convection_diffusion_solution(lambda s: s[:2], 1.0, 0.0, [0.0], [0.0]), "u0 must give 256"),
        (lambda: burgers_solution(np.sin, 0.01, [0.0], [0.2, 0.1], n=16), "t must be non-decreasing"),
        (lambda: burgers_solution(np.sin, 0.01, [0.0], [0.1], n=16, dt=0.0), "dt must be finite and > 0"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


# ------------------------------------------------------------------------------------------ claim
def test_claim_smoke_learns_the_characteristic_speed(smoke_run):
    out = smoke_run("lpinn")
    c = out.info["protocol"]["c"]
    m = out.metrics["lpinn"]
    assert m["slope_err"] < 0.5 * c  # the characteristics moved from slope ~0 towards c
    assert m["loss_drop"] > 2.0 and out.metrics["pinn"]["loss_drop"] > 2.0
    rows = next(iter(out.info["images"].values()))
    assert set(rows) == {"exact", "lpinn", "pinn"}
    assert np.asarray(rows["exact"][0]).shape == np.asarray(rows["lpinn"][0]).shape
    assert len(out.info["exact_u_at_T"]) == len(out.curves["u_at_T"]["lpinn"])
