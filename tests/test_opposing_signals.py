"""Tests of the opposing-signals instruments: per-example loss tracking, the opposing split, anti-phase, sharpness."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit.data.opposing_signals import opposing_signal_data
from gradkit.engine import fit
from gradkit.probes.opposing_signals import (PerExampleLossTracker, antiphase_score, example_gradients,
                                             per_example_losses, split_gradients, split_opposing)
from gradkit.probes.sharpness import SharpnessTracker, hessian_top_eigenvalue
from gradkit.testing import count_hooks

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sq(out, y):
    """0.5 (f(x) - y)^2 per example."""
    return 0.5 * (out.reshape(len(y), -1) - y.reshape(len(y), -1)).pow(2).sum(1)


class Quadratic(nn.Module):
    """Output 0.5 w^T H w whatever the input: the loss's Hessian is H."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("h", h)
        self.w = nn.Parameter(torch.randn(h.shape[0], generator=gen(3), dtype=h.dtype))

    def forward(self, x):
        return (0.5 * self.w @ self.h @ self.w).expand(len(x))


def spd(eigs, seed=0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen(seed), dtype=D))
    return q @ torch.diag(torch.tensor(eigs, dtype=D)) @ q.T


def identity_loss(out, y):
    return out


# ---------------------------------------------------------------------------------------- sharpness
def test_hessian_top_eigenvalue_linear_regression_closed_form():
    x = torch.randn(200, 6, generator=gen(1), dtype=D) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5, 0.2], dtype=D)
    y = torch.randn(200, 1, generator=gen(2), dtype=D)
    model = nn.Linear(6, 1, bias=False).to(D)
    lam, v = hessian_top_eigenvalue(model, sq, x, y, iters=100, generator=gen(0))
    top = float(torch.linalg.eigvalsh(x.T @ x / len(x))[-1])
    assert abs(lam - top) <= 1e-3 * top
    assert v.shape == (6,) and abs(float(v.norm()) - 1) < 1e-9


def test_hessian_top_eigenvalue_quadratic_and_negative_shift():
    h = spd([5.0, 2.0, 1.0, 0.5])
    lam, _ = hessian_top_eigenvalue(Quadratic(h), identity_loss, torch.zeros(3, 1), torch.zeros(3), iters=60,
                                    generator=gen(0))
    assert abs(lam - 5.0) <= 0.01 * 5.0
    # a dominant negative eigenvalue: power iteration alone would return -12; the shifted rerun gives 3
    h = spd([-12.0, 3.0, 1.0, -0.5], seed=1)
    lam, _ = hessian_top_eigenvalue(Quadratic(h), identity_loss, torch.zeros(3, 1), torch.zeros(3), iters=200,
                                    generator=gen(0))
    assert abs(lam - 3.0) <= 0.01 * 3.0


def test_hessian_top_eigenvalue_chunks_dtype_and_warm_start():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(64, 5, generator=gen(1)), torch.randn(64, 1, generator=gen(2))
    full, v = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, iters=100, dtype=D, generator=gen(0))
    chunked, _ = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, iters=100, dtype=D, batch_size=10,
                                        generator=gen(0))
    assert abs(full - chunked) <= 1e-8 * abs(full)
    assert v.dtype == D
    warm, _ = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, iters=1, v0=v, dtype=D)
    assert abs(warm - full) <= 1e-6 * abs(full)
    # the float32 parameters are read, never changed
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())


def test_hessian_top_eigenvalue_leaves_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 1))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 4, generator=gen(1)), torch.randn(32, 1, generator=gen(2))
    lam1, _ = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, iters=30, generator=gen(0))
    lam2, _ = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, iters=30, generator=gen(0))
    assert lam1 == lam2  # eval mode: dropout off, running statistics used, nothing updated
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert count_hooks(model) == 0


