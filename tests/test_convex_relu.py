"""Tests of the convex reformulation of two-layer ReLU networks (paper slug: convex-relu)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit._validate import ArgumentError
from gradkit.solvers.convex_relu import (ConvexReLUProblem, admm_convex_relu, group_soft_threshold,
                                        nonconvex_objective, sign_accuracy)
from gradkit.solvers.relu_patterns import check_patterns, enumerate_patterns_2d, sample_patterns

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def xor_instance(n: int = 10, seed: int = 0):
    X = torch.randn(n, 2, generator=gen(seed), dtype=D)
    return X, torch.where(X[:, 0] * X[:, 1] >= 0, 1.0, -1.0).to(D)


def small_problem(n=12, d=3, samples=6, beta=0.1, seed=0) -> ConvexReLUProblem:
    X = torch.randn(n, d, generator=gen(seed), dtype=D)
    y = torch.randn(n, generator=gen(seed + 1), dtype=D)
    return ConvexReLUProblem(X, y, sample_patterns(X, samples, generator=gen(seed + 2)), beta)


def dense_operators(prob: ConvexReLUProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """F (n x 2dP) and G (2nP x 2dP) formed explicitly (only for tiny problems)."""
    blocks_f = [torch.diag(m) @ prob.X for m in prob.mask]
    F = torch.cat(blocks_f + [-b for b in blocks_f], 1)
    blocks_g = [torch.diag(s) @ prob.X for s in prob.sign]
    G = torch.block_diag(*(blocks_g + blocks_g))
    return F, G


def feasible_pair(prob: ConvexReLUProblem, seed: int = 0):
    """v_i, w_i along directions whose own patterns are the problem's (so the cone constraints hold)."""
    P, d = prob.num_patterns, prob.d
    v, w = torch.zeros(P, d, dtype=D), torch.zeros(P, d, dtype=D)
    g = gen(seed)
    for _ in range(2000):
        h = torch.randn(d, generator=g, dtype=D)
        pat = prob.X @ h >= 0
        hit = (prob.patterns == pat).all(1).nonzero()
        if len(hit):
            i = int(hit[0])
            (v if float(torch.rand(1, generator=g)) < 0.5 else w)[i] = h * (0.5 + float(torch.rand(1, generator=g)))
    return v, w


# ------------------------------------------------------------------------------------------ patterns
def test_enumerate_2d_matches_dense_sampling():
    X = torch.randn(7, 2, generator=gen(3), dtype=D)
    exact = enumerate_patterns_2d(X)
    dense = sample_patterns(X, 100_000, generator=gen(4))
    assert torch.equal(exact, dense)
    assert exact.shape[0] <= 2 * 7 and exact.any(1).all()


def test_sample_patterns_distinct_and_nonzero():
    X = torch.randn(20, 4, generator=gen(0), dtype=D)
    p = sample_patterns(X, 300, generator=gen(1))
    assert p.dtype == torch.bool and p.shape[1] == 20
    assert torch.unique(p, dim=0).shape[0] == p.shape[0]
    assert p.any(1).all()
    assert torch.equal(p, sample_patterns(X, 300, generator=gen(1)))  # reproducible


def test_pattern_errors():
    X = torch.randn(5, 2, dtype=D)
    with pytest.raises(ArgumentError, match="n_samples must be a positive int, got 0"):
        sample_patterns(X, 0)
    with pytest.raises(ArgumentError, match="X must be a non-empty 2-D tensor"):
        sample_patterns(torch.randn(5), 3)
    with pytest.raises(ArgumentError, match="generator must be a torch.Generator"):
        sample_patterns(X, 3, generator=1)
    with pytest.raises(ArgumentError, match="exactly 2 columns"):
        enumerate_patterns_2d(torch.randn(5, 3))
    with pytest.raises(ArgumentError, match=r"patterns must have shape \(P, n\) = \(P >= 1, 5\).*got shape \(3, 4\)"):
        check_patterns(torch.ones(3, 4, dtype=torch.bool), 5)
    with pytest.raises(ArgumentError, match="hold only 0 and 1"):
        check_patterns(torch.full((2, 5), 2.0), 5)
    assert check_patterns(torch.ones(2, 5), 5).dtype == torch.bool


# ------------------------------------------------------------------------------------------ operators
def test_block_operators_match_dense():
    prob = small_problem()
    F, G = dense_operators(prob)
    P, d = prob.num_patterns, prob.d
    u = torch.randn(2 * P, d, generator=gen(5), dtype=D)
    r = torch.randn(prob.n, generator=gen(6), dtype=D)
    z = torch.randn(2 * P, prob.n, generator=gen(7), dtype=D)
    torch.testing.assert_close(prob.apply_F(u), F @ u.reshape(-1))
    torch.testing.assert_close(prob.apply_FT(r).reshape(-1), F.T @ r)
    torch.testing.assert_close(prob.apply_G(u).reshape(-1), G @ u.reshape(-1))
    torch.testing.assert_close(prob.apply_GT(z).reshape(-1), G.T @ z.reshape(-1))
    rho = 0.3
    H = torch.eye(2 * d * P, dtype=D) + F.T @ F / rho + G.T @ G
    torch.testing.assert_close(prob.system_matrix(rho), H)


