"""Tests of transformers-svm: the attention-SVM solver (closed forms, KKT, duality, infeasibility), the
one-layer attention model, normalised GD, the directional-convergence probe, the claim, benchmark and docs."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.nn.single_attention import SingleLayerAttention
from gradkit.optim.normalized_gd import NormalizedGD
from gradkit.probes.attention_svm import AttentionSVMTracker, direction_correlation, selected_tokens
from gradkit.solvers.attention_svm import (InfeasibleSVMError, attention_svm, optimal_tokens, solve_attention_svm,
                                           svm_constraints, svm_margins)
from gradkit.testing import assert_no_hooks_left, count_hooks

D = torch.float64


def unit(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=-1, keepdim=True)


def problem(n=6, T=8, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = unit(torch.randn(n, T, d, generator=g, dtype=D))
    z = unit(torch.randn(n, d, generator=g, dtype=D))
    v = unit(torch.randn(d, generator=g, dtype=D))
    Y = torch.randint(0, 2, (n,), generator=g).to(D) * 2 - 1
    sel = torch.randint(0, T, (n,), generator=g)
    return X, z, v, Y, sel


def nuclear(W: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(W).sum())


# ---------------------------------------------------------------------------------------- solver: closed forms
def test_closed_form_T2_d1():
    """d = 1, T = 2: W is a scalar w with c_i w >= 1, c_i = (x_sel - x_other) z_i, so w = 1 / min|c_i| (sign of c)."""
    x = torch.tensor([[[0.3], [-0.9]], [[1.2], [0.1]], [[-0.5], [0.4]]], dtype=D)   # (3, 2, 1)
    z = torch.tensor([[2.0], [1.5], [-1.0]], dtype=D)
    sel = torch.tensor([0, 0, 0])
    c = (x[:, 0, 0] - x[:, 1, 0]) * z[:, 0]           # 2.4, 1.65, 0.9: all positive
    sol = solve_attention_svm(x, z, sel)
    assert sol.W.shape == (1, 1)
    assert sol.W.item() == pytest.approx(1.0 / c.abs().min().item(), rel=1e-10)
    # every c_i negative: the sign flips
    sol_neg = solve_attention_svm(x, -z, sel)
    assert sol_neg.W.item() == pytest.approx(-1.0 / c.abs().min().item(), rel=1e-10)
    # the support is the sequence with the smallest |c_i|
    assert sol.support.tolist() == [[False, False], [False, False], [False, True]]


def test_closed_form_one_constraint_fro_and_nuc():
    """One constraint <W, A> >= 1 with A = a z^T (rank one): W^mm = A / ||A||_F^2 for both norms."""
    X, z, _, _, _ = problem(n=1, T=2, d=5, seed=3)
    A, mask = svm_constraints(X, z, torch.tensor([1]))
    A1 = A[mask][0]
    expected = A1 / A1.square().sum()
    for norm in ("fro", "nuc"):
        sol = solve_attention_svm(X, z, torch.tensor([1]), norm)
        assert torch.allclose(sol.W, expected, rtol=1e-6, atol=1e-9), norm


def test_mixed_signs_d1_is_infeasible():
    x = torch.tensor([[[0.3], [-0.9]], [[1.2], [0.1]]], dtype=D)
    z = torch.tensor([[1.0], [-1.0]], dtype=D)              # c = 1.2 and -1.1: no scalar w works
    with pytest.raises(InfeasibleSVMError, match="infeasible"):
        solve_attention_svm(x, z, torch.tensor([0, 0]))


def test_duplicate_token_is_infeasible_with_its_location():
    X, z, _, _, _ = problem(n=3, T=4, d=5)
    X = X.clone()
    X[1, 2] = X[1, 0]
    with pytest.raises(InfeasibleSVMError, match="sequence 1, token 2"):
        solve_attention_svm(X, z, torch.tensor([0, 0, 0]))


def test_contradicting_sequences_are_infeasible():
    X, z, _, _, _ = problem(n=1, T=3, d=4)
    X2, z2 = torch.cat([X, X]), torch.cat([z, z])           # the same sequence twice, different selections
    with pytest.raises(InfeasibleSVMError):
        solve_attention_svm(X2, z2, torch.tensor([0, 1]))
    with pytest.raises(InfeasibleSVMError):
        solve_attention_svm(X2, z2, torch.tensor([0, 1]), "nuc")


# ---------------------------------------------------------------------------------------- solver: optimality
@pytest.mark.parametrize("seed", [0, 1])
def test_fro_kkt(seed):
    X, z, _, _, sel = problem(seed=seed)
    sol = solve_attention_svm(X, z, sel)
    A, mask = svm_constraints(X, z, sel)
    lam, margins = sol.dual[mask], sol.margins[mask]
    assert bool((lam >= 0).all())
    assert sol.min_margin >= 1 - 1e-9                                    # primal feasibility
    assert float((lam * (margins - 1)).abs().max()) < 1e-6               # complementary slackness
    W_dual = (sol.dual[..., None, None] * A).sum(dim=(0, 1))             # stationarity: W = sum lambda A
    assert torch.allclose(W_dual, sol.W, atol=1e-9)
    assert abs(sol.gap) < 1e-9 * sol.value
    assert bool(torch.isnan(sol.margins[~mask]).all())


@pytest.mark.parametrize("norm", ["fro", "nuc"])
def test_random_feasible_points_are_not_smaller(norm):
    """Convexity: every feasible W has ||W|| >= ||W^mm||. Feasible points: W^mm + eps R rescaled by 1/min margin."""
    X, z, _, _, sel = problem(n=4, T=3, d=6, seed=2)
    sol = solve_attention_svm(X, z, sel, norm)
    size = (lambda W: float(W.norm())) if norm == "fro" else nuclear
    assert size(sol.W) == pytest.approx(sol.value, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for eps in (1e-3, 1e-2, 1e-1):
        for _ in range(50):
            W = sol.W + eps * torch.randn(sol.W.shape, generator=g, dtype=D)
            m = float(np.nanmin(svm_margins(W, X, z, sel).numpy()))
            if m > 0:
                checked += 1
                assert size(W / m) >= sol.value * (1 - 1e-7)
    assert checked >= 100


def test_nuclear_certificate_and_ordering():
    X, z, _, _, sel = problem(seed=4)
    fro = solve_attention_svm(X, z, sel, "fro")
    nuc = solve_attention_svm(X, z, sel, "nuc", tol=1e-9)
    assert nuc.min_margin >= 1 - 1e-9
    assert 0 <= nuc.gap <= 1e-7 * nuc.value                      # certified by the dual bound
    assert nuclear(nuc.W) <= nuclear(fro.W) + 1e-9               # each solution is best in its own norm
    assert float(nuc.W.norm()) >= float(fro.W.norm()) - 1e-9
    # nuclear dual feasibility: ||sum lambda A||_2 = 1 for the returned multipliers
    A, mask = svm_constraints(X, z, sel)
    S = (nuc.dual[..., None, None] * A).sum(dim=(0, 1))
    assert float(torch.linalg.matrix_norm(S, 2)) == pytest.approx(1.0, rel=1e-9)
    assert float(nuc.dual.sum()) == pytest.approx(nuc.lower_bound, rel=1e-12)


def test_nuclear_max_iter_warns_but_stays_feasible():
    X, z, _, _, sel = problem(seed=4)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        sol = solve_attention_svm(X, z, sel, "nuc", max_iter=2)
    assert sol.min_margin >= 1 - 1e-9


@pytest.mark.parametrize("norm", ["fro", "nuc"])
def test_against_cvxpy(norm):
    pytest.importorskip("cvxpy")
    X, z, _, _, sel = problem(seed=5)
    ours = solve_attention_svm(X, z, sel, norm)
    ref = solve_attention_svm(X, z, sel, norm, solver="cvxpy")
    assert float((ours.W - ref.W).norm() / ref.W.norm()) < 1e-4
    assert ours.value <= ref.value * (1 + 1e-6)


def test_cvxpy_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    X, z, _, _, sel = problem(n=2, T=3, d=3)
    with pytest.raises(ImportError, match="solver='cvxpy' needs cvxpy"):
        solve_attention_svm(X, z, sel, solver="cvxpy")


def test_rectangular_queries_self_attention_dtype_and_wrapper():
    g = torch.Generator().manual_seed(0)
    X = unit(torch.randn(3, 4, 5, generator=g, dtype=D))
    z = unit(torch.randn(3, 7, generator=g, dtype=D))
    sel = torch.tensor([0, 1, 2])
    W = attention_svm(X, z, sel)
    assert W.shape == (5, 7) and W.dtype == D
    W32 = attention_svm(X.float(), z.float(), sel)
    assert W32.dtype == torch.float32 and torch.allclose(W32.double(), W, atol=1e-5)
    Ws = attention_svm(X, X[:, -1], sel.tolist())            # self-attention queries; a list of indices
    assert float(np.nanmin(svm_margins(Ws, X, X[:, -1], sel).numpy())) == pytest.approx(1.0, abs=1e-9)


def test_optimal_tokens_and_margins():
    X = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=D).repeat(2, 1, 1)
    v, Y = torch.tensor([1.0, 0.5], dtype=D), torch.tensor([1.0, -1.0], dtype=D)
    assert optimal_tokens(X, v, Y).tolist() == [0, 2]
    W = torch.eye(2, dtype=D)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    m = svm_margins(W, X, z, torch.tensor([0, 1]))
    # scores x^T W z: seq 0 -> [1, 0, -1], seq 1 -> [0, 1, 0]
    assert torch.allclose(m[0, 1:], torch.tensor([1.0, 2.0], dtype=D))
    assert torch.allclose(m[1, [0, 2]], torch.tensor([1.0, 1.0], dtype=D))


@pytest.mark.parametrize("call, match", [
    (lambda X, z, s: solve_attention_svm(X[0], z, s), r"X must have shape \(n, T, d\)"),
    (lambda X, z, s: solve_attention_svm(X[:, :1], z, s), "at least 2 tokens"),
    (lambda X, z, s: solve_attention_svm(X, z[:2], s), r"z must have shape \(n, d_z\) with n = 3"),
    (lambda X, z, s: solve_attention_svm(X, z, s.double()), "selected must be an integer tensor"),
    (lambda X, z, s: solve_attention_svm(X, z, torch.tensor([0, 1, 4])), r"token indices in \[0, 3\]"),
    (lambda X, z, s: solve_attention_svm(X, z, s, "l1"), "norm must be one of"),
    (lambda X, z, s: solve_attention_svm(X, z, s, solver="sdp"), "solver must be one of"),
    (lambda X, z, s: solve_attention_svm(X, z, s, tol=0.0), "tol must be in"),
    (lambda X, z, s: solve_attention_svm(X, z, s, max_iter=0), "max_iter must be a positive int"),
    (lambda X, z, s: solve_attention_svm(X * float("nan"), z, s), "X must be finite"),
    (lambda X, z, s: svm_margins(torch.zeros(2, 2, dtype=D), X, z, s), r"W must have shape \(5, 5\)"),
    (lambda X, z, s: optimal_tokens(X, torch.zeros(4, dtype=D), torch.ones(3)), r"v must have shape \(5,\)"),
    (lambda X, z, s: optimal_tokens(X, torch.zeros(5, dtype=D), torch.ones(2)), r"Y must have shape \(3,\)"),
])
def test_solver_errors(call, match):
    X, z, _, _, sel = problem(n=3, T=4, d=5)
    with pytest.raises(ValueError, match=match):
        call(X, z, sel)


# ---------------------------------------------------------------------------------------- model
def textbook(model: SingleLayerAttention, X, z):
    a = torch.softmax(torch.einsum("ntd,de,ne->nt", X, model.combined_weight(), z), dim=1)
    return torch.einsum("nt,ntd,d->n", a, X, model.v)


@pytest.mark.parametrize("param", ["W", "KQ"])
def test_model_matches_textbook_and_scores_convention(param):
    X, z, v, _, _ = problem(n=3, T=4, d=5)
    g = torch.Generator().manual_seed(1)
    model = SingleLayerAttention(5, param, head=v, init_std=0.5, dtype=D, generator=g)
    f = model(X, z)
    assert torch.allclose(f, textbook(model, X, z), atol=1e-12)
    W = model.combined_weight()
    assert torch.allclose(model.scores, torch.stack([X[i] @ W @ z[i] for i in range(3)]), atol=1e-12)  # x^T W z
    assert torch.allclose(model.attention_weights.sum(1), torch.ones(3, dtype=D))
    if param == "KQ":
        assert torch.allclose(W, model.K @ model.Q.T)
    assert set(dict(model.named_buffers())) == {"v"}                     # the head is fixed


def test_model_gradcheck_and_self_attention():
    X, z, v, _, _ = problem(n=2, T=3, d=3)
    model = SingleLayerAttention(3, "KQ", head=v, dtype=D, init_std=0.3, generator=torch.Generator().manual_seed(0))
    K, Q = model.K.detach().clone().requires_grad_(), model.Q.detach().clone().requires_grad_()

    def f(K_, Q_):
        a = torch.softmax(torch.einsum("ntd,de,ne->nt", X, K_ @ Q_.T, z), dim=1)
        return torch.einsum("nt,ntd,d->n", a, X, v)

    assert torch.autograd.gradcheck(f, (K, Q))
    selfattn = SingleLayerAttention(3, head=v, init_std=0.2, dtype=D, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(selfattn(X), selfattn(X, X[:, -1]))


def stable_grad(X, z, v, W, Y):
    """d/dW mean softplus(-Y f) with a_t (u_t - f) computed as sum_j a_j (u_t - u_j): no cancellation."""
    s = torch.einsum("ntd,de,ne->nt", X, W, z)
    a = torch.softmax(s, dim=1)
    u = X @ v
    dfds = a * (a[:, None, :] * (u[:, :, None] - u[:, None, :])).sum(-1)       # (n, T)
    f = (a * u).sum(1)
    dl_df = -Y * torch.sigmoid(-Y * f) / len(Y)
    return torch.einsum("n,nt,ntd,ne->de", dl_df, dfds, X, z)


def test_gradient_stays_accurate_when_softmax_saturates():
    X, z, v, Y, sel = problem(n=4, T=5, d=6, seed=1)
    W = 60.0 * solve_attention_svm(X, z, sel).W      # score gaps >= 60: a_sel = 1 in float64
    model = SingleLayerAttention(6, head=v, dtype=D)
    with torch.no_grad():
        model.W.copy_(W)
    F.softplus(-Y * model(X, z)).mean().backward()
    ref = stable_grad(X, z, v, W, Y)
    assert float(ref.norm()) > 0
    assert float((model.W.grad - ref).norm() / ref.norm()) < 1e-8
    Wt = W.clone().requires_grad_()                    # the textbook form loses the gradient's direction
    a = torch.softmax(torch.einsum("ntd,de,ne->nt", X, Wt, z), dim=1)
    F.softplus(-Y * torch.einsum("nt,ntd,d->n", a, X, v)).mean().backward()
    assert float((Wt.grad - ref).norm() / ref.norm()) > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(d=0), "d must be a positive int"),
    (dict(d=3, parametrization="QK"), "parametrization must be one of"),
    (dict(d=3, m=2), "only with parametrization='KQ'"),
    (dict(d=3, head=torch.zeros(4)), r"head must have shape \(3,\)"),
    (dict(d=3, init_std=-1.0), "init_std must be finite and >= 0"),
])
def test_model_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SingleLayerAttention(**kwargs)


def test_model_forward_errors():
    model = SingleLayerAttention(3, d_query=2)
    with pytest.raises(ValueError, match=r"X must be a tensor of shape \(n, T, 3\)"):
        model(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \(2, 2\)"):
        model(torch.zeros(2, 4, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="z is needed"):
        model(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="query_index must be in"):
        SingleLayerAttention(3, query_index=7)(torch.zeros(2, 4, 3))


def test_trainable_head_when_none_given():
    model = SingleLayerAttention(4, generator=torch.Generator().manual_seed(0))
    assert "v" in dict(model.named_parameters())


# ---------------------------------------------------------------------------------------- normalised GD
def test_normalized_gd_step_length_and_zero_grad():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, 2, requires_grad=True)
    opt = NormalizedGD([a, b], lr=0.5)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    opt.step()
    assert math.sqrt(float(a.detach().square().sum() + b.detach().square().sum())) == pytest.approx(0.5)
    assert torch.allclose(a, torch.tensor([-0.3, 0.0, 0.0]))
    per = NormalizedGD([a, b], lr=0.5, normalize="tensor")
    a0, b0 = a.detach().clone(), b.detach().clone()
    per.step()
    assert float((a - a0).detach().norm()) == pytest.approx(0.5) and float((b - b0).detach().norm()) == pytest.approx(0.5)
    a.grad, b.grad = torch.zeros(3), torch.zeros(2, 2)    # a zero gradient: no step, no NaN
    a1 = a.detach().clone()
    opt.step()
    assert torch.equal(a, a1)
    c = torch.zeros(2, requires_grad=True)                # a tiny gradient still gives a step of length lr
    c.grad = torch.tensor([1e-30, 0.0])
    NormalizedGD([c], lr=1.0).step()
    assert float(c.detach().norm()) == pytest.approx(1.0)
    opt2 = NormalizedGD([a, b], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr must be finite and >= 0"),
    (dict(lr=0.1, eps=-1.0), "eps must be finite and >= 0"),
    (dict(lr=0.1, normalize="layer"), "normalize must be one of"),
])
def test_normalized_gd_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormalizedGD([torch.zeros(1, requires_grad=True)], **kwargs)


# ---------------------------------------------------------------------------------------- probe
def test_direction_correlation_known_values_and_errors():
    A = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=D)
    assert direction_correlation(A, 3 * A) == pytest.approx(1.0)
    assert direction_correlation(A, -A) == pytest.approx(-1.0)
    assert direction_correlation(A, torch.tensor([[2.0, -1.0], [0.0, 0.0]], dtype=D)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same shape"):
        direction_correlation(A, A[0])
    with pytest.raises(ValueError, match="B is the zero matrix"):
        direction_correlation(A, torch.zeros_like(A))
    with pytest.raises(ValueError, match="A must be finite"):
        direction_correlation(A * float("inf"), A)


def train(model, X, z, Y, steps, lr=0.1, opt=None):
    opt = opt or NormalizedGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.softplus(-Y * model(X, z)).mean().backward()
        opt.step()


def test_tracker_converges_to_the_closed_form_direction():
    """n = 1, T = 2: the SVM is A / ||A||^2, so normalised GD's W(t) / ||W(t)|| must approach A / ||A||."""
    X, z, v, _, _ = problem(n=1, T=2, d=3, seed=7)
    Y = torch.sign(X[:, 0] @ v - X[:, 1] @ v)             # token 0 is the optimal one
    model = SingleLayerAttention(3, head=v, dtype=D)
    with AttentionSVMTracker(model, X, z, every=10) as tr:
        train(model, X, z, Y, 200)
    trace = tr.trace()
    A, mask = svm_constraints(X, z, torch.tensor([0]))
    assert trace.selected.tolist() == [0]
    assert direction_correlation(model.W.detach(), A[mask][0]) > 0.999
    assert trace.final_correlation > 0.999
    assert trace.steps == list(range(0, 200, 10)) and math.isnan(trace.correlation[0])   # W(0) = 0