def test_hessian_top_eigenvalue_errors():
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    with pytest.raises(ValueError, match="iters must be a positive int, got 0"):
        hessian_top_eigenvalue(model, sq, x, y, iters=0)
    with pytest.raises(ValueError, match="y has 3 rows, expected 4"):
        hessian_top_eigenvalue(model, sq, x, y[:3])
    with pytest.raises(ValueError, match="x is empty"):
        hessian_top_eigenvalue(model, sq, x[:0], y[:0])
    with pytest.raises(ValueError, match="v0 must have 4 elements"):
        hessian_top_eigenvalue(model, sq, x, y, v0=torch.ones(3))
    with pytest.raises(ValueError, match="v0 must be non-zero"):
        hessian_top_eigenvalue(model, sq, x, y, v0=torch.zeros(4))
    with pytest.raises(ValueError, match="dtype must be None or a floating"):
        hessian_top_eigenvalue(model, sq, x, y, dtype=torch.int64)
    with pytest.raises(ValueError, match="loss is not finite"):
        hessian_top_eigenvalue(model, sq, x, torch.full((4, 1), math.nan))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hessian_top_eigenvalue(lambda t: t, sq, x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        hessian_top_eigenvalue(model, "mse", x, y)
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        hessian_top_eigenvalue(frozen, sq, x, y)
    two = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
    two.forward = lambda inp: two["used"](inp)
    with pytest.raises(ValueError, match=r"does not depend on parameter\(s\) \['unused.weight'"):
        hessian_top_eigenvalue(two, sq, x, y)


def test_sharpness_tracker_every_and_peak():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(50, 3, generator=gen(1)), torch.randn(50, 1, generator=gen(2))
    tr = SharpnessTracker(model, sq, x, y, every=3, iters=50, dtype=D)
    assert math.isnan(tr.peak)
    for t in range(7):
        tr(t)
    assert tr.steps == [0, 3, 6]
    top = float(torch.linalg.eigvalsh((x.T @ x / 50).double())[-1])
    assert all(abs(v - top) <= 1e-3 * top for v in tr.values)  # linear model: the Hessian never changes
    assert tr.peak == max(tr.values)
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        SharpnessTracker(model, sq, x, y, every=0)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        tr(-1)


# ---------------------------------------------------------------------------------------- per-example losses
def test_per_example_losses_match_batch_reductions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(40, 5, generator=gen(1)), torch.randint(0, 3, (40,), generator=gen(2))
    l = per_example_losses(model, nn.CrossEntropyLoss(reduction="none"), x, y, batch_size=7)
    assert l.shape == (40,)
    assert torch.allclose(l.sum(), nn.functional.cross_entropy(model(x), y, reduction="sum"), rtol=1e-5)
    # trailing dims are averaged: the mean is MSELoss's reduction='mean'
    t = torch.randn(40, 3, generator=gen(3))
    l2 = per_example_losses(model, nn.MSELoss(reduction="none"), x, t)
    assert torch.allclose(l2.mean(), nn.functional.mse_loss(model(x), t), rtol=1e-5)


def test_per_example_losses_errors():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match=r"one loss per example, shape \(4,\) \(use reduction='none'\), got shape \(\)"):
        per_example_losses(model, nn.CrossEntropyLoss(), x, y)
    with pytest.raises(ValueError, match="2 of 4 per-example losses are not finite"):
        x_bad = x.clone()
        x_bad[1:3] = math.inf
        per_example_losses(model, nn.CrossEntropyLoss(reduction="none"), x_bad, y)
    with pytest.raises(TypeError, match="loss_fn must return a floating torch.Tensor"):
        per_example_losses(model, lambda o, t: 1.0, x, y)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        per_example_losses(model, nn.CrossEntropyLoss(reduction="none"), x, y, batch_size=0)