def test_first_admm_iteration_solves_the_normal_equations():
    prob = small_problem()
    F, G = dense_operators(prob)
    rho = 0.5
    H = torch.eye(prob.num_variables, dtype=D) + F.T @ F / rho + G.T @ G
    u = torch.linalg.solve(H, F.T @ prob.y / rho).reshape(2 * prob.num_patterns, prob.d)  # from v = s = 0
    v, w, hist = admm_convex_relu(prob, rho=rho, max_iter=1)
    expect = group_soft_threshold(u, prob.beta / rho)
    torch.testing.assert_close(torch.cat([v, w]), expect)
    assert hist.iterations == 1 and len(hist.objective) == 1


def test_group_soft_threshold():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [0.6, 0.8]], dtype=D)
    out = group_soft_threshold(z, 1.0)
    torch.testing.assert_close(out[0].norm(), torch.tensor(4.0, dtype=D))  # norm 5 -> 4, same direction
    torch.testing.assert_close(out[0] / out[0].norm(), z[0] / 5)
    assert torch.equal(out[1:], torch.zeros(3, 2, dtype=D))  # norms 0.5, 0 and exactly 1 -> 0
    with pytest.raises(ArgumentError, match="t must be finite and >= 0"):
        group_soft_threshold(z, -1.0)


# ------------------------------------------------------------------------------------------ recovery and optimum
@pytest.mark.parametrize("intercept", [False, True])
def test_recovered_network_has_the_convex_objective(intercept):
    prob = small_problem(n=15, d=3, samples=8)
    if intercept:
        X1 = torch.cat([prob.X[:, :2], torch.ones(prob.n, 1, dtype=D)], 1)
        prob = ConvexReLUProblem(X1, prob.y, sample_patterns(X1, 8, generator=gen(9)), prob.beta)
    v, w = feasible_pair(prob)
    assert prob.feasible(v, w) and prob.nonzero_blocks(v, w) > 2
    net = prob.to_network(v, w, intercept=intercept)
    x_in = prob.X[:, :-1] if intercept else prob.X
    assert net[0].in_features == x_in.shape[1] and net[0].out_features == prob.nonzero_blocks(v, w)
    f_net = float(nonconvex_objective(net, x_in, prob.y, prob.beta).detach())
    assert math.isclose(f_net, prob.objective(v, w), rel_tol=1e-10)
    torch.testing.assert_close(net(x_in)[:, 0], prob.predict(v, w))


@pytest.mark.parametrize("alpha", [1.0, 1.8])
def test_one_point_closed_form(alpha):
    """n = d = 1, x = 1, y = 1: the optimum is v = 1 - beta, w = 0, objective beta - beta^2 / 2."""
    beta = 0.3
    X, y = torch.ones(1, 1, dtype=D), torch.ones(1, dtype=D)
    prob = ConvexReLUProblem(X, y, torch.ones(1, 1, dtype=torch.bool), beta)
    v, w, hist = admm_convex_relu(prob, rho=1.0, max_iter=5000, tol=1e-12, alpha=alpha)
    assert hist.converged
    assert abs(float(v[0, 0]) - (1 - beta)) < 1e-8 and float(w.abs().max()) < 1e-8
    assert abs(prob.objective(v, w) - (beta - beta ** 2 / 2)) < 1e-9


def test_exact_instance_reaches_a_stationary_optimum_adam_cannot_beat():
    X, y = xor_instance(10, seed=0)
    beta = 1e-2
    prob = ConvexReLUProblem(X, y, enumerate_patterns_2d(X), beta)
    v, w, hist = admm_convex_relu(prob, rho=0.01, max_iter=10000, tol=1e-9, record_objective=False)
    assert hist.converged and prob.cone_violation(v, w) < 1e-7
    f = prob.objective(v, w)
    net = prob.to_network(v, w)
    assert abs(float(nonconvex_objective(net, X, y, beta).detach()) - f) <= 1e-6 * f
    # global optimality: Adam on the non-convex net (random inits, m* neurons) never ends below the optimum
    for seed in range(3):
        torch.manual_seed(seed)
        m = prob.nonzero_blocks(v, w)
        other = nn.Sequential(nn.Linear(2, m, bias=False), nn.ReLU(), nn.Linear(m, 1, bias=False)).double()
        opt = torch.optim.Adam(other.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            nonconvex_objective(other, X, y, beta).backward()
            opt.step()
        assert float(nonconvex_objective(other, X, y, beta).detach()) >= f * (1 - 1e-6)


def test_nonconvex_objective_known_value():
    net = nn.Sequential(nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[2].weight.fill_(2.0)
    X = torch.tensor([[1.0, 0.0], [-1.0, -1.0]], dtype=D)
    y = torch.tensor([1.0, 1.0], dtype=D)
    # outputs 2 and 0: 0.5 (1 + 1) + 0.1 / 2 (1 + 1 + 4)
    assert math.isclose(float(nonconvex_objective(net, X, y, 0.1).detach()), 1.3, rel_tol=1e-12)


def test_sign_accuracy_and_label_errors():
    assert sign_accuracy(torch.tensor([0.5, -0.1, 0.0]), torch.tensor([1.0, -1.0, -1.0])) == pytest.approx(200 / 3)
    with pytest.raises(ArgumentError, match=r"y must hold labels in \{-1, \+1\}, got other values such as \[0.0\]"):
        sign_accuracy(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.0]))