def test_tracker_correlation_rises_on_random_data():
    X, z, v, Y, _ = problem(n=4, T=3, d=6, seed=0)
    model = SingleLayerAttention(6, head=v, dtype=D)
    with AttentionSVMTracker(model, X, z, every=50) as tr:
        train(model, X, z, Y, 500)
        tr.record(500)
    trace = tr.trace()
    assert trace.final_correlation > 0.98 and trace.final_correlation > trace.correlation[1]
    assert float(trace.attention_on_selected.min()) > 0.95
    assert trace.norms == sorted(trace.norms)           # the norm keeps growing
    assert torch.equal(trace.selected, selected_tokens(model, X, z))


def test_tracker_removes_hooks_even_when_training_raises():
    X, z, v, Y, _ = problem(n=2, T=3, d=4)
    model = SingleLayerAttention(4, head=v, dtype=D)
    before = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionSVMTracker(model, X, z):
            train(model, X, z, Y, 2)
            raise RuntimeError("boom")
    assert_no_hooks_left(model, before)
    tr = AttentionSVMTracker(model, X, z)
    with tr:
        pass
    assert_no_hooks_left(model, before)
    with tr:                                               # re-entrant after exit
        assert count_hooks(model) == before + 1


def test_tracker_skips_eval_and_no_grad_forwards():
    X, z, v, Y, _ = problem(n=2, T=3, d=4)
    model = SingleLayerAttention(4, head=v, dtype=D)
    with AttentionSVMTracker(model, X, z, every=2) as tr:
        train(model, X, z, Y, 5)                          # forwards 0..4: records at 0, 2, 4
        with torch.no_grad():
            model(X, z)
        model.eval()
        model(X, z)
    assert tr.steps == [0, 2, 4]


