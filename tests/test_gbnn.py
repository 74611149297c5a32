"""gbnn: boosting losses, the boosted MLP trainer, the merged network, claim, benchmark, docs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.nn.gbnn import (
    LOSSES, BinaryLogisticLoss, BoostedMLP, GradientBoostedMLP, SoftmaxCrossEntropyLoss, SquaredLoss,
    l2_weight_penalty, make_lbfgs, one_hidden_mlp, switch_off_units,
)

REPO = Path(__file__).resolve().parents[1]
D = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets(task: str, n: int = 40, k: int = 3, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    if task == "regression":
        return torch.randn(n, k, generator=g, dtype=D)
    if task == "binary":
        return (2.0 * torch.randint(0, 2, (n, 1), generator=g) - 1).to(D)
    return nn.functional.one_hot(torch.randint(0, k, (n,), generator=g), k).to(D)


def _xy(task: str, n: int = 60, d: int = 4, seed: int = 0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    if task == "regression":
        return x, (x[:, 0] - x[:, 1] ** 2 + 0.1 * torch.randn(n, generator=g, dtype=dtype))
    if task == "binary":
        return x, (x[:, 0] + x[:, 1] > 0).long()
    return x, torch.bucketize(x[:, 0] + 0.5 * x[:, 2], torch.tensor([-0.5, 0.5], dtype=dtype))


OUT_DIM = {"regression": 1, "binary": 2, "multiclass": 3}


def _fitted(task: str, dtype=torch.float32, **kw) -> tuple[GradientBoostedMLP, torch.Tensor]:
    x, y = _xy(task, dtype=dtype)
    kw = {"total_units": 6, "inner_iters": 30, **kw}
    gb = GradientBoostedMLP(x.shape[1], OUT_DIM[task], task, **kw).fit(x, y, generator=_gen(0))
    return gb, x


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_pseudo_residuals_are_minus_autograd_gradient(task):
    lf = LOSSES[task]
    Y = _targets(task)
    F = torch.randn(Y.shape, generator=_gen(1), dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(lf.loss(Y, F) * len(Y), F)  # d(sum of per-sample losses)/dF
    torch.testing.assert_close(lf.pseudo_residuals(Y, F.detach()), -grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_init_minimises_empirical_loss(task):
    lf = LOSSES[task]
    Y = _targets(task, n=50, seed=3)
    c = lf.init(Y).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lf.loss(Y, c.expand(len(Y), -1)), c)
    assert g.abs().max() < 1e-10
    base = lf.loss(Y, c.detach().expand(len(Y), -1))
    for k in range(Y.shape[1]):  # and it is a minimum along each coordinate, not another stationary point
        for delta in (-0.1, 0.1):
            moved = c.detach().clone()
            moved[k] += delta
            assert lf.loss(Y, moved.expand(len(Y), -1)) > base


def test_binary_init_formula_and_clamp():
    lf = BinaryLogisticLoss()
    Y = torch.tensor([[1.0], [1.0], [1.0], [-1.0]], dtype=D)
    ybar = 0.5
    assert lf.init(Y).item() == pytest.approx(0.5 * math.log((1 + ybar) / (1 - ybar)), rel=1e-12)
    for sign in (1.0, -1.0):  # a single-class sample: finite, not +-inf
        f0 = lf.init(torch.full((5, 1), sign, dtype=D))
        assert torch.isfinite(f0).all() and sign * f0.item() > 5
        f32 = lf.init(torch.full((5, 1), sign))
        assert torch.isfinite(f32).all()


def test_multiclass_init_absent_class_is_finite():
    Y = nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1]), 3).to(D)
    f0 = SoftmaxCrossEntropyLoss().init(Y)
    assert torch.isfinite(f0).all() and f0[2] < f0[0] < f0[1]
    assert abs(f0.sum().item()) < 1e-12  # centred


def _exact_newton(lf, Y, F, h):
    """-g'(0) / g''(0) for g(rho) = sum_i l(y_i, F_i + rho h_i), by autograd."""
    rho = torch.zeros((), dtype=D, requires_grad=True)
    g = lf.loss(Y, F + rho * h) * len(Y)
    (d1,) = torch.autograd.grad(g, rho, create_graph=True)
    (d2,) = torch.autograd.grad(d1, rho)
    return (-d1 / d2).item()