def test_problem_and_solver_errors():
    X, y = xor_instance(6)
    pats = enumerate_patterns_2d(X)
    with pytest.raises(ArgumentError, match="beta must be finite and > 0, got 0"):
        ConvexReLUProblem(X, y, pats, 0.0)
    with pytest.raises(ArgumentError, match=r"y must have shape \(n,\) = \(6,\)"):
        ConvexReLUProblem(X, y[:4], pats, 0.1)
    with pytest.raises(ArgumentError, match=r"patterns must have shape \(P, n\)"):
        ConvexReLUProblem(X, y, pats[:, :4], 0.1)
    prob = ConvexReLUProblem(X, y, pats, 0.1)
    with pytest.raises(ArgumentError, match="rho must be finite and > 0, got -1"):
        admm_convex_relu(prob, rho=-1.0)
    with pytest.raises(ArgumentError, match=r"gamma must be in \(0, 2\), got 2.5"):
        admm_convex_relu(prob, gamma=2.5)
    with pytest.raises(ArgumentError, match=r"alpha must be in \(0, 2\), got 0"):
        admm_convex_relu(prob, alpha=0)
    with pytest.raises(ArgumentError, match="max_iter must be a positive int, got 0"):
        admm_convex_relu(prob, max_iter=0)
    with pytest.raises(ArgumentError, match="tol must be finite and > 0"):
        admm_convex_relu(prob, tol=0.0)
    with pytest.raises(ArgumentError, match="problem must be a ConvexReLUProblem"):
        admm_convex_relu("not a problem")
    with pytest.raises(ArgumentError, match=r"v must have shape \(P, d\)"):
        prob.objective(torch.zeros(1, 2, dtype=D), torch.zeros(prob.num_patterns, 2, dtype=D))
    with pytest.raises(ArgumentError, match="net must be a torch.nn.Module"):
        nonconvex_objective(lambda x: x, X, y, 0.1)


def test_float32_input_and_zero_solution():
    X, y = xor_instance(8)
    prob = ConvexReLUProblem(X.float(), y.float(), enumerate_patterns_2d(X), beta=1e3)  # huge beta: all blocks 0
    v, w, _ = admm_convex_relu(prob, max_iter=50)
    assert v.dtype == D and prob.nonzero_blocks(v, w) == 0
    net = prob.to_network(v, w)
    assert net[0].out_features == 1 and float(net(X).detach().abs().max()) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda():
    X, y = xor_instance(10)
    Xc, yc = X.cuda(), y.cuda()
    prob = ConvexReLUProblem(Xc, yc, enumerate_patterns_2d(Xc), 1e-2)
    v, w, _ = admm_convex_relu(prob, rho=0.01, max_iter=3000, tol=1e-9)
    ref = ConvexReLUProblem(X, y, enumerate_patterns_2d(X), 1e-2)
    rv, rw, _ = admm_convex_relu(ref, rho=0.01, max_iter=3000, tol=1e-9)
    assert v.is_cuda and abs(prob.objective(v, w) - ref.objective(rv, rw)) < 1e-8


# ------------------------------------------------------------------------------------------ claim and bench
def test_batched_adam_equals_separate_runs():
    from gradkit.harness.claims.convex_relu import init_nets, train_adam

    X, y = xor_instance(10)
    both = train_adam(X, y, 3, 2, 1e-2, 50, 1e-2, gen(0))
    W, a = init_nets(2, 3, 2, gen(0), D)  # the same draws as the batched run
    for k in range(2):
        net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False)).double()
        with torch.no_grad():
            net[0].weight.copy_(W[k].T)
            net[2].weight.copy_(a[k].T)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(50):
            opt.zero_grad()
            nonconvex_objective(net, X, y, 1e-2).backward()
            opt.step()
        assert math.isclose(float(nonconvex_objective(net, X, y, 1e-2).detach()), both["objectives"][k], rel_tol=1e-9)


def test_claim_smoke_metrics(smoke_run):
    out = smoke_run("convex-relu")
    admm, adam = out.metrics["admm"], out.metrics["adam"]
    assert admm["exact_patterns"] >= 4 and 0 <= adam["exact_within_frac"] <= 1
    assert admm["exact_beaten"] >= 0 and "objective_ratio" in admm
    assert 0 < admm["width"] <= 2 * admm["patterns"]


def test_benchmark_growth_fit_small():
    from gradkit.harness.benchmarks.convex_relu import iteration_times

    res = iteration_times((3, 6), n=30, d=4, repeats=2)
    assert set(res) == {"sizes", "cached_s", "resolve_s", "cached_exponent", "resolve_exponent"}
    assert len(res["cached_s"]) == 2 and all(t > 0 for t in res["cached_s"])
