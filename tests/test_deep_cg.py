"""deep-cg: the Krylov solver convention (CG, IC(0)/AMG PCG), the deep conjugate direction method, its loss,
the Ritz right-hand sides, the 2-D Poisson operator and the direction network."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

from gradkit._validate import ArgumentError
from gradkit.data.poisson2d import poisson2d, poisson2d_eigenpairs, scipy_to_torch_csr, smooth_random_rhs
from gradkit.nn.deep_cg import DCDMNet2d
from gradkit.solvers.deep_cg import (DeepConjugateDirection, dcdm, lanczos_ritz, ritz_rhs_dataset,
                                     scale_invariant_residual_loss)
from gradkit.solvers.krylov import IC0, NotSPDError, SolveResult, amg_preconditioner, as_operator, cg, solve

F64 = torch.float64


def _rhs(N, k=3, seed=0):
    return smooth_random_rhs(N, k, generator=torch.Generator().manual_seed(seed))


def _scipy_iters(A, b, M=None):
    count = [0]
    x, info = sla.cg(A, b, rtol=1e-6, atol=0.0, M=M, callback=lambda _x: count.__setitem__(0, count[0] + 1))
    assert info == 0
    return count[0], x


# ------------------------------------------------------------------------------------------ Poisson operator
def test_poisson_closed_form_eigenpairs():
    N = 7
    A = poisson2d(N).to_dense()
    lam, V = poisson2d_eigenpairs(N)
    assert torch.allclose(A @ V, V * lam, atol=1e-12)
    assert torch.allclose(V.T @ V, torch.eye(N * N, dtype=F64), atol=1e-12)
    assert bool((lam[1:] >= lam[:-1]).all())
    assert math.isclose(float(lam[0]), 4 - 4 * math.cos(math.pi / (N + 1)), rel_tol=1e-12)
    assert torch.equal(torch.from_numpy(poisson2d(N, format="scipy").toarray()), A)


def test_poisson_neumann_is_singular_with_constant_null_space():
    A = poisson2d(5, dirichlet=False, format="scipy")
    assert np.abs(A @ np.ones(25)).max() < 1e-12
    assert (A - A.T).count_nonzero() == 0


def test_smooth_rhs_unit_and_deterministic():
    b1, b2 = _rhs(12, 4, seed=3), _rhs(12, 4, seed=3)
    assert b1.shape == (144, 4) and torch.equal(b1, b2)
    assert torch.allclose(b1.norm(dim=0), torch.ones(4, dtype=F64))


def test_poisson_bad_input():
    with pytest.raises(ArgumentError, match="N must be"):
        poisson2d(1)
    with pytest.raises(ArgumentError, match="format must be one of"):
        poisson2d(4, format="dense")
    with pytest.raises(ArgumentError, match="N must be"):
        poisson2d_eigenpairs(200)
    with pytest.raises(ArgumentError, match="count must be"):
        smooth_random_rhs(4, 0)
    with pytest.raises(ArgumentError, match="must be a scipy sparse"):
        scipy_to_torch_csr(np.eye(3))


# ------------------------------------------------------------------------------------------ CG
def test_cg_matches_scipy_iterates_and_counts():
    N = 16
    A, As, B = poisson2d(N), poisson2d(N, format="scipy"), _rhs(N)
    res = solve(A, B)
    assert isinstance(res, SolveResult) and bool(res.converged.all())
    for j in range(3):
        its, x = _scipy_iters(As, B[:, j].numpy())
        assert int(res.iterations[j]) == its
        assert np.allclose(res.x[:, j].numpy(), x, atol=1e-9)
    true = (B - A @ res.x).norm(dim=0)
    assert bool((true <= 1e-6 * B.norm(dim=0)).all())
    assert res.residuals.shape == (int(res.iterations.max()) + 1, 3)


def test_cg_single_rhs_batched_callable_and_dense_agree():
    N = 8
    A, b = poisson2d(N), _rhs(N, 1)[:, 0]
    ref = cg(A, b, tol=1e-10)
    assert isinstance(ref.iterations, int) and ref.converged is True and ref.x.shape == b.shape
    dense = cg(A.to_dense(), b, tol=1e-10)
    fn = cg(lambda X: A @ X, b, tol=1e-10)
    scip = cg(poisson2d(N, format="scipy"), b, tol=1e-10)
    for r in (dense, fn, scip):
        assert r.iterations == ref.iterations
        assert torch.allclose(r.x, ref.x, atol=1e-12)
    batch = cg(A, torch.stack([b, 2 * b], 1), tol=1e-10)
    assert torch.allclose(batch.x[:, 1], 2 * ref.x, atol=1e-10)


def test_cg_finite_termination_closed_form():
    # three distinct eigenvalues: CG is exact after 3 iterations, x = b / d
    d = torch.tensor([1.0, 1.0, 4.0, 4.0, 9.0, 9.0, 1.0, 4.0], dtype=F64)
    b = torch.arange(1.0, 9.0, dtype=F64)
    res = cg(torch.diag(d), b, tol=1e-12)
    assert res.iterations == 3
    assert torch.allclose(res.x, b / d, atol=1e-12)


def test_cg_x0_and_callback():
    A, b = poisson2d(6), _rhs(6, 1)[:, 0]
    seen = []
    res = cg(A, b, x0=torch.linalg.solve(A.to_dense(), b), callback=seen.append)
    assert res.iterations == 0 and res.converged and not seen
    res = cg(A, b, callback=seen.append)
    assert len(seen) == res.iterations and seen[-1].shape == b.shape


def test_cg_maxiter_reports_not_converged():
    A, b = poisson2d(16), _rhs(16, 1)[:, 0]
    res = cg(A, b, maxiter=5)
    assert res.iterations == 5 and res.converged is False
    assert float(res.relative_residuals[-1]) > 1e-6


def test_cg_bad_input():
    A, b = poisson2d(4), torch.ones(16, dtype=F64)
    with pytest.raises(ArgumentError, match="b must have 16 rows"):
        cg(A, torch.ones(15, dtype=F64))
    with pytest.raises(ArgumentError, match="tol must be finite and > 0"):
        cg(A, b, tol=0)
    with pytest.raises(ArgumentError, match="tol must be finite and > 0"):
        cg(A, b, tol=-1e-3)
    with pytest.raises(ArgumentError, match="b must be finite"):
        cg(A, torch.full((16,), float("nan"), dtype=F64))
    with pytest.raises(ArgumentError, match="x0 must have the shape of b"):
        cg(A, b, x0=torch.zeros(16, 2, dtype=F64))
    with pytest.raises(ArgumentError, match="maxiter must be a positive int"):
        cg(A, b, maxiter=0)
    with pytest.raises(ArgumentError, match="share a dtype"):
        cg(A, b.float())
    with pytest.raises(ArgumentError, match="square matrix"):
        cg(torch.ones(3, 4, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ArgumentError, match="must be a torch tensor"):
        cg([[1.0]], torch.ones(1, dtype=F64))
    with pytest.raises(ArgumentError, match="must return a tensor of the shape"):
        cg(lambda X: X[:1], b)
    with pytest.raises(ArgumentError, match="shape \\(n,\\) or \\(n, k\\)"):
        cg(A, torch.ones(16, 1, 1, dtype=F64))


def test_cg_rejects_non_spd_instead_of_looping():
    nonsym = torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=F64)
    with pytest.raises(NotSPDError, match="symmetric"):
        cg(nonsym, torch.ones(2, dtype=F64))
    with pytest.raises(NotSPDError, match="symmetric"):
        cg(lambda X: nonsym @ X, torch.ones(2, dtype=F64))
    with pytest.raises(NotSPDError, match="symmetric"):
        cg(sp.csr_matrix(nonsym.numpy()), torch.ones(2, dtype=F64))
    with pytest.raises(NotSPDError, match="diagonal entry"):
        cg(torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), torch.ones(2, dtype=F64))
    indef = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)   # eigenvalues 3, -1; positive diagonal
    with pytest.raises(NotSPDError, match="not positive definite"):
        cg(indef, torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(NotSPDError, match="M is not positive definite"):
        cg(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64), M=-torch.eye(3, dtype=F64))


# ------------------------------------------------------------------------------------------ preconditioners
def test_ic0_matches_stencil_recurrence_and_pattern():
    N = 6
    As = poisson2d(N, format="scipy")
    L = IC0(poisson2d(N)).L.toarray()
    a = As.toarray()
    d = np.zeros(N * N)
    for i in range(N * N):   # d_i^2 = a_ii - l_{i,i-1}^2 - l_{i,i-N}^2, l_{i,j} = a_ij / d_j
        s = a[i, i]
        for j in (i - 1, i - N):
            if j >= 0 and a[i, j] != 0:
                assert math.isclose(L[i, j], a[i, j] / d[j], rel_tol=1e-12)
                s -= L[i, j] ** 2
        d[i] = math.sqrt(s)
    assert np.allclose(np.diag(L), d, rtol=1e-12)
    assert np.array_equal(L != 0, np.tril(a) != 0)
    LLt = L @ L.T
    assert np.allclose(LLt[a != 0], a[a != 0], atol=1e-12)   # IC(0): exact on the pattern of A


def test_ic0_pcg_fewer_iterations_and_same_as_scipy():
    N = 16
    A, As, B = poisson2d(N), poisson2d(N, format="scipy"), _rhs(N)
    M = IC0(As)
    res = solve(A, B, M=M)
    plain = solve(A, B)
    assert bool(res.converged.all()) and bool((res.iterations * 2 < plain.iterations).all())
    its, _ = _scipy_iters(As, B[:, 0].numpy(), M=M.as_linear_operator(N * N))
    assert int(res.iterations[0]) == its


def test_ic0_breakdown_is_an_error():
    with pytest.raises(NotSPDError, match="IC\\(0\\) broke down"):
        IC0(sp.csr_matrix(np.array([[1.0, 2.0], [2.0, 1.0]])))


def test_amg_pcg():
    pytest.importorskip("pyamg")
    N = 16
    A, B = poisson2d(N), _rhs(N)
    res = solve(A, B, M=amg_preconditioner(poisson2d(N, format="scipy")))
    assert bool(res.converged.all()) and int(res.iterations.max()) <= 12


def test_amg_without_pyamg_is_a_clear_import_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "pyamg":
            raise ImportError("no pyamg")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="optional dependency pyamg"):
        amg_preconditioner(poisson2d(4, format="scipy"))


# ------------------------------------------------------------------------------------------ DCDM
def _trace(solver, *args, **kw):
    xs = []
    res = solver(*args, callback=lambda x: xs.append(x.clone()), **kw)
    return res, xs


def test_dcdm_identity_full_orthogonalisation_reproduces_cg_iterates():
    N = 6
    A, b = poisson2d(N), _rhs(N, 1)[:, 0]
    ref, xs_cg = _trace(cg, A, b, tol=1e-10)
    res, xs = _trace(dcdm, A, b, lambda r: r, k=N * N, tol=1e-10)
    assert res.iterations == ref.iterations
    for x1, x2 in zip(xs, xs_cg):
        assert torch.allclose(x1, x2, atol=1e-10, rtol=0)


def test_dcdm_identity_k2_matches_cg_up_to_roundoff():
    N = 12
    A, B = poisson2d(N), _rhs(N)
    ref = cg(A, B, tol=1e-8)
    res = dcdm(A, B, lambda r: r, k=2, tol=1e-8, recompute_residual=False)
    assert torch.equal(res.iterations, ref.iterations)
    assert torch.allclose(res.x, ref.x, atol=1e-8)


def test_dcdm_anorm_error_non_increasing_for_random_network():
    torch.manual_seed(0)
    N = 8
    A, B = poisson2d(N), _rhs(N, 2)
    xstar = torch.linalg.solve(A.to_dense(), B)
    net = DCDMNet2d(channels=4)
    errs = []

    def anorm(X):
        E = X - xstar
        errs.append((E * (A @ E)).sum(0).sqrt())

    dcdm(A, B, net, k=2, tol=1e-6, maxiter=150, grid=(N, N), callback=anorm)
    E = torch.stack(errs)
    # an untrained net's directions may stall on a column (which one, and where, depends on the CPU's last
    # bits), but each step minimises the A-norm error along its direction: it never climbs, and in all the
    # error drops
    assert len(errs) == 150 and bool(E[-1].sum() < 0.9 * E[0].sum())
    assert bool((E[1:] <= E[:-1] * (1 + 1e-10) + 1e-14).all())


def test_dcdm_scale_of_network_does_not_matter():
    torch.manual_seed(1)
    N = 6
    A, b = poisson2d(N), _rhs(N, 1)[:, 0]
    net = DCDMNet2d(channels=4).double()
    r1 = dcdm(A, b, net, grid=(N, N), maxiter=25)
    r2 = dcdm(A, b, lambda x: -7.5 * net(x), grid=(N, N), maxiter=25)
    assert r1.iterations == r2.iterations and torch.allclose(r1.x, r2.x, atol=1e-9)


def test_dcdm_restarts_on_degenerate_direction():
    A, b = poisson2d(5), _rhs(5, 1)[:, 0]
    res = dcdm(A, b, lambda r: torch.zeros_like(r), k=2)   # q = 0: every step restarts from r (steepest descent)
    assert res.converged


def test_deep_conjugate_direction_class_and_errors():
    A, b = poisson2d(6), _rhs(6, 1)[:, 0]
    solver = DeepConjugateDirection(lambda r: r, k=2, tol=1e-8, max_iter=100)
    res = solver.solve(A, b, grid=(6, 6))
    assert res.converged and "k=2" in repr(solver)
    with pytest.raises(ArgumentError, match="k must be a non-negative int"):
        DeepConjugateDirection(lambda r: r, k=-1)
    with pytest.raises(ArgumentError, match="tol must be finite and > 0"):
        DeepConjugateDirection(lambda r: r, tol=0.0)
    with pytest.raises(ArgumentError, match="max_iter must be a positive int"):
        DeepConjugateDirection(lambda r: r, max_iter=0)
    with pytest.raises(ArgumentError, match="direction_net must be"):
        DeepConjugateDirection(3)
    with pytest.raises(ArgumentError, match="grid \\(5, 5\\) holds 25 unknowns"):
        solver.solve(A, b, grid=(5, 5))
    with pytest.raises(ArgumentError, match="one value per unknown"):
        dcdm(A, b, lambda r: r[..., :3])
    with pytest.raises(ArgumentError, match="tol must be"):
        dcdm(A, b, lambda r: r, tol=0)
    with pytest.raises(ArgumentError, match="b must be finite"):
        dcdm(A, torch.full_like(b, float("inf")), lambda r: r)
    with pytest.raises(NotSPDError):
        dcdm(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64), torch.tensor([1.0, -1.0], dtype=F64), lambda r: r)
    with pytest.raises(NotSPDError, match="symmetric"):
        dcdm(torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=F64), torch.ones(2, dtype=F64), lambda r: r)


# ------------------------------------------------------------------------------------------ loss
def test_loss_scale_invariant_and_zero_at_exact_direction():
    torch.manual_seed(0)
    A = poisson2d(5)
    b, q = torch.randn(4, 25, dtype=F64), torch.randn(4, 25, dtype=F64)
    base = scale_invariant_residual_loss(A, b, q)
    for c in (-3.0, 0.5, 1e3):
        assert torch.allclose(scale_invariant_residual_loss(A, b, c * q), base, rtol=1e-10)
    exact = torch.linalg.solve(A.to_dense(), b.T).T
    assert float(scale_invariant_residual_loss(A, b, 2.5 * exact)) < 1e-20
    per = scale_invariant_residual_loss(A, b, q, reduction="none")
    assert per.shape == (4,) and torch.allclose(per.mean(), base)
    img = scale_invariant_residual_loss(A, b, q.reshape(4, 1, 5, 5))
    assert torch.allclose(img, base)


def test_loss_gradcheck_float64():
    torch.manual_seed(0)
    A = poisson2d(3).to_dense()
    b = torch.randn(2, 9, dtype=F64, requires_grad=True)
    q = torch.randn(2, 9, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b_, q_: scale_invariant_residual_loss(A, b_, q_), (b, q))


def test_loss_bad_input():
    A = poisson2d(3)
    with pytest.raises(ArgumentError, match="q must hold one direction"):
        scale_invariant_residual_loss(A, torch.ones(2, 9, dtype=F64), torch.ones(3, 9, dtype=F64))
    with pytest.raises(ArgumentError, match="reduction must be"):
        scale_invariant_residual_loss(A, torch.ones(9, dtype=F64), torch.ones(9, dtype=F64), reduction="max")
    with pytest.raises(ArgumentError, match="b has 4 unknowns"):
        scale_invariant_residual_loss(A, torch.ones(4, dtype=F64), torch.ones(4, dtype=F64))


# ------------------------------------------------------------------------------------------ Ritz data
def _low_share(data, V, low):
    proj = data.double() @ V
    return float((proj[:, :low] ** 2).sum() / (proj ** 2).sum())


def test_ritz_rhs_boosted_energy_share():
    N = 32
    m = N * N
    theta = int(0.05 * m)
    lam, V = poisson2d_eigenpairs(N)
    data = ritz_rhs_dataset(None, m=m, n_samples=400, theta=theta, eigenpairs=(lam, V), seed=0)
    assert data.shape == (400, m) and torch.allclose(data.norm(dim=1), torch.ones(400), atol=1e-5)
    h = m // 2 + theta
    expected = 81 * h / (81 * h + (m - h))
    assert abs(_low_share(data, V, h) - expected) <= 0.005


def test_lanczos_recovers_spectrum_and_paths_agree():
    N = 6
    A = poisson2d(N)
    lam, V = poisson2d_eigenpairs(N)
    theta_r, Vr = lanczos_ritz(A, m=N * N, seed=0)
    # repeated eigenvalues of the square: Lanczos sees each distinct one once
    assert np.allclose(np.unique(np.round(theta_r, 8)), np.unique(np.round(lam.numpy(), 8)), atol=1e-8)
    assert np.allclose(A.to_dense().numpy() @ Vr, Vr * theta_r, atol=1e-8)
    m, theta = len(theta_r), 1
    h = m // 2 + theta
    lanc = ritz_rhs_dataset(A, m=N * N, n_samples=3000, theta=theta, seed=1)
    share_lanczos = _low_share(lanc, torch.from_numpy(Vr), h)
    expected = 81 * h / (81 * h + (m - h))
    assert abs(share_lanczos - expected) <= 0.01
    exact = ritz_rhs_dataset(A, m=N * N, n_samples=200, theta=3, exact_eig=True, seed=1)
    assert abs(_low_share(exact, V, N * N // 2 + 3) - 81 * 21 / (81 * 21 + 15)) <= 0.01


def test_ritz_drops_null_space():
    A = poisson2d(5, dirichlet=False)
    data = ritz_rhs_dataset(A, m=25, n_samples=50, theta=1, exact_eig=True, dtype=F64)
    assert float(data.sum(1).abs().max()) < 1e-10   # orthogonal to the constants


def test_ritz_bad_input():
    with pytest.raises(ArgumentError, match="theta must be a non-negative int"):
        ritz_rhs_dataset(poisson2d(3), m=4, n_samples=2, theta=-1)
    with pytest.raises(ArgumentError, match="n must be <= 4096"):
        ritz_rhs_dataset(poisson2d(65), m=4, n_samples=2, theta=0, exact_eig=True)
    with pytest.raises(ArgumentError, match="eigenpairs must be"):
        ritz_rhs_dataset(None, m=4, n_samples=2, theta=0, eigenpairs=(torch.ones(3), torch.ones(4, 2)))


# ------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (16, 12)])
def test_network_any_grid(shape):
    net = DCDMNet2d(channels=4)
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 1, *shape)


def test_network_bad_input():
    with pytest.raises(ValueError, match="r must have shape"):
        DCDMNet2d(channels=4)(torch.randn(2, 8, 8))
    with pytest.raises(ArgumentError, match="channels must be a positive int"):
        DCDMNet2d(channels=0)


def test_as_operator_callable_needs_n():
    with pytest.raises(ArgumentError, match="size n"):
        as_operator(lambda X: X)


# ------------------------------------------------------------------------------------------ benchmark
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.deep_cg  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("deep-cg-iteration-n128")
    assert b.slug == "deep-cg" and b.target is None
    r = b.run(1)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)
    assert r.extra["cg_iterations_to_1e-6"] > 100


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="CUDA not available"))]


@pytest.mark.parametrize("device", DEVICES)
def test_solvers_on_device(device):
    torch.manual_seed(0)
    N = 8
    A = poisson2d(N).to(device)
    B = _rhs(N, 2).to(device)
    for res in (solve(A, B), solve(A, B, M=IC0(A)), dcdm(A, B, lambda r: r, grid=(N, N))):
        assert res.x.device.type == device and res.residuals.device.type == device
        assert bool(res.converged.all()) and float(res.relative_residuals[-1].max()) <= 1e-6
    res = dcdm(A, B, DCDMNet2d(channels=4).to(device), grid=(N, N), maxiter=20)   # float32 net, float64 solve
    assert res.x.device.type == device and res.x.dtype == torch.float64 and res.iterations.tolist() == [20, 20]
    q = DCDMNet2d(channels=4).to(device)(B.T.float().reshape(2, 1, N, N))
    loss = scale_invariant_residual_loss(poisson2d(N, dtype=torch.float32).to(device), B.T.float(), q)
    loss.backward()
    assert loss.device.type == device and math.isfinite(float(loss.detach()))