# ---------------------------------------------------------------------------------------- the tracker
def _set_weight(model: nn.Linear, w: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(w)


def test_tracker_deltas_topk_counts_closed_form():
    # f(x) = w . x with y = 0: l_i = 0.5 (w . x_i)^2, so every Delta is known exactly
    x = torch.randn(30, 4, generator=gen(1), dtype=D)
    y = torch.zeros(30, dtype=D)
    model = nn.Linear(4, 1, bias=False).to(D)
    ws = [torch.randn(1, 4, generator=gen(10 + t), dtype=D) for t in range(6)]
    tr = PerExampleLossTracker(model, sq, x, y, k=5, warmup=2, groups={"first": [0, 1, 2], "mask": torch.arange(30) >= 25})
    for t, w in enumerate(ws):
        _set_weight(model, w)
        d = tr.step(t * 10)
        loss = 0.5 * (x @ w.T).squeeze(1) ** 2
        assert tr.group_losses["first"][-1] == pytest.approx(float(loss[:3].mean()), rel=1e-12)
        assert tr.group_losses["mask"][-1] == pytest.approx(float(loss[25:].mean()), rel=1e-12)
        assert tr.mean_losses[-1] == pytest.approx(float(loss.mean()), rel=1e-12)
        if t == 0:
            assert d is None
            continue
        prev = 0.5 * (x @ ws[t - 1].T).squeeze(1) ** 2
        assert torch.allclose(d, loss - prev, rtol=0, atol=1e-12)
        step, idx, vals = tr.topk_history[-1]
        assert step == (t - 1) * 10
        assert set(idx.tolist()) == set(torch.topk((loss - prev).abs(), 5).indices.tolist())
        assert torch.allclose(vals, (loss - prev)[idx], atol=1e-12)
    assert tr.steps == [0, 10, 20, 30, 40, 50] and len(tr.topk_history) == 5
    counted = [h for h in tr.topk_history if h[0] >= 2]            # warm-up: steps 0 and 10 not counted
    assert int(tr.counts.sum()) == 5 * len(counted) == 20
    pool = tr.frequent_outliers()
    c = tr.counts[pool]
    assert bool((c[:-1] >= c[1:]).all()) and int(c.min()) >= 1
    assert set(pool.tolist()) == set(tr.counts.nonzero().flatten().tolist())
    assert len(tr.frequent_outliers(min_count=1, top=3)) == 3
    everything = tr.topk_precision(torch.arange(30))
    assert everything == pytest.approx(1.0)
    assert tr.topk_precision([0], after=1000) != tr.topk_precision([0], after=1000)  # NaN: no step qualifies


def test_tracker_increase_decrease_and_reset():
    x = torch.eye(4, dtype=D)
    y = torch.zeros(4, dtype=D)
    model = nn.Linear(4, 1, bias=False).to(D)
    _set_weight(model, torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=D))
    up = PerExampleLossTracker(model, sq, x, y, k=1, by="increase")
    down = PerExampleLossTracker(model, sq, x, y, k=1, by="decrease")
    up.step(), down.step()
    _set_weight(model, torch.tensor([[2.0, 0.0, 1.0, 1.5]], dtype=D))  # losses 2.0, 0.0, 0.5, 1.125
    up.step(), down.step()
    assert up.topk_history[0][1].tolist() == [0] and down.topk_history[0][1].tolist() == [1]
    up.reset()
    assert up.steps == [] and up.topk_history == [] and int(up.counts.sum()) == 0


def test_tracker_as_fit_callback_and_keep_losses():
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, generator=gen(1)), torch.randint(0, 2, (20,), generator=gen(2))
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    tr = PerExampleLossTracker(model, nn.CrossEntropyLoss(reduction="none"), x, y, k=4, keep_losses=True)
    hist = fit(model, torch.optim.SGD(model.parameters(), lr=0.5), [(x, y)], epochs=5, on_step_start=tr)
    tr.step()  # close the last step's Delta
    assert tr.steps == [0, 1, 2, 3, 4, 5] and len(tr.topk_history) == 5
    # the tracker's loss at each step's start is the loss the step trained on (no dropout here)
    assert [round(v, 5) for v in tr.mean_losses[:5]] == [round(v, 5) for v in hist.series("train_loss")]
    assert tr.loss_history.shape == (6, 20) and tr.topk_indices.shape == tr.topk_deltas.shape == (5, 4)
    assert torch.allclose(tr.loss_history.mean(1), torch.tensor(tr.mean_losses), rtol=1e-6)
    assert model.training
    with pytest.raises(RuntimeError, match="keep_losses=True"):
        PerExampleLossTracker(model, nn.CrossEntropyLoss(reduction="none"), x, y, k=4).loss_history