class Wrapper(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.attn = SingleLayerAttention(4, "KQ", head=v, dtype=D, generator=torch.Generator().manual_seed(0))

    def forward(self, X, z):
        return self.attn(X, z)


def test_tracker_on_a_submodule_by_name_and_nuclear():
    X, z, v, Y, _ = problem(n=2, T=3, d=4)
    model = Wrapper(v)
    with AttentionSVMTracker(model, X, z, layer="attn", every=25, norm="nuc") as tr:
        train(model, X, z, Y, 100, opt=NormalizedGD(model.parameters(), lr=0.1, normalize="tensor"))
    trace = tr.trace()
    assert trace.solution.norm == "nuc" and len(trace.correlation) == 4
    assert all(-1 <= c <= 1 for c in trace.correlation)


def test_tracker_errors():
    X, z, v, Y, _ = problem(n=2, T=3, d=4)
    model = Wrapper(v)
    with pytest.raises(ValueError, match="layer 'attention' is not a submodule"):
        AttentionSVMTracker(model, X, z, layer="attention")
    with pytest.raises(ValueError, match="weight is needed"):
        AttentionSVMTracker(nn.Linear(2, 2), X, z)
    with pytest.raises(ValueError, match="every must be a positive int"):
        AttentionSVMTracker(model, X, z, layer="attn", every=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        AttentionSVMTracker(model, X, z, layer="attn", norm="l2")
    with pytest.raises(ValueError, match=r"X must have shape \(n, T, d\)"):
        AttentionSVMTracker(model, X[0], z, layer="attn")
    tr = AttentionSVMTracker(model, X, z, layer="attn")
    with pytest.raises(RuntimeError, match="nothing recorded"):
        tr.trace()
    with torch.no_grad():
        model.attn.K.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite at step 3"):
        tr.record(3)
    with pytest.raises(ValueError, match="must expose attention_weights"):
        selected_tokens(nn.Linear(4, 1), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------- claim
def test_claim_smoke_numbers(smoke_run):
    out = smoke_run("transformers-svm")
    m = out.metrics
    assert m["ngd"]["corr"] > m["wrong_alpha"]["corr"] + 0.2
    assert abs(m["random"]["corr"]) < 0.9
    assert m["ngd"]["svm_min_margin"] >= 1 - 1e-6 and abs(m["ngd"]["svm_rel_gap"]) < 1e-6
    xs = out.info["curve_axes"]["corr"]["x"]
    assert xs[-1] == out.info["protocol"]["steps"]
    for arm, curve in out.curves["corr"].items():
        assert len(curve) == len(xs), arm
    assert out.curves["corr"]["ngd"][-1] > out.curves["corr"]["ngd"][0]
    tuned = out.info["arms"]["ngd"]["tuned"]
    assert len(tuned["grid"]) == len(out.info["arms"]["gd"]["tuned"]["grid"]) == len(
        out.info["arms"]["kq"]["tuned"]["grid"])


def test_benchmarks_register_and_run():
    from gradkit.harness.bench import BENCHMARKS, load_benchmarks

    load_benchmarks()
    for name in ("transformers-svm-tracker-step", "transformers-svm-model-step"):
        res = BENCHMARKS.get(name).run(2)
        assert res.baseline_s > 0 and res.candidate_s > 0