def test_binary_newton_step_equals_exact_newton_step():
    lf = BinaryLogisticLoss()
    Y = _targets("binary", n=64, seed=5)
    F = torch.randn(64, 1, generator=_gen(6), dtype=D)
    h = torch.randn(64, 1, generator=_gen(7), dtype=D)
    r = lf.pseudo_residuals(Y, F)
    assert lf.newton_step(Y, r, h).item() == pytest.approx(_exact_newton(lf, Y, F, h), rel=1e-10)
    # the official form sum(r h) / sum(r h^2 (2y - r)) is the same number
    official = (r * h).sum() / (r * h * h * (2 * Y - r)).sum()
    assert lf.newton_step(Y, r, h).item() == pytest.approx(official.item(), rel=1e-12)


def test_multiclass_newton_step_is_the_diagonal_formula_not_the_exact_one():
    lf = SoftmaxCrossEntropyLoss()
    Y = _targets("multiclass", n=64, k=4, seed=8)
    F = torch.randn(64, 4, generator=_gen(9), dtype=D)
    h = torch.randn(64, 4, generator=_gen(10), dtype=D)
    r = lf.pseudo_residuals(Y, F)
    p = torch.softmax(F, -1)
    num = sum(h[i, k] * r[i, k] for i in range(64) for k in range(4))  # naive double loop
    den = sum(h[i, k] ** 2 * p[i, k] * (1 - p[i, k]) for i in range(64) for k in range(4))
    step = lf.newton_step(Y, r, h).item()
    assert step == pytest.approx((num / den).item(), rel=1e-12)
    exact = _exact_newton(lf, Y, F, h)
    assert abs(step - exact) / abs(exact) > 0.01  # cross-class Hessian terms dropped


def test_regression_step_is_one_and_zero_learner_gets_zero_step():
    Y = _targets("regression")
    assert SquaredLoss().newton_step(Y, Y, torch.randn_like(Y)).item() == 1.0
    for lf, task in ((BinaryLogisticLoss(), "binary"), (SoftmaxCrossEntropyLoss(), "multiclass")):
        Y = _targets(task)
        r = lf.pseudo_residuals(Y, torch.zeros_like(Y))
        step = lf.newton_step(Y, r, torch.zeros_like(Y))
        assert step.item() == 0.0 and torch.isfinite(step)


# ----------------------------------------------------------------------------- building blocks
def test_one_hidden_mlp_init_and_reproducibility():
    net = one_hidden_mlp(30, 7, 2, generator=_gen(0))
    a0, a1 = math.sqrt(2 / 37), math.sqrt(2 / 9)  # sigmoid: f = 2
    assert net[0].weight.abs().max() <= a0 and net[0].bias.abs().max() <= a0
    assert net[2].weight.abs().max() <= a1 and net[2].bias.abs().max() <= a1
    assert isinstance(net[1], nn.Sigmoid)
    same = one_hidden_mlp(30, 7, 2, generator=_gen(0))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), same.parameters()))
    big = one_hidden_mlp(30, 500, 2, activation="tanh", generator=_gen(1), dtype=D)
    bound = math.sqrt(6 / 530)
    assert big[0].weight.dtype == D and big[0].weight.abs().max() <= bound
    assert big[0].weight.abs().max() > 0.95 * bound  # uniform over the whole range


def test_l2_weight_penalty_matches_formula():
    net = one_hidden_mlp(5, 4, 2, generator=_gen(0))
    ref = 0.5 * 1e-2 * (net[0].weight.pow(2).sum() + net[2].weight.pow(2).sum()) / 16
    torch.testing.assert_close(l2_weight_penalty(net, 1e-2, 16), ref)
    assert l2_weight_penalty(net, 0.0, 16).item() == 0.0