def test_tracker_restores_mode_and_leaves_no_hooks_when_training_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    calls = {"n": 0}

    def flaky(out, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, t, reduction="none")

    tr = PerExampleLossTracker(model, flaky, x, y, k=2)

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    with pytest.raises(RuntimeError, match="boom"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), [(x, y)], epochs=5, on_step_start=tr,
            compute_loss=loss)
    assert model.training and count_hooks(model) == 0
    assert torch.is_grad_enabled()

    def bad_train(m, b):
        raise ValueError("training failed")

    tr2 = PerExampleLossTracker(model, nn.CrossEntropyLoss(reduction="none"), x, y, k=2)
    with pytest.raises(ValueError, match="training failed"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), [(x, y)], epochs=2, on_step_start=tr2,
            compute_loss=bad_train)
    assert model.training and count_hooks(model) == 0 and tr2.steps == [0]


def test_tracker_errors():
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    ce = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\], got 6"):
        PerExampleLossTracker(model, ce, x, y, k=6)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\], got 0"):
        PerExampleLossTracker(model, ce, x, y, k=0)
    with pytest.raises(ValueError, match="probe_y has 4 rows, expected 5 like probe_x"):
        PerExampleLossTracker(model, ce, x, y[:4], k=1)
    with pytest.raises(ValueError, match=r"by must be one of \('abs', 'increase', 'decrease'\)"):
        PerExampleLossTracker(model, ce, x, y, k=1, by="up")
    with pytest.raises(ValueError, match=r"groups\['A'\] has indices outside \[0, 4\]"):
        PerExampleLossTracker(model, ce, x, y, k=1, groups={"A": [1, 7]})
    with pytest.raises(ValueError, match=r"groups\['A'\] as a mask must have shape \(5,\)"):
        PerExampleLossTracker(model, ce, x, y, k=1, groups={"A": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"groups\['A'\] must be a non-empty 1-D list"):
        PerExampleLossTracker(model, ce, x, y, k=1, groups={"A": []})
    with pytest.raises(ValueError, match="warmup must be a non-negative int, got -1"):
        PerExampleLossTracker(model, ce, x, y, k=1, warmup=-1)
    tr = PerExampleLossTracker(model, ce, x, y, k=1)
    tr.step(3)
    with pytest.raises(ValueError, match="t must increase between calls: got 3 after 3"):
        tr.step(3)
    with pytest.raises(ValueError, match="min_count must be a positive int, got 0"):
        tr.frequent_outliers(min_count=0)
    scalar = PerExampleLossTracker(model, nn.CrossEntropyLoss(), x, y, k=1)
    with pytest.raises(ValueError, match="use reduction='none'"):
        scalar.step()


# ---------------------------------------------------------------------------------------- the split
def test_split_gradients_separates_planted_clusters_exactly():
    u = torch.randn(50, generator=gen(1))
    u = 3 * u / u.norm()
    common = torch.randn(50, generator=gen(2))  # a shared component: the raw sign of g . u would fail
    common = 4 * (common - (common @ u) / (u @ u) * u + 0.5 * u)
    noise = 0.3 * torch.randn(17, 50, generator=gen(3))
    g = torch.cat([u + common + noise[:12], -u + common + noise[12:]])  # unbalanced: 12 vs 5
    a, b, cos = split_gradients(g)
    groups = {tuple(sorted(a.tolist())), tuple(sorted(b.tolist()))}
    assert groups == {tuple(range(12)), tuple(range(12, 17))}
    assert -1.0 <= cos <= 1.0
    a2, b2, cos2 = split_gradients(torch.cat([u + noise[:12], -u + noise[12:]]))
    assert {tuple(a2.tolist()), tuple(b2.tolist())} == groups and cos2 < -0.9


def test_split_opposing_on_a_model_matches_closed_form_gradients():
    # linear regression: g_i = (w . x_i - y_i) x_i; two groups pull w along +e_0 and -e_0
    model = nn.Linear(3, 1, bias=False).to(D)
    _set_weight(model, torch.zeros(1, 3, dtype=D))
    base = torch.tensor([5.0, 0.0, 0.0], dtype=D)
    x = base + 0.1 * torch.randn(10, 3, generator=gen(1), dtype=D)
    y = torch.tensor([1.0] * 6 + [-1.0] * 4, dtype=D).unsqueeze(1)
    g = example_gradients(model, sq, x, y)
    assert torch.allclose(g, (x @ model.weight.T - y) * x, atol=1e-12)
    a, b, cos = split_opposing(model, sq, x, y)
    assert {tuple(sorted(a.tolist())), tuple(sorted(b.tolist()))} == {tuple(range(6)), tuple(range(6, 10))}
    assert cos < -0.99
    assert model.weight.grad is None


def test_split_errors():
    with pytest.raises(ValueError, match="grads needs at least 2 examples"):
        split_gradients(torch.ones(1, 3))
    with pytest.raises(ValueError, match="all per-example gradients are identical"):
        split_gradients(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"grads must be a 2-D \(examples, parameters\) matrix"):
        split_gradients(torch.ones(4))
    with pytest.raises(ValueError, match="grads must be finite"):
        split_gradients(torch.tensor([[1.0, math.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="x needs at least 2 examples to split"):
        split_opposing(nn.Linear(2, 1), sq, torch.ones(1, 2), torch.ones(1, 1))


# ---------------------------------------------------------------------------------------- anti-phase
def test_antiphase_score_known_cases():
    t = torch.arange(100, dtype=D)
    s = torch.sin(0.7 * t)
    assert antiphase_score(s, -s) == pytest.approx(-1.0)
    assert antiphase_score(1 + s, 2 + 3 * s) == pytest.approx(1.0)
    assert antiphase_score([1, 2, 1, 2, 1], [2, 1, 2, 1, 2]) == pytest.approx(-1.0)
    trend = antiphase_score(t + 0.5 * s, (-t - s).tolist())  # trends drop out of the differences' correlation
    assert trend == pytest.approx(-1.0)


def test_antiphase_score_errors():
    with pytest.raises(ValueError, match="same length, got 4 and 5"):
        antiphase_score([1, 2, 3, 5], [1, 2, 3, 4, 6])
    with pytest.raises(ValueError, match="series_a needs at least 3 values"):
        antiphase_score([1, 2], [1, 2])
    with pytest.raises(ValueError, match="series_b must be finite"):
        antiphase_score([1, 2, 4], [1, math.nan, 2])
    with pytest.raises(ValueError, match="series_a has constant first differences"):
        antiphase_score([1, 2, 3, 4], [1, 3, 2, 5])
    with pytest.raises(ValueError, match="series_a must be 1-D"):
        antiphase_score([[1, 2, 3]], [1, 2, 3])
    with pytest.raises(TypeError, match="series_a must be a 1-D sequence of numbers"):
        antiphase_score(["a", "b", "c"], [1, 2, 3])


# ---------------------------------------------------------------------------------------- data
def test_opposing_signal_data():
    ds = opposing_signal_data(n=101, d=5, amplitude=7.0, n_outliers=6, mu=0.5, seed=4)
    assert ds.x.shape == (101, 6) and ds.y.shape == (101,)
    assert int(ds.y.sum()) == 51
    assert bool((ds.y[ds.idx_a] == 1).all()) and bool((ds.y[ds.idx_b] == 0).all())
    assert len(set(ds.outliers.tolist())) == 12
    feat = torch.zeros(101)
    feat[ds.outliers] = 7.0
    assert torch.equal(ds.x[:, -1], feat)
    ctrl = ds.without_feature()
    assert bool((ctrl.x[:, -1] == 0).all()) and torch.equal(ctrl.x[:, :-1], ds.x[:, :-1])
    assert torch.equal(opposing_signal_data(n=101, d=5, seed=4).x[:, :5], opposing_signal_data(n=101, d=5, seed=4).x[:, :5])
    with pytest.raises(ValueError, match=r"n_outliers must be <= n // 2 = 5"):
        opposing_signal_data(n=10, n_outliers=6)
    with pytest.raises(ValueError, match="n must be >= 2"):
        opposing_signal_data(n=1)


# ---------------------------------------------------------------------------------------- the claim
def _seed(prec=0.4, anti=-0.9, eos=0.9, peak=36.0, ref_peak=15.0):
    return {"opposing": {"precision": prec, "antiphase": anti, "peak_over_eos": eos, "peak_sharpness": peak},
            "no_feature": {"precision": 0.04, "antiphase": -0.9, "peak_over_eos": ref_peak / 40,
                           "peak_sharpness": ref_peak}}


def test_claim_criterion_two_of_three_seeds_and_control():
    from gradkit.harness.claims.opposing_signals import SeedsWithSignature
    from gradkit.harness.suite import substitute

    crit = SeedsWithSignature()
    good, bad = _seed(), _seed(eos=0.3, peak=12.0)
    assert crit.evaluate([good, good, bad])[0]
    assert not crit.evaluate([good, bad, bad])[0]
    assert not crit.evaluate([_seed(prec=0.2)] * 3)[0]
    assert not crit.evaluate([_seed(anti=-0.4)] * 3)[0]
    assert not crit.evaluate([_seed(peak=20.0)] * 3)[0]                 # ratio 20 / 15 < 1.5
    assert not crit.evaluate([_seed(prec=math.nan)] * 3)[0]
    ctrl = substitute([good, good, good], {"opposing": "no_feature"})   # the control stands in: ratio 1
    assert not crit.evaluate(ctrl)[0]
    assert crit.evaluate([good])[0] and not crit.evaluate([bad])[0]


def test_claim_smoke_run(smoke_run):
    out = smoke_run("opposing-signals")
    assert out.info["checks"]["quadratic_rel_err"] < 0.01
    for arm in ("opposing", "no_feature"):
        m = out.metrics[arm]
        assert m["base_rate"] == pytest.approx(8 / 200)
        assert 0 <= m["precision"] <= 1 and m["peak_sharpness"] > 0
        assert out.info["arms"][arm]["pool_size"] == 8
    axes = out.info["curve_axes"]
    for name in ("sharpness_over_eos", "topk_precision", "train_loss"):
        assert len(axes[name]["x"]) == len(out.curves[name]["opposing"])


def test_benchmarks_registered_and_run():
    import gradkit.harness.benchmarks.opposing_signals  # noqa: F401  (registers on import)
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("opposing-signals-tracker-step")
    assert b.slug == "opposing-signals" and b.target == 2.0
    assert BENCHMARKS.get("opposing-signals-sharpness-every-50").target == 3.0
    r = b.run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(30, 4, generator=gen(1), dtype=D), torch.randn(30, 1, generator=gen(2), dtype=D)
    lam_cpu, v = hessian_top_eigenvalue(model, sq, x, y, iters=50, generator=gen(0))
    tr = PerExampleLossTracker(model, sq, x, y, k=3)
    tr.step()
    model.cuda()
    lam_gpu, v_gpu = hessian_top_eigenvalue(model, sq, x.cuda(), y.cuda(), iters=50, v0=v.cuda())
    assert v_gpu.is_cuda and abs(lam_gpu - lam_cpu) <= 1e-6 * abs(lam_cpu)
    tr_gpu = PerExampleLossTracker(model, sq, x.cuda(), y.cuda(), k=3)
    tr_gpu.step()
    assert torch.allclose(tr_gpu.last_losses.cpu(), tr.last_losses, atol=1e-10)
