"""MgNO (paper slug: mgno): the multigrid V-cycle operator, the network, the losses and the Darcy data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradkit._validate import ArgumentError
from gradkit.data.darcy import darcy_coefficients, darcy_solve, darcy_split, gaussian_random_field
from gradkit.nn.multigrid import MultigridConv1d, MultigridConv2d, check_levels
from gradkit.solvers.mgno import MgNO
from gradkit.solvers.operator_losses import relative_h1_loss, relative_lp_loss

OMEGA = 0.8
STENCIL = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)


# ----------------------------------------------------------------- a hand-written classical V-cycle (NumPy)
def _lap(u: np.ndarray, h: float, periodic: bool) -> np.ndarray:
    if periodic:
        nb = np.roll(u, 1, 0) + np.roll(u, -1, 0) + np.roll(u, 1, 1) + np.roll(u, -1, 1)
    else:
        p = np.pad(u, 1)
        nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (4.0 * u - nb) / h**2


def _prolong_matrix(n: int, periodic: bool) -> np.ndarray:
    """Cell-centred bilinear prolongation along one axis, n coarse -> 2n fine cells."""
    P = np.zeros((2 * n, n))
    for j in range(n):
        for off, w in ((-1, 0.25), (0, 0.75), (1, 0.75), (2, 0.25)):
            i = 2 * j + off
            if periodic:
                P[i % (2 * n), j] += w
            elif 0 <= i < 2 * n:
                P[i, j] += w
    return P


def _vcycle(f: np.ndarray, lvl: int, levels, h: float, periodic: bool) -> np.ndarray:
    pre, post = levels[lvl]
    hl = h * 2**lvl
    u = np.zeros_like(f)
    for _ in range(pre):
        u = u + OMEGA * hl**2 / 4 * (f - _lap(u, hl, periodic))
    if lvl < len(levels) - 1:
        r = f - _lap(u, hl, periodic)
        n = r.shape[0] // 2
        e = _vcycle(r.reshape(n, 2, n, 2).mean((1, 3)), lvl + 1, levels, h, periodic)
        P = _prolong_matrix(n, periodic)
        u = u + P @ e @ P.T
    for _ in range(post):
        u = u + OMEGA * hl**2 / 4 * (f - _lap(u, hl, periodic))
    return u


def _classical(levels, h: float, padding_mode: str) -> MultigridConv2d:
    """A MultigridConv2d whose weights are damped Jacobi, 5-point Laplacians, block averages and bilinear
    prolongation, with residual restriction and Pi = 0: a classical multigrid V-cycle."""
    W = MultigridConv2d(1, 1, levels, residual_restriction=True, padding_mode=padding_mode).double()
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 4
    with torch.no_grad():
        for lvl in range(W.num_levels):
            hl = h * 2**lvl
            for s in list(W.pre[lvl]) + list(W.post[lvl]):
                if s.A is not None:
                    s.A.weight.copy_(STENCIL / hl**2)
                s.S.weight.zero_()
                s.S.weight[0, 0, 1, 1] = OMEGA * hl**2 / 4
            if lvl < W.num_levels - 1:
                W.residual_A[lvl].weight.copy_(STENCIL / hl**2)
                W.restrict_u[lvl].weight.zero_()
                W.restrict_f[lvl].weight.copy_(torch.tensor([[0.0, 0, 0], [0, 1, 1], [0, 1, 1]]) / 4)
                W.prolong[lvl].conv.weight.copy_(torch.outer(k, k))
    return W


def _apply(W: nn.Module, r: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return W(torch.from_numpy(r)[None, None])[0, 0].numpy()


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_vcycle_equals_classical_multigrid(padding_mode):
    levels, n = ((2, 2), (2, 1), (1, 2), (8, 0)), 32
    W = _classical(levels, 1.0 / n, padding_mode)
    f = np.random.default_rng(0).standard_normal((n, n))
    ref = _vcycle(f, 0, levels, 1.0 / n, padding_mode == "circular")
    assert np.abs(_apply(W, f) - ref).max() < 1e-10 * max(1.0, np.abs(ref).max())


def _reduction_factor(n: int, levels, padding_mode: str, cycles: int = 10) -> float:
    """Per-cycle residual reduction of the stationary iteration u <- u + W(f - A u), geometric mean of the
    last 5 cycles."""
    h, periodic = 1.0 / n, padding_mode == "circular"
    W = _classical(levels, h, padding_mode)
    f = np.random.default_rng(1).standard_normal((n, n))
    if periodic:
        f -= f.mean()  # the periodic Laplacian is singular on constants
    u, norms = np.zeros((n, n)), []
    for _ in range(cycles):
        r = f - _lap(u, h, periodic)
        norms.append(np.linalg.norm(r))
        u = u + _apply(W, r)
    return float((norms[-1] / norms[-6]) ** (1 / 5))


def test_vcycle_iteration_converges_independently_of_n():
    # periodic: the cell-centred transfers are exact; the coarsest grid is 4x4 for both N (measured ~0.18)
    rho32 = _reduction_factor(32, ((2, 2),) * 3 + ((8, 0),), "circular")
    rho64 = _reduction_factor(64, ((2, 2),) * 4 + ((8, 0),), "circular")
    assert rho32 < 0.25 and rho64 < 0.25
    assert abs(rho32 - rho64) < 0.05
    # Dirichlet through zero padding: the cell-centred transfers meet a vertex-centred boundary, so the
    # factor is worse (measured ~0.52 at N = 32) but the iteration still converges
    assert _reduction_factor(32, ((2, 2),) * 3 + ((8, 0),), "zeros") < 0.65


@pytest.mark.parametrize("cls,shape", [(MultigridConv2d, (3, 2, 16, 16)), (MultigridConv1d, (3, 2, 32))])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_linear_without_bias(cls, shape, padding_mode):
    torch.manual_seed(0)
    W = cls(2, 5, ((1, 1), (2, 0), (1, 1)), padding_mode=padding_mode, residual_restriction=True).double()
    f, g = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        lhs, rhs = W(2.5 * f - 0.7 * g), 2.5 * W(f) - 0.7 * W(g)
    assert lhs.shape == shape[:1] + (5,) + shape[2:]
    assert torch.allclose(lhs, rhs, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("cls,shape,dims", [(MultigridConv2d, (2, 1, 16, 16), (2, 3)), (MultigridConv1d, (2, 1, 32), (2,))])
def test_circular_padding_is_translation_equivariant(cls, shape, dims):
    torch.manual_seed(1)
    W = cls(1, 3, ((1, 0), (1, 0), (2, 1)), padding_mode="circular").double()
    f = torch.randn(shape, dtype=torch.float64)
    shift = (4,) * len(dims)  # a multiple of 2**(levels - 1) keeps the coarse grids aligned
    with torch.no_grad():
        a, b = W(torch.roll(f, shift, dims)), torch.roll(W(f), shift, dims)
    assert torch.allclose(a, b, atol=1e-12)


def test_zero_padding_sees_the_boundary():
    torch.manual_seed(1)
    W = MultigridConv2d(1, 2, ((1, 0), (1, 0), (2, 0))).double()
    f = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        a, b = W(torch.roll(f, (4, 4), (2, 3))), torch.roll(W(f), (4, 4), (2, 3))
    assert (a - b).abs().max() > 1e-6


def test_receptive_field_is_global():
    W = MultigridConv2d(1, 1, ((1, 0), (1, 0), (1, 0), (2, 0))).double()
    f = torch.zeros(1, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    W(f)[0, 0, 0, 0].backward()
    assert f.grad[0, 0, -1, -1].abs() > 0  # the far corner influences the output through the coarse levels
    local = MultigridConv2d(1, 1, ((1, 0),)).double()
    g = torch.zeros(1, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    local(g)[0, 0, 0, 0].backward()
    assert g.grad[0, 0, 2:, 2:].abs().max() == 0  # one level: a 3x3 stencil


def test_gradcheck_float64():
    torch.manual_seed(0)
    W = MultigridConv2d(1, 2, ((1, 1), (1, 0)), norm=True, bias=True).double()
    f = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(W, (f,))


def test_norm_is_size_independent():
    W = MultigridConv2d(1, 4, ((1, 0), (1, 0)), norm=True, padding_mode="circular")
    for n in (8, 12, 32):
        assert W(torch.randn(2, 1, n, n)).shape == (2, 4, n, n)


def test_check_levels_and_bad_arguments():
    assert check_levels([[1, 0], [2, 1]]) == ((1, 0), (2, 1))
    with pytest.raises(ArgumentError, match=r"levels\[0\] needs at least one pre-smoothing"):
        MultigridConv2d(1, 1, ((0, 1), (1, 0)))
    with pytest.raises(ArgumentError, match=r"levels\[1\] must be a \(pre, post\) pair"):
        MultigridConv2d(1, 1, ((1, 0), (1, -1)))
    with pytest.raises(ArgumentError, match="at least one"):
        MultigridConv2d(1, 1, ())
    with pytest.raises(ArgumentError, match="padding_mode must be one of"):
        MultigridConv2d(1, 1, padding_mode="reflect")
    with pytest.raises(ArgumentError, match="in_channels must be a positive int"):
        MultigridConv2d(0, 1)
    W = MultigridConv2d(1, 2, ((1, 0), (1, 0), (1, 0)))
    with pytest.raises(ArgumentError, match=r"divisible by 2\*\*\(levels - 1\) = 4"):
        W(torch.randn(1, 1, 18, 18))
    with pytest.raises(ArgumentError, match="must have 1 channels"):
        W(torch.randn(1, 3, 16, 16))
    with pytest.raises(ArgumentError, match="shape"):
        W(torch.randn(1, 16, 16))


# ----------------------------------------------------------------- the network
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_mgno_shapes_and_dtype(padding_mode):
    m = MgNO(in_channels=2, out_channels=3, width=6, n_layers=2, levels=((1, 0), (2, 0)),
             padding_mode=padding_mode).double()
    y = m(torch.randn(4, 2, 8, 8, dtype=torch.float64))
    assert y.shape == (4, 3, 8, 8) and y.dtype == torch.float64
    m1 = MgNO(width=4, n_layers=1, levels=((1, 0), (1, 0)), dim=1, pointwise=False, norm=True, skip=True)
    assert m1(torch.randn(2, 1, 16)).shape == (2, 1, 16)
    assert m1.local is None and m1.levels == ((1, 0), (1, 0))


def test_mgno_learns_darcy():
    torch.manual_seed(0)
    s = darcy_split(16, 4, size=8, seed=3, cache=False)
    x, y = (s.x_train - 7.5) / 4.5, s.y_train / s.y_train.std()
    m = MgNO(width=6, n_layers=2, levels=((1, 0), (1, 0), (1, 0)))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = relative_lp_loss(m(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_mgno_bad_arguments():
    with pytest.raises(ArgumentError, match="skip=True needs in_channels == out_channels"):
        MgNO(in_channels=1, out_channels=2, skip=True)
    with pytest.raises(ArgumentError, match="dim must be one of"):
        MgNO(dim=3)
    with pytest.raises(ArgumentError, match="width must be a positive int"):
        MgNO(width=0)
    with pytest.raises(ArgumentError, match="act must be"):
        MgNO(act="gelu")


# ----------------------------------------------------------------- losses
def test_relative_losses_closed_form():
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64) + 1.0
    assert torch.allclose(relative_lp_loss(2 * y, y), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(relative_h1_loss(2 * y, y), torch.tensor(1.0, dtype=torch.float64))
    c = 0.1  # a constant error has no gradient: the H1 numerator is its L2 norm
    per = relative_h1_loss(y + c, y, reduction="none")
    gx, gy = torch.diff(y, dim=2) * 8, torch.diff(y, dim=3) * 8
    den = (y.flatten(1).pow(2).sum(1) + gx.flatten(1).pow(2).sum(1) + gy.flatten(1).pow(2).sum(1)).sqrt()
    assert torch.allclose(per, c * 8 / den)
    l1 = relative_lp_loss(y + c, y, p=1, reduction="sum")
    assert torch.allclose(l1, (c * 64 / y.flatten(1).sum(1)).sum())


def test_relative_losses_bad_arguments():
    y = torch.rand(2, 1, 4, 4)
    with pytest.raises(ArgumentError, match="same shape"):
        relative_lp_loss(y, y[:, :, :2])
    with pytest.raises(ArgumentError, match="p must be finite and > 0"):
        relative_lp_loss(y, y, p=0)
    with pytest.raises(ArgumentError, match="reduction must be one of"):
        relative_h1_loss(y, y, reduction="max")
    with pytest.raises(ArgumentError, match="at least 3 dims"):
        relative_h1_loss(y[:, 0, 0], y[:, 0, 0])


# ----------------------------------------------------------------- Darcy data
def test_darcy_solve_closed_forms():
    n = 31
    x = np.arange(1, n + 1) / (n + 1)
    # -(2 u')' = 1: u = x (1 - x) / 4, reproduced exactly by the 3-point stencil
    assert np.abs(darcy_solve(np.full(n, 2.0)) - x * (1 - x) / 4).max() < 1e-12
    # -Laplace u = 2 pi^2 sin(pi x) sin(pi y): second-order convergence to sin(pi x) sin(pi y)
    errs = []
    for n in (15, 31):
        x = np.arange(1, n + 1) / (n + 1)
        X, Y = np.meshgrid(x, x, indexing="ij")
        exact = np.sin(np.pi * X) * np.sin(np.pi * Y)
        errs.append(np.abs(darcy_solve(np.ones((n, n)), 2 * np.pi**2 * exact) - exact).max())
    assert 3.5 < errs[0] / errs[1] < 4.5


def test_darcy_solution_properties():
    a = darcy_coefficients(3, 16, seed=1)
    assert set(np.unique(a)) == {3.0, 12.0}
    u = darcy_solve(a[0])
    assert u.min() > 0  # maximum principle for f = 1
    assert np.abs(u - u.T).max() > 0 and np.abs(darcy_solve(a[0].T) - u.T).max() < 1e-12  # transposition
    # conservation: the face fluxes a u' of the solution drop by exactly h f across every node
    a1 = darcy_coefficients(1, 63, dim=1, seed=2)[0]
    u1 = darcy_solve(a1)
    h, up = 1 / 64, np.concatenate([[0.0], u1, [0.0]])
    af = np.concatenate([[a1[0]], 2 * a1[:-1] * a1[1:] / (a1[:-1] + a1[1:]), [a1[-1]]])
    flux = af * np.diff(up) / h
    assert np.abs(np.diff(flux) / h + 1).max() < 1e-9  # discrete conservation -(flux)' = 1


def test_grf_and_split():
    psi = gaussian_random_field(200, 16, seed=0)
    assert psi.shape == (200, 16, 16) and abs(psi.mean()) < 0.1 * psi.std()
    assert np.allclose(gaussian_random_field(2, 16, seed=5), gaussian_random_field(2, 16, seed=5))
    s = darcy_split(5, 3, size=8, dim=1, cache=False)
    assert s.x_train.shape == (5, 1, 8) and s.y_test.shape == (3, 1, 8) and s.x_train.dtype == torch.float32


def test_darcy_bad_arguments():
    with pytest.raises(ArgumentError, match="a must have shape"):
        darcy_solve(np.ones((4, 5)))
    with pytest.raises(ArgumentError, match="a must be finite and > 0"):
        darcy_solve(np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ArgumentError, match="f must be a finite number"):
        darcy_solve(np.ones(4), f=np.ones(3))
    with pytest.raises(ArgumentError, match="f must be a finite number"):
        darcy_solve(np.ones(4), f=float("nan"))
    with pytest.raises(ArgumentError, match="n_train must be a positive int"):
        darcy_split(0, 2)
    with pytest.raises(ArgumentError, match="dim must be one of"):
        gaussian_random_field(2, 8, dim=3)
