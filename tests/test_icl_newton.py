"""Tests of icl-newton: solver iterates, in-context predictions, SimE matching, the layer read-out probe, data,
the claim's pieces and the benchmark."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit._validate import ArgumentError
from gradkit.data.in_context import InContextLinearRegression
from gradkit.probes.icl_algorithms import (AlgorithmMatch, LayerReadout, best_index, error_similarity,
                                           icl_predictions, match_algorithm)
from gradkit.solvers.lstsq_iterates import (gd_iterates, inverse_spectral_lr, min_norm_lstsq, newton_alpha,
                                            newton_iterates, newton_schulz_pinv)

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompts(b=6, n=10, d=4, seed=0, dtype=D):
    xs, ys, w = InContextLinearRegression(d, n).sample(b, gen(seed), dtype=dtype)
    return xs, ys


def newton_fn(steps, form="gram"):
    return lambda X, y: newton_iterates(X, y, steps, form=form)


# ------------------------------------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("shape", [(12, 4), (4, 4), (3, 5), (1, 4), (7, 1)])
def test_direct_form_converges_to_pinv(shape):
    X = torch.randn(*shape, dtype=D, generator=gen(1))
    err = (newton_schulz_pinv(X, 60) - torch.linalg.pinv(X)).abs().max()
    assert err < 1e-10


@pytest.mark.parametrize("shape", [(12, 4), (3, 5), (1, 4)])
def test_gram_form_converges_to_pinv(shape):
    X = torch.randn(*shape, dtype=D, generator=gen(2))
    err = (newton_schulz_pinv(X, 25, form="gram") - torch.linalg.pinv(X)).abs().max()
    assert err < 1e-8


def test_batched_and_all_iterates():
    X = torch.randn(3, 2, 8, 3, dtype=D, generator=gen(3))
    allM = newton_schulz_pinv(X, 30, return_all=True)
    assert allM.shape == (3, 2, 30, 3, 8)
    torch.testing.assert_close(allM[..., -1, :, :], torch.linalg.pinv(X), rtol=0, atol=1e-10)
    torch.testing.assert_close(allM[..., 4, :, :], newton_schulz_pinv(X, 5))


def test_direct_form_residual_squares_each_step():
    """I - M_k X = (I - alpha S)^(2^k): the spectral norm of the residual squares at every step."""
    X = torch.randn(20, 4, dtype=D, generator=gen(4))
    Ms = newton_schulz_pinv(X, 6, return_all=True)
    r = [torch.linalg.matrix_norm(torch.eye(4, dtype=D) - M @ X, ord=2).item() for M in Ms]
    assert r[0] < 1
    for a, b in zip(r, r[1:]):
        assert b == pytest.approx(a * a, rel=1e-6, abs=1e-13)
    a = newton_alpha(X)
    R0 = torch.eye(4, dtype=D) - a * X.T @ X
    torch.testing.assert_close(torch.eye(4, dtype=D) - Ms[2] @ X, torch.linalg.matrix_power(R0, 8), rtol=0, atol=1e-12)


def test_gram_form_is_the_papers_recursion():
    """M_0 = alpha S, M_{k+1} = 2 M_k - M_k S M_k, w_k = M_k X^T y, with an explicit alpha."""
    X, y = torch.randn(9, 3, dtype=D, generator=gen(5)), torch.randn(9, dtype=D, generator=gen(6))
    S, alpha = X.T @ X, 0.001
    M, ref = alpha * S, []
    for _ in range(5):
        M = 2 * M - M @ S @ M
        ref.append(M @ X.T @ y)
    torch.testing.assert_close(newton_iterates(X, y, 5, form="gram", alpha=alpha), torch.stack(ref))


def test_newton_alpha_closed_form_and_the_rank_one_stall():
    assert newton_alpha(torch.eye(3, dtype=D), form="gram", safety=1.0).item() == pytest.approx(2 / math.sqrt(3))
    X = torch.diag(torch.tensor([2.0, 1.0], dtype=D))       # S = diag(4, 1)
    assert newton_alpha(X, "direct", "spectral", 1.0).item() == pytest.approx(0.5)
    assert newton_alpha(X, "direct", "frobenius", 1.0).item() == pytest.approx(2 / math.sqrt(17))
    assert newton_alpha(X, "gram", "spectral", 1.0).item() == pytest.approx(2 / 16)
    assert newton_alpha(torch.zeros(3, 2)).item() == 0.0
    # one example (rank-1 S): with the official code's alpha (safety 1) M_1 is exactly 0 and stays there
    x = torch.tensor([[1.0, 2.0, 2.0]], dtype=D)
    stalled = newton_schulz_pinv(x, 20, form="gram", alpha=newton_alpha(x, "gram", safety=1.0))
    assert stalled.abs().max() < 1e-6
    torch.testing.assert_close(newton_schulz_pinv(x, 20, form="gram"), torch.linalg.pinv(x), rtol=0, atol=1e-10)


def test_zero_matrix_gives_zero_iterates():
    w = newton_iterates(torch.zeros(5, 3, dtype=D), torch.zeros(5, dtype=D), 4)
    assert torch.equal(w, torch.zeros(4, 3, dtype=D))


def test_padding_rows_change_nothing():
    X, y = torch.randn(5, 3, dtype=D, generator=gen(7)), torch.randn(5, dtype=D, generator=gen(8))
    Xp, yp = torch.cat([X, torch.zeros(4, 3, dtype=D)]), torch.cat([y, torch.zeros(4, dtype=D)])
    for form in ("direct", "gram"):
        torch.testing.assert_close(newton_iterates(Xp, yp, 6, form=form), newton_iterates(X, y, 6, form=form))
    torch.testing.assert_close(gd_iterates(Xp, yp, 0.01, [1, 7]), gd_iterates(X, y, 0.01, [1, 7]))


# ------------------------------------------------------------------------------------------ GD and OLS
def test_gd_matches_its_closed_form():
    """w_k = V diag((1 - (1 - eta lam)^k) / lam) V^T X^T y for GD from 0."""
    X, y = torch.randn(10, 4, dtype=D, generator=gen(9)), torch.randn(10, dtype=D, generator=gen(10))
    lam, V = torch.linalg.eigh(X.T @ X)
    for eta in (0.01, float(inverse_spectral_lr(X))):
        grid = [1, 3, 16, 100]
        got = gd_iterates(X, y, eta, grid)
        for j, k in enumerate(grid):
            ref = V @ torch.diag((1 - (1 - eta * lam) ** k) / lam) @ V.T @ X.T @ y
            torch.testing.assert_close(got[j], ref, rtol=1e-9, atol=1e-11)


def test_gd_default_lr_is_inverse_spectral_per_problem():
    X, y = torch.randn(3, 8, 2, dtype=D, generator=gen(11)), torch.randn(3, 8, dtype=D, generator=gen(12))
    lr = 1 / torch.linalg.matrix_norm(X, ord=2) ** 2
    torch.testing.assert_close(inverse_spectral_lr(X), lr)
    torch.testing.assert_close(gd_iterates(X, y, None, [5]), gd_iterates(X, y, lr, [5]))
    w = gd_iterates(X, y, None, [4000])[..., 0, :]
    torch.testing.assert_close(w, min_norm_lstsq(X, y), rtol=0, atol=1e-8)


def test_min_norm_lstsq_is_pinv():
    X, y = torch.randn(3, 5, dtype=D, generator=gen(13)), torch.randn(3, dtype=D, generator=gen(14))
    torch.testing.assert_close(min_norm_lstsq(X, y), torch.linalg.pinv(X) @ y)


def test_float32_works():
    X, y = torch.randn(4, 12, 3, generator=gen(15)), torch.randn(4, 12, generator=gen(16))
    assert newton_iterates(X, y, 10).dtype == torch.float32
    torch.testing.assert_close(newton_iterates(X, y, 10)[..., -1, :], min_norm_lstsq(X, y), rtol=1e-3, atol=1e-3)
    assert gd_iterates(X, y).shape == (4, 13, 3)


# ------------------------------------------------------------------------------------------ in-context predictions
def test_icl_predictions_equal_explicit_prefixes():
    xs, ys = prompts(b=3, n=7, d=3)
    got = icl_predictions(newton_fn(5), xs, ys)
    ols = icl_predictions(min_norm_lstsq, xs, ys)
    assert got.shape == (5, 3, 7) and ols.shape == (3, 7)
    for b in range(3):
        assert got[:, b, 0].abs().max() == 0 and ols[b, 0] == 0
        for i in range(1, 7):
            w = newton_iterates(xs[b, :i], ys[b, :i], 5, form="gram")
            torch.testing.assert_close(got[:, b, i], w @ xs[b, i])
            torch.testing.assert_close(ols[b, i], torch.linalg.pinv(xs[b, :i]) @ ys[b, :i] @ xs[b, i])


def test_icl_predictions_are_causal_and_chunking_is_exact():
    xs, ys = prompts(b=4, n=9)
    base = icl_predictions(newton_fn(6), xs, ys)
    xs2, ys2 = xs.clone(), ys.clone()
    xs2[:, 5:] += 3.0
    ys2[:, 5:] -= 2.0
    moved = icl_predictions(newton_fn(6), xs2, ys2)
    torch.testing.assert_close(moved[..., :5], base[..., :5], rtol=0, atol=0)   # later examples change nothing
    assert not torch.allclose(moved[..., 6:], base[..., 6:])
    torch.testing.assert_close(icl_predictions(newton_fn(6), xs, ys, batch_size=3), base)


def test_noiseless_converged_predictions_are_exact_after_d_examples():
    xs, ys = prompts(b=5, n=10, d=4)
    ols = icl_predictions(min_norm_lstsq, xs, ys)
    torch.testing.assert_close(ols[:, 5:], ys[:, 5:], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ SimE and matching
def test_error_similarity_known_values():
    ys = torch.randn(50, 6, dtype=D, generator=gen(20))
    e = torch.randn(50, 6, dtype=D, generator=gen(21))
    assert float(error_similarity(ys + e, ys + 3 * e, ys)) == pytest.approx(1.0)
    assert float(error_similarity(ys + e, ys - e, ys)) == pytest.approx(-1.0)
    # orthogonal residual vectors over positions 1..5 (position 0 is excluded by default)
    a, b = torch.zeros(50, 6, dtype=D), torch.zeros(50, 6, dtype=D)
    a[:, 1], b[:, 2], a[:, 0], b[:, 0] = 1.0, 1.0, 5.0, 5.0
    assert float(error_similarity(ys + a, ys + b, ys)) == pytest.approx(0.0)
    assert float(error_similarity(ys + a, ys + b, ys, positions=[0, 1, 2])) == pytest.approx(25 / 26)
    assert float(error_similarity(ys, ys + e, ys)) == 0.0                      # a zero residual has cosine 0
    sim = error_similarity(torch.stack([ys + e, ys - e]), torch.stack([ys + e, ys + 2 * e, ys - e]), ys)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1, -1], [-1, -1, 1]], dtype=D))


def test_match_recovers_newton_iterates_per_layer():
    xs, ys = prompts(b=64, n=12, d=4, seed=3)
    newton = icl_predictions(newton_fn(12), xs, ys)
    layers = newton[[1, 3, 5, 7]]                                  # layer l = Newton iterate 2l
    m = match_algorithm(layers, newton, ys)
    assert isinstance(m, AlgorithmMatch)
    assert m.best_k == (2, 4, 6, 8) and m.ks == tuple(range(1, 13)) and m.sim.shape == (4, 12)
    assert min(m.best_sim) > 1 - 1e-12
    as_dict = match_algorithm(list(layers), {k: newton[k - 1] for k in (2, 4, 6, 8)}, ys)
    assert as_dict.best_k == (2, 4, 6, 8)


def test_match_recovers_gd_iterates_per_layer():
    xs, ys = prompts(b=64, n=12, d=4, seed=4)
    grid = [2 ** j for j in range(10)]
    gd = icl_predictions(lambda X, y: gd_iterates(X, y, 0.01, grid), xs, ys)
    m = match_algorithm(gd[[2, 4, 6, 8]], gd, ys, ks=grid)
    assert m.best_k == (4, 16, 64, 256) and min(m.best_sim) > 1 - 1e-12


def test_tolerance_prefers_fewer_steps():
    sims = torch.tensor([[0.1, 0.9, 0.9000001, 0.5], [0.3, 0.2, 0.1, 0.0]])
    assert best_index(sims).tolist() == [2, 0]
    assert best_index(sims, tol=1e-3).tolist() == [1, 0]


# ------------------------------------------------------------------------------------------ LayerReadout
class TwoLayer(nn.Module):
    """h1 = x @ A (linear), h2 = tanh(h1); returns h2.sum(-1)."""

    def __init__(self, d_in=5, width=3):
        super().__init__()
        self.l1 = nn.Linear(d_in, width, dtype=D)
        self.act = nn.Tanh()
        self.boom = False

    def forward(self, x):
        if self.boom:
            raise RuntimeError("training code failed")
        return self.act(self.l1(x)).sum(-1)


def test_readout_recovers_an_exact_linear_map():
    model = TwoLayer()
    x = torch.randn(40, 7, 5, dtype=D, generator=gen(30))
    with torch.no_grad():
        h = model.l1(x)
    w, c = torch.tensor([1.0, -2.0, 0.5], dtype=D), 0.3
    target = h @ w + c
    probe = LayerReadout(model, ["l1", model.act], ridge=0.0).fit(x, target)
    assert probe.layers == ["l1", "act"]
    pred = probe.predict(x)
    assert pred.shape == (2, 40, 7)
    torch.testing.assert_close(pred[0], target, rtol=0, atol=1e-10)
    W, b = probe.weights["l1"]
    torch.testing.assert_close(W[:, 0], w, rtol=0, atol=1e-10)
    assert float(b) == pytest.approx(c)
    # vector targets keep their trailing dim
    two = LayerReadout(model, "l1", ridge=0.0).fit(x, torch.stack([target, -target], -1))
    assert two.predict(x).shape == (1, 40, 7, 2)


def test_readout_ridge_is_the_closed_form_and_mask_selects_rows():
    model = TwoLayer()
    x = torch.randn(30, 4, 5, dtype=D, generator=gen(31))
    t = torch.randn(30, 4, dtype=D, generator=gen(32))
    mask = torch.zeros(30, 4, dtype=torch.bool)
    mask[:, 1:] = True
    probe = LayerReadout(model, "l1", ridge=0.5).fit(x, t, mask=mask)
    with torch.no_grad():
        H = model.l1(x)[mask]
    tt = t[mask]
    Hc, tc = H - H.mean(0), tt - tt.mean()
    W = torch.linalg.solve(Hc.T @ Hc / len(H) + 0.5 * torch.eye(3, dtype=D), Hc.T @ tc / len(H))
    torch.testing.assert_close(probe.weights["l1"][0][:, 0], W)


def test_readout_hooks_removed_even_when_the_forward_raises():
    model = TwoLayer()
    x = torch.randn(8, 5, dtype=D, generator=gen(33))
    probe = LayerReadout(model, ["l1", "act"])
    model.boom = True
    with pytest.raises(RuntimeError, match="training code failed"):
        probe.fit(x, torch.zeros(8, dtype=D))
    with pytest.raises(RuntimeError, match="training code failed"):
        with probe:
            model(x)
    for m in (model.l1, model.act):
        assert not m._forward_hooks
    model.boom = False
    assert model.training                                       # train mode restored
    with probe:                                                 # recording in the user's own loop
        model(x)
        model(x)
    assert len(probe.records["l1"]) == 2 and not model.l1._forward_hooks
    probe.fit_states({k: v[-1] for k, v in probe.records.items()}, torch.zeros(8, dtype=D))


def test_readout_reads_tuple_outputs():
    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 2, dtype=D)

        def forward(self, x):
            return self.inner(x), "extra"

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Tupled()

        def forward(self, x):
            return self.block(x)[0]

    model = Wrap()
    x = torch.randn(20, 3, dtype=D, generator=gen(34))
    with torch.no_grad():
        t = model(x) @ torch.tensor([1.0, 1.0], dtype=D)
    pred = LayerReadout(model, "block", ridge=0.0).fit(x, t).predict(x)
    torch.testing.assert_close(pred[0], t, rtol=0, atol=1e-10)


def test_readout_errors():
    model = TwoLayer()
    x = torch.randn(6, 5, dtype=D, generator=gen(35))
    with pytest.raises(ArgumentError, match="layer 'nope' not found"):
        LayerReadout(model, ["nope"])
    with pytest.raises(ArgumentError, match="not a submodule"):
        LayerReadout(model, [nn.Linear(2, 2)])
    with pytest.raises(ArgumentError, match="at least one"):
        LayerReadout(model, [])
    with pytest.raises(ArgumentError, match="ridge must be finite and >= 0"):
        LayerReadout(model, "l1", ridge=-1.0)
    with pytest.raises(ArgumentError, match="model must be an nn.Module"):
        LayerReadout("model", "l1")
    probe = LayerReadout(model, "l1")
    with pytest.raises(RuntimeError, match="not fitted"):
        probe.predict(x)
    with pytest.raises(ValueError, match="1 row"):
        probe.fit(x[:1], torch.zeros(1, dtype=D))
    with pytest.raises(ArgumentError, match="targets must have shape"):
        probe.fit(x, torch.zeros(5, dtype=D))
    with pytest.raises(ArgumentError, match="mask must be a bool tensor"):
        probe.fit(x, torch.zeros(6, dtype=D), mask=torch.ones(6))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite activation"):
        probe.fit(bad, torch.zeros(6, dtype=D))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(5, 5, dtype=D)

        def forward(self, x):
            return self.l(self.l(x))

    with pytest.raises(RuntimeError, match="ran 2 times"):
        LayerReadout(Twice(), "l").fit(x, torch.zeros(6, dtype=D))


def test_probe_and_matching_errors():
    xs, ys = prompts(b=3, n=5, d=2)
    with pytest.raises(ArgumentError, match="algo must be a callable"):
        icl_predictions(3, xs, ys)
    with pytest.raises(ArgumentError, match="algo must return"):
        icl_predictions(lambda X, y: y, xs, ys)
    with pytest.raises(ArgumentError, match="xs must be"):
        icl_predictions(min_norm_lstsq, xs, ys[:, :4])
    with pytest.raises(ArgumentError, match="xs must be finite"):
        icl_predictions(min_norm_lstsq, xs * float("inf"), ys)
    p = torch.randn(3, 5, dtype=D)
    with pytest.raises(ArgumentError, match="positions selects none"):
        error_similarity(p, p, ys, positions=slice(0, 0))
    with pytest.raises(ArgumentError, match="positions must index"):
        error_similarity(p, p, ys, positions=[9])
    with pytest.raises(ArgumentError, match=r"preds_a must have \(b, n\)"):
        error_similarity(p[:, :4], p, ys)
    with pytest.raises(ArgumentError, match="preds_b must be finite"):
        error_similarity(p, p * float("nan"), ys)
    with pytest.raises(ArgumentError, match="one iteration count per iterate"):
        match_algorithm(p, torch.stack([p, p]), ys, ks=[1])
    with pytest.raises(ArgumentError, match="ks must be None"):
        match_algorithm(p, {1: p}, ys, ks=[1])


def test_solver_errors():
    X, y = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(ArgumentError, match="steps must be a positive int, got 0"):
        newton_schulz_pinv(X, 0)
    with pytest.raises(ArgumentError, match="form must be one of"):
        newton_iterates(X, y, 3, form="lu")
    with pytest.raises(ArgumentError, match="alpha must be > 0"):
        newton_iterates(X, y, 3, alpha=-1.0)
    with pytest.raises(ArgumentError, match="alpha must be a number or a floating tensor of shape"):
        newton_iterates(X, y, 3, alpha=torch.ones(2))
    with pytest.raises(ArgumentError, match="y must have shape"):
        newton_iterates(X, y[:3], 3)
    with pytest.raises(ArgumentError, match="X must be a floating-point tensor"):
        newton_iterates(torch.ones(4, 3, dtype=torch.long), y, 3)
    with pytest.raises(ArgumentError, match="steps_grid must be a non-empty, strictly increasing"):
        gd_iterates(X, y, 0.01, [4, 2])
    with pytest.raises(ArgumentError, match="lr must be > 0"):
        gd_iterates(X, y, 0.0, [1])
    with pytest.raises(ArgumentError, match="safety must be in"):
        newton_alpha(X, safety=1.5)


# ------------------------------------------------------------------------------------------ data
def test_prompt_sampler_and_token_layouts():
    task = InContextLinearRegression(d=3, n_points=5)
    xs, ys, w = task.sample(4, gen(40))
    assert xs.shape == (4, 5, 3) and ys.shape == (4, 5) and w.shape == (4, 3) and xs.dtype == torch.float32
    torch.testing.assert_close(ys, (xs @ w[..., None])[..., 0])
    again = task.sample(4, gen(40))[0]
    assert torch.equal(xs, again)
    paired = task.tokens(xs, ys, "paired")
    assert paired.shape == (4, 5, 4)
    assert torch.equal(paired[:, 1:, 3], ys[:, :-1]) and torch.equal(paired[:, 0, 3], torch.zeros(4))
    inter = task.tokens(xs, ys, "interleaved")
    assert inter.shape == (4, 10, 3)
    assert torch.equal(inter[:, 0::2], xs) and torch.equal(inter[:, 1::2, 0], ys)
    assert not inter[:, 1::2, 1:].any()
    assert task.prediction_positions(5, "interleaved").tolist() == [0, 2, 4, 6, 8]


def test_ill_conditioned_covariance():
    task = InContextLinearRegression(d=4, n_points=3, cond=100.0)
    ev = torch.linalg.eigvalsh(task.covariance)
    assert float(ev.max() / ev.min()) == pytest.approx(100.0)
    assert float(ev.sum()) == pytest.approx(4.0)
    xs = task.sample(20000, gen(41), dtype=D)[0].reshape(-1, 4)
    emp = xs.T @ xs / len(xs)
    torch.testing.assert_close(emp, task.covariance, rtol=0, atol=0.05)


def test_data_errors():
    with pytest.raises(ArgumentError, match="d must be a positive int"):
        InContextLinearRegression(0, 5)
    with pytest.raises(ArgumentError, match="cond must be >= 1"):
        InContextLinearRegression(2, 5, cond=0.5)
    task = InContextLinearRegression(2, 5)
    with pytest.raises(ArgumentError, match="layout must be one of"):
        task.tokens(*task.sample(2)[:2], layout="stacked")
    with pytest.raises(ArgumentError, match="ys must have shape"):
        task.tokens(torch.zeros(2, 5, 2), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------ claim and benchmark
def test_claim_smoke_recovers_the_synthetic_newton_layers(smoke_run):
    out = smoke_run("icl-newton")
    m = out.metrics["newton"]
    ks = [m[f"k_l{l}"] for l in range(1, 5)]
    assert ks == sorted(ks) and all(abs(k - 2 * l) <= 1 for l, k in zip(range(1, 5), ks))   # k* ~ 2l via read-outs
    assert m["spearman_k"] > 0.9 and m["sim_last"] > 0.99
    assert out.metrics["untrained_newton"]["spearman_k"] < 0.8                                   # the control fails
    assert out.info["curve_axes"]["sim_by_layer"]["x"] == [1, 2, 3, 4]


def test_claim_training_path_runs():
    from gradkit.harness.claims.icl_newton import ICLTransformer, IclNewtonProtocol, train_model

    p = IclNewtonProtocol.at("quick", train_steps=4, steps_per_epoch=2, batch_size=8, warmup=2)
    model = ICLTransformer(p.d, p.n_points, 16, 2, 2)
    curve = train_model(model, InContextLinearRegression(p.d, p.n_points), p, gen(0))
    assert len(curve) == 2 and all(math.isfinite(v) for v in curve)


def test_benchmarks_run():
    from gradkit.harness.benchmarks.icl_newton import run_recording

    res = run_recording(repeats=2)
    assert res.baseline_s > 0 and res.candidate_s > 0