def test_make_lbfgs_runs_iterations_in_one_step():
    from gradkit.engine import fit

    torch.manual_seed(0)
    x = torch.randn(50, 3, dtype=D)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=D)
    net = nn.Linear(3, 1).double()
    opt = make_lbfgs(net.parameters(), max_iter=30)
    fit(net, opt, [(x, y)], epochs=1, compute_loss=lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    assert (net(x) - y).abs().max() < 1e-6
    assert opt.state[opt._params[0]]["n_iter"] <= 30


# ----------------------------------------------------------------------------- the booster
@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_merged_network_reproduces_decision_function(task):
    gb, x = _fitted(task)
    x64 = x.double()
    gb64 = gb.double()
    s = 2.0 if task == "binary" else 1.0
    net = gb64.to_module()
    assert isinstance(net, BoostedMLP) and net.hidden.out_features == 6 and net.n_steps == 6
    with torch.no_grad():
        torch.testing.assert_close(net(x64), s * gb64.decision_function(x64), rtol=0, atol=1e-12)
        for n in (0, 1, 3, 6):  # truncation == staged prediction == a partial merge
            ref = s * gb64.decision_function(x64, n_steps=n)
            torch.testing.assert_close(net.truncate(n)(x64), ref, rtol=0, atol=1e-12)
            torch.testing.assert_close(gb64.to_module(n)(x64), ref, rtol=0, atol=1e-12)
    # each learner's own output bias is folded in with weight rho_t
    bias = s * (gb64.init_score + sum(r * lr[2].bias for r, lr in zip(gb64.step_sizes, gb64.learners)))
    torch.testing.assert_close(net.output.bias, bias)
    # the merged network is an ordinary differentiable module
    xin = x64[:5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(net, (xin,))


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_staged_scores_match_decision_function(task):
    gb, x = _fitted(task)
    staged = list(gb.staged_scores(x))
    assert len(staged) == 7
    for t, F in enumerate(staged):
        torch.testing.assert_close(F, gb.decision_function(x, n_steps=t), rtol=0, atol=1e-6)
    torch.testing.assert_close(staged[0], gb.init_score.expand(len(x), -1))


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_step_is_eta_times_newton_step_on_full_training_set(task):
    x, y = _xy(task, dtype=D)
    gb = GradientBoostedMLP(4, OUT_DIM[task], task, total_units=2, inner_iters=20, eta=0.7, subsample=0.5)
    gb.fit(x, y.double() if task == "regression" else y, generator=_gen(0))
    Y = gb._encode_targets(y.double() if task == "regression" else y, len(x), x)
    F0 = gb.init_score.expand(len(x), -1)
    r = gb.loss_fn.pseudo_residuals(Y, F0)
    with torch.no_grad():
        h = gb.learners[0](x)
    expected = 0.7 * gb.loss_fn.newton_step(Y, r, h)
    assert gb.step_sizes[0].item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(gb.init_score, gb.loss_fn.init(Y))


def test_subsample_is_drawn_per_round_for_fitting_only(monkeypatch):
    seen = []
    orig = GradientBoostedMLP._fit_learner

    def spy(self, learner, zs, rs, generator):
        seen.append(zs.clone())
        return orig(self, learner, zs, rs, generator)

    monkeypatch.setattr(GradientBoostedMLP, "_fit_learner", spy)
    x, y = _xy("binary", n=61)
    GradientBoostedMLP(4, 2, "binary", total_units=3, inner_iters=5, subsample=0.5).fit(x, y, generator=_gen(0))
    assert [len(z) for z in seen] == [30, 30, 30]  # int(0.5 * 61), without replacement
    rows = {tuple(r.tolist()) for r in x}
    for z in seen:
        assert len({tuple(r.tolist()) for r in z}) == 30 and all(tuple(r.tolist()) in rows for r in z)
    assert not torch.equal(seen[0], seen[1])
    seen.clear()
    GradientBoostedMLP(4, 2, "binary", total_units=2, inner_iters=5, subsample=1.0).fit(x, y)
    assert all(torch.equal(z, x) for z in seen)


def test_binary_labels_are_mapped_to_plus_minus_one_and_proba():
    gb, x = _fitted("binary")
    _, y = _xy("binary")
    Y = gb._encode_targets(y, len(y), x)
    assert set(Y.flatten().tolist()) == {-1.0, 1.0} and torch.equal(Y.flatten() > 0, y.bool())
    F = gb.decision_function(x)
    proba = gb.predict_proba(x)
    assert proba.shape == (len(x), 2)
    torch.testing.assert_close(proba[:, 1], torch.sigmoid(2 * F.squeeze(1)))
    torch.testing.assert_close(proba.sum(1), torch.ones(len(x)))
    assert torch.equal(gb.predict(x), (proba[:, 1] > 0.5).long())
    assert (gb.predict(x) == y).float().mean() > 0.8


def test_training_loss_falls_with_full_subsample_regression():
    x, y = _xy("regression", n=120)
    gb = GradientBoostedMLP(4, 1, total_units=8, subsample=1.0, inner_iters=60).fit(x, y, generator=_gen(0))
    losses = gb.train_loss_
    assert len(losses) == 9 and losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 6
    assert gb.predict(x).shape == (120,)


def test_fit_is_reproducible_with_generator_and_refit_starts_afresh():
    x, y = _xy("multiclass")
    a = GradientBoostedMLP(4, 3, "multiclass", total_units=3, inner_iters=10).fit(x, y, generator=_gen(4))
    b = GradientBoostedMLP(4, 3, "multiclass", total_units=3, inner_iters=10).fit(x, y, generator=_gen(4))
    c = GradientBoostedMLP(4, 3, "multiclass", total_units=3, inner_iters=10).fit(x, y, generator=_gen(5))
    assert torch.equal(a.step_sizes, b.step_sizes) and torch.equal(a.decision_function(x), b.decision_function(x))
    assert not torch.equal(a.step_sizes, c.step_sizes)
    a.fit(x, y, generator=_gen(5))
    assert len(a.learners) == 3 and torch.equal(a.step_sizes, c.step_sizes)


def test_units_per_step_adam_inner_and_multi_target_regression():
    g = _gen(0)
    x = torch.randn(50, 3, generator=g)
    y = torch.stack([x[:, 0], x[:, 1] * x[:, 2]], 1)
    gb = GradientBoostedMLP(3, 2, total_units=6, units_per_step=3, inner_optimizer="adam", inner_iters=5,
                            activation="tanh").fit(x, y, generator=g)
    assert len(gb.learners) == 2 and gb.learners[0][0].out_features == 3
    assert gb.predict(x).shape == (50, 2)
    net = gb.to_module()
    assert net.hidden.out_features == 6 and isinstance(net[1], nn.Tanh)
    torch.testing.assert_close(net(x), gb.decision_function(x), rtol=1e-5, atol=1e-5)
    assert "units_per_step=3" in repr(gb) and "n_steps=2" in repr(net)


def test_feature_extractor_variant_is_frozen_and_merged():
    torch.manual_seed(0)
    ext = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5))  # eval mode: dropout off
    ext.train()
    before = [p.clone() for p in ext.parameters()]
    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))
    gb = GradientBoostedMLP(5, 3, "multiclass", total_units=4, inner_iters=10, feature_extractor=ext)
    gb.fit(x, y, generator=_gen(0))
    assert ext.training and all(not p.requires_grad for p in ext.parameters())
    assert all(torch.equal(p, q) for p, q in zip(before, ext.parameters()))
    net = gb.to_module()
    assert net[0] is ext and net.truncate(2)[0] is ext
    net.eval()
    torch.testing.assert_close(net(x), gb.decision_function(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_extractor\\(X\\) must have in_dim = 4 columns"):
        GradientBoostedMLP(4, 3, "multiclass", total_units=2, feature_extractor=ext).fit(x, y)


def test_switch_off_units_zeroes_last_output_weights_only():
    net = one_hidden_mlp(8, 10, 3, generator=_gen(0))
    x = torch.randn(20, 8)
    half = switch_off_units(net, 4)
    assert torch.equal(half[-1].weight[:, 4:], torch.zeros(3, 6))
    assert torch.equal(half[-1].weight[:, :4], net[-1].weight[:, :4]) and net[-1].weight[:, 4:].abs().sum() > 0
    ref = torch.sigmoid(x @ net[0].weight[:4].T + net[0].bias[:4]) @ net[2].weight[:, :4].T + net[2].bias
    torch.testing.assert_close(half(x), ref)
    torch.testing.assert_close(switch_off_units(net, 10)(x), net(x))


def test_divergence_raises_clear_error():
    x, y = _xy("regression")
    gb = GradientBoostedMLP(4, 1, total_units=2, eta=1e308, inner_iters=5)
    with pytest.raises(RuntimeError, match="round 0: the scores overflowed"):
        gb.fit(x, y, generator=_gen(0))
    assert not gb.is_fitted  # a failed fit leaves no half-fitted model behind
    with pytest.raises(RuntimeError, match="not fitted yet"):
        gb.predict(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_and_merge():
    x, y = _xy("multiclass")
    gb = GradientBoostedMLP(4, 3, "multiclass", total_units=4, inner_iters=10)
    gb.fit(x.cuda(), y.cuda(), generator=_gen(0))
    cpu = GradientBoostedMLP(4, 3, "multiclass", total_units=4, inner_iters=10).fit(x, y, generator=_gen(0))
    assert gb.decision_function(x.cuda()).device.type == "cuda"
    torch.testing.assert_close(gb.to_module()(x.cuda()), gb.decision_function(x.cuda()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.learners[0][0].weight.cpu(), cpu.learners[0][0].weight, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, exc, match", [
    (dict(in_dim=0), ValueError, "in_dim must be a positive int, got 0"),
    (dict(out_dim=2.0), ValueError, "out_dim must be a positive int, got float 2.0"),
    (dict(task="ranking"), ValueError, "task must be one of"),
    (dict(task="binary", out_dim=3), ValueError, "out_dim must be 2 .* for task='binary', got 3"),
    (dict(task="multiclass", out_dim=1), ValueError, "out_dim must be >= 2"),
    (dict(total_units=0), ValueError, "total_units must be a positive int"),
    (dict(total_units=10, units_per_step=3), ValueError, "total_units must be a multiple of units_per_step"),
    (dict(units_per_step=True), ValueError, "units_per_step must be a positive int"),
    (dict(eta=0.0), ValueError, "eta must be > 0, got 0.0"),
    (dict(eta=float("nan")), ValueError, "eta must be finite"),
    (dict(eta="1"), TypeError, "eta must be a real number"),
    (dict(subsample=0.0), ValueError, r"subsample must be in \(0, 1\], got 0.0"),
    (dict(subsample=1.5), ValueError, r"subsample must be in \(0, 1\], got 1.5"),
    (dict(inner_optimizer="sgd"), ValueError, "inner_optimizer must be one of"),
    (dict(inner_iters=-1), ValueError, "inner_iters must be a positive int, got -1"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay must be finite and >= 0"),
    (dict(inner_lr=0), ValueError, "inner_lr must be > 0"),
    (dict(inner_batch_size=0), ValueError, "inner_batch_size must be a positive int"),
    (dict(feature_extractor=lambda x: x), TypeError, "feature_extractor must be an nn.Module"),
])
def test_constructor_bad_inputs(kw, exc, match):
    args = {"in_dim": 4, "out_dim": 1, **kw}
    with pytest.raises(exc, match=match):
        GradientBoostedMLP(**args)


def test_fit_and_predict_bad_inputs():
    x, y = _xy("multiclass")
    gb = GradientBoostedMLP(4, 3, "multiclass", total_units=2, inner_iters=5)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        gb.predict(x)
    with pytest.raises(TypeError, match="X must be a torch.Tensor, got list"):
        gb.fit(x.tolist(), y)
    with pytest.raises(TypeError, match="X must be a floating-point tensor"):
        gb.fit(x.long(), y)
    with pytest.raises(ValueError, match="X must be 2-D"):
        gb.fit(x[:, 0], y)
    with pytest.raises(ValueError, match="X must have in_dim = 4 columns, got shape \\(60, 3\\)"):
        gb.fit(x[:, :3], y)
    with pytest.raises(ValueError, match="X contains non-finite"):
        gb.fit(torch.full_like(x, float("nan")), y)
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        gb.fit(x, y.float())
    with pytest.raises(ValueError, match=r"y labels must be in \[0, 3\), got values in \[0, 3\]"):
        gb.fit(x, torch.where(y == 2, 3, y))
    with pytest.raises(ValueError, match="y has 59 rows, X has 60"):
        gb.fit(x, y[:-1])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        gb.fit(x, y, generator=0)
    reg = GradientBoostedMLP(4, 2, total_units=2, inner_iters=5)
    with pytest.raises(ValueError, match=r"y must have shape \(N,\) or \(N, 2\)"):
        reg.fit(x, torch.randn(60))
    with pytest.raises(TypeError, match="y must be a floating-point tensor for task='regression'"):
        reg.fit(x, y)
    with pytest.raises(ValueError, match="y contains non-finite"):
        reg.fit(x, torch.full((60, 2), float("inf")))
    gb.fit(x, y, generator=_gen(0))
    with pytest.raises(ValueError, match=r"n_steps must be None or an int in \[0, 2\], got 3"):
        gb.decision_function(x, n_steps=3)
    with pytest.raises(ValueError, match="n_steps must be None or an int"):
        gb.to_module(-1)
    with pytest.raises(TypeError, match="X has dtype torch.float64 but the model is torch.float32"):
        gb.predict(x.double())
    reg.fit(x, torch.randn(60, 2), generator=_gen(0))
    with pytest.raises(ValueError, match="predict_proba needs task='binary' or 'multiclass'"):
        reg.predict_proba(x)


def test_helpers_bad_inputs():
    gb, x = _fitted("regression")
    net = gb.to_module()
    with pytest.raises(ValueError, match=r"n_steps must be an int in \[0, 6\], got 7"):
        net.truncate(7)
    with pytest.raises(TypeError, match="model must be an nn.Sequential ending in nn.Linear"):
        switch_off_units(nn.Linear(3, 2), 1)
    with pytest.raises(ValueError, match=r"keep must be an int in \[0, 6\]"):
        switch_off_units(net, 7)
    with pytest.raises(ValueError, match="hidden must be a non-negative int"):
        one_hidden_mlp(3, -1, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        one_hidden_mlp(3, 2, 2, activation="swish")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        one_hidden_mlp(3, 2, 2, generator=1)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        l2_weight_penalty(net, -1.0, 10)
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        l2_weight_penalty(net, 1e-4, 0)
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        make_lbfgs(net.parameters(), 0)
    with pytest.raises(ValueError, match="hidden layer has 4 units, expected steps \\* units_per_step"):
        BoostedMLP(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1), step_bias=torch.zeros(3, 1),
                   init_bias=torch.zeros(1), units_per_step=1)


# ----------------------------------------------------------------------------- criteria of the claim
def _seeds(values: dict[str, dict[str, float]], n: int = 3):
    return [values] * n


def test_competitive_accuracy_leniency_for_one_small_set():
    from gradkit.harness.claims.gbnn import CompetitiveAccuracy

    crit = CompetitiveAccuracy(sets=(("acc_a", 100), ("acc_b", 36)), mean_metric="acc_mean", ours="o",
                               baselines=("b1", "b2"), within=1.5)
    ok_m = {"o": {"acc_a": 90.0, "acc_b": 80.0, "acc_mean": 85.0}, "b1": {"acc_a": 89.0, "acc_b": 83.0,
            "acc_mean": 86.0}, "b2": {"acc_a": 91.0, "acc_b": 81.0, "acc_mean": 86.0}}
    ok, checks = crit.evaluate(_seeds(ok_m))  # acc_b misses by 3 <= 1.5 + 100/36, mean within 1
    assert ok and "misses by <= 1 of 36" in checks[1].detail
    bad = {**ok_m, "o": {"acc_a": 90.0, "acc_b": 78.0, "acc_mean": 84.0}}  # misses by 5 > 4.28
    assert not crit.evaluate(_seeds(bad))[0]
    two = {**ok_m, "o": {"acc_a": 89.0, "acc_b": 80.0, "acc_mean": 84.5}}  # two sets miss
    assert not crit.evaluate(_seeds(two))[0]
    nan = {**ok_m, "o": {"acc_a": float("nan"), "acc_b": 83.0, "acc_mean": float("nan")}}
    assert not crit.evaluate(_seeds(nan))[0]


def test_relative_and_anytime_criteria():
    from gradkit.harness.claims.gbnn import AnytimeContrast, RelativeToBest

    rel = RelativeToBest(metric="rmse", ours="o", baselines=("b1", "b2"), rel=0.05)
    assert rel.evaluate(_seeds({"o": {"rmse": 52.0}, "b1": {"rmse": 50.0}, "b2": {"rmse": 60.0}}))[0]
    assert not rel.evaluate(_seeds({"o": {"rmse": 53.0}, "b1": {"rmse": 50.0}, "b2": {"rmse": 60.0}}))[0]
    any_ = AnytimeContrast(metric="drop", ours="o", baselines=("b1", "b2"), floor=5.0, factor=2.0)
    assert any_.evaluate(_seeds({"o": {"drop": 1.0}, "b1": {"drop": 5.0}, "b2": {"drop": 9.0}}))[0]
    assert not any_.evaluate(_seeds({"o": {"drop": 3.0}, "b1": {"drop": 5.5}, "b2": {"drop": 9.0}}))[0]


# ----------------------------------------------------------------------------- claim
@pytest.fixture(scope="module")
def claim():
    from gradkit.harness.claims import get_claim

    return get_claim("gbnn")


def test_claim_registered(claim):
    assert claim.arxiv == "1909.12098" and claim.primary.ours == "gbnn"
    assert "gradkit.nn.gbnn.GradientBoostedMLP" in claim.uses and "digits_anytime_acc" in claim.plots
    assert claim.resolve(None).control == {"gbnn": "mlp_lbfgs"}
    assert claim.protocol.at("quick").datasets == ("breast_cancer", "wine", "digits", "diabetes")


def test_claim_smoke(claim, smoke_run):
    from gradkit.harness.claims import RunContext

    threads = torch.get_num_threads()
    out = smoke_run("gbnn")
    assert torch.get_num_threads() == threads
    p = claim.protocol.at("smoke")
    assert out.data == "uci-sklearn" and set(out.metrics) == {"gbnn", "mlp_lbfgs", "mlp_adam"}
    for arm, m in out.metrics.items():
        assert 50 <= m["acc_breast_cancer"] <= 100
        assert 20 < m["rmse_diabetes"] < 200
        assert "acc_digits" not in m and "acc_wine" not in m  # not run at smoke scale
        assert m["acc_mean"] == m["acc_breast_cancer"]
    g = out.metrics["gbnn"]
    assert g["merge_max_diff"] < 1e-5  # (c)
    assert g["diabetes_train_loss_ratio"] < 0.5 and g["diabetes_rounds_decreasing"] > 0.5
    rho = out.info["arms"]["gbnn"]["rho"]["diabetes"]
    assert p.units == 10 and len(rho) == 10
    assert all(r == 1.0 for r in rho)  # squared loss: rho = eta
    assert len(out.curves["gbnn_train_loss"]["gbnn"]) == 11
    # the wine and digits metrics are absent at smoke scale: the criterion cannot be evaluated there
    with pytest.raises(KeyError, match="acc_wine"):
        claim.criterion_for(out.data).evaluate([out.metrics])
    # reruns are bit-identical on CPU
    assert claim.run(RunContext(scale="smoke", seed=0)).metrics == out.metrics


def test_claim_tuning_budgets_are_equal_and_validation_comes_from_training_rows(claim):
    from gradkit.harness.claims.gbnn import holdout_split, load_split

    for scale in ("smoke", "quick", "full"):
        p = claim.protocol.at(scale)
        assert len(p.eta_grid) == len(p.lbfgs_iters_grid) == len(p.adam_lr_grid)
    split = load_split("diabetes", seed=0)
    val = holdout_split(split, 0.2, seed=0)
    n = len(split["y_train"])
    assert len(val["y_train"]) + len(val["y_val"]) == n and len(val["x_val"]) == round(0.2 * n)
    assert torch.equal(val["x_test"], split["x_test"])  # the test set is untouched
    # held-out rows come from the training rows; their targets are back in original units, as test targets are
    rows = {tuple(r.tolist()) for r in split["x_train"]}
    assert all(tuple(r.tolist()) in rows for r in val["x_val"])
    assert abs(float(val["y_val"].mean()) - float(split["y_test"].mean())) < 40.0
    assert torch.equal(holdout_split(split, 0.2, seed=0)["x_val"], val["x_val"])
    cls = holdout_split(load_split("wine", seed=1), 0.2, seed=1)
    assert cls["y_val"].dtype == torch.int64


def test_claim_bad_dataset(claim):
    from gradkit.harness.claims import RunContext

    with pytest.raises(ValueError, match="unknown data sets"):
        claim.run(RunContext(scale="smoke", seed=0, overrides={"datasets": ("iris",)}))


# ----------------------------------------------------------------------------- benchmark, docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.gbnn as bench
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("gbnn-training")
    assert b.slug == "gbnn" and b.target is None
    r = bench.run(1, units=2, epochs=2)
    assert r.baseline_s > 0 and math.isfinite(r.ratio) and r.extra["units"] == 2


