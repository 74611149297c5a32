"""Tests of the shared gradient-inversion core (gradkit.privacy: matching, inversion, metrics).

Used by the gradient-leakage papers (dia, gifd, hyperfl): matching losses against naive references and
gradcheck (float64), TV, label inference, the metrics against hand computations, Hungarian matching,
the attacker's invariants and its clear errors on bad input.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.privacy import (
    PRESETS, GradientInversion, InversionPreset, LatentSpace, PixelSpace, SearchSpace, check_gradients,
    gradient_distance, infer_labels, match_order, model_gradients, mse, psnr, reconstruction_metrics, ssim,
    total_variation,
)


def _mlp(dtype=torch.float64, act=nn.Tanh, d_in=16, h=12, c=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, h), act(), nn.Linear(h, c)).to(dtype)


def _grads(shapes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


SHAPES = [(3, 4), (4,), (2, 2, 5)]


# ------------------------------------------------------------------------------------ matching losses
def naive_cosine(gs, ts):
    a = np.concatenate([g.detach().numpy().ravel() for g in gs])
    b = np.concatenate([t.detach().numpy().ravel() for t in ts])
    return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)


def naive_l2(gs, ts):
    return sum(float(((g.detach().numpy() - t.detach().numpy()) ** 2).sum()) for g, t in zip(gs, ts))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_and_l2_match_naive_reference(seed):
    gs, ts = _grads(SHAPES, seed), _grads(SHAPES, seed + 10)
    assert gradient_distance(gs, ts, "cosine").item() == pytest.approx(naive_cosine(gs, ts), rel=1e-12, abs=1e-12)
    assert gradient_distance(gs, ts, "l2").item() == pytest.approx(naive_l2(gs, ts), rel=1e-12)


def test_cosine_is_global_not_per_layer_mean():
    gs, ts = _grads(SHAPES, 0), _grads(SHAPES, 1)
    ts[0] = ts[0] * 100.0  # one dominant layer changes the global angle, not a per-layer average
    per_layer = np.mean([naive_cosine([g], [t]) for g, t in zip(gs, ts)])
    glob = gradient_distance(gs, ts).item()
    assert glob == pytest.approx(naive_cosine(gs, ts), abs=1e-12)
    assert abs(glob - per_layer) > 1e-3


def test_cosine_invariants():
    gs = _grads(SHAPES, 3)
    # 1 - ||g||^2 / (||g||^2 + 1e-8): zero up to the documented epsilon
    assert gradient_distance(gs, gs).item() == pytest.approx(0.0, abs=1e-8)
    assert gradient_distance(gs, [-g for g in gs]).item() == pytest.approx(2.0, abs=1e-8)
    assert gradient_distance([3.0 * g for g in gs], gs).item() == pytest.approx(0.0, abs=1e-8)  # scale-free
    assert gradient_distance(gs, gs, "l2").item() == 0.0


@pytest.mark.parametrize("cost", ["cosine", "l2"])
def test_gradcheck_gradient_distance(cost):
    gs = [g.requires_grad_(True) for g in _grads(SHAPES, 4)]
    ts = _grads(SHAPES, 5)
    assert torch.autograd.gradcheck(lambda *a: gradient_distance(list(a), ts, cost), tuple(gs))


@pytest.mark.parametrize("cost", ["cosine", "l2"])
def test_gradcheck_matching_loss_through_double_backward(cost):
    """d/dx of D(grad_w CE(f_w(x), y), G*) needs the double backward through the model (float64)."""
    model = _mlp()
    y = torch.tensor([1, 3])
    target = model_gradients(model, torch.randn(2, 16, dtype=torch.float64), y)
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)

    def f(x):
        return gradient_distance(model_gradients(model, x, y, create_graph=True), target, cost)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_model_gradients_matches_manual_autograd():
    model = _mlp()
    x, y = torch.randn(3, 16, dtype=torch.float64), torch.tensor([0, 1, 2])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    got = model_gradients(model, x, y)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    # a subset of parameters and a custom loss
    last = [model[3].weight]
    sub = model_gradients(model, x, y, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="sum"), params=last)
    assert torch.allclose(sub[0], 3 * ref[2])
    # unused parameters get zero gradients
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    z = model_gradients(model, x, y, params=[model[1].weight, extra])
    assert torch.equal(z[1], torch.zeros(2, dtype=torch.float64))


def test_check_gradients_bad_inputs():
    model = _mlp()
    params = list(model.parameters())
    good = [torch.zeros_like(p) for p in params]
    assert len(check_gradients(good, params)) == len(params)
    with pytest.raises(ValueError, match="one tensor per model parameter"):
        check_gradients(good[:-1], params)
    with pytest.raises(ValueError, match="shape"):
        check_gradients([good[0].T] + good[1:], params)
    bad = [g.clone() for g in good]
    bad[1][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        check_gradients(bad, params)
    with pytest.raises(TypeError, match="sequence"):
        check_gradients(good[0], params)
    with pytest.raises(ValueError, match="cost"):
        gradient_distance(good, good, "l1")
    with pytest.raises(ValueError, match="equal length"):
        gradient_distance(good, good[:-1])


# ------------------------------------------------------------------------------------ TV
def naive_tv(x: np.ndarray) -> float:
    h, w = x.shape[-2:]
    dv = [abs(x[..., i + 1, j] - x[..., i, j]) for i in range(h - 1) for j in range(w)]
    dh = [abs(x[..., i, j + 1] - x[..., i, j]) for i in range(h) for j in range(w - 1)]
    return float(np.mean(np.stack(dv))) + float(np.mean(np.stack(dh)))


def test_total_variation_matches_naive_and_constant_is_zero():
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert total_variation(x).item() == pytest.approx(naive_tv(x.numpy()), rel=1e-12)
    assert total_variation(torch.full((1, 1, 4, 4), 0.3)).item() == 0.0
    # a single row: only horizontal differences
    row = torch.tensor([[0.0, 1.0, 3.0]])
    assert total_variation(row).item() == pytest.approx(1.5)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(total_variation, (xg + 1e-3 * torch.arange(xg.numel(), dtype=xg.dtype)
                                                      .view_as(xg),))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        total_variation(torch.ones(5))


# ------------------------------------------------------------------------------------ label inference
@pytest.mark.parametrize("labels", [[3], [0, 2, 5], [6, 1]])
def test_infer_labels_recovers_distinct_labels_with_nonnegative_features(labels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 7))
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 10)
    g = model_gradients(model, x, y)
    got = infer_labels(g[-2], len(labels))  # last linear layer's weight gradient (classes x features)
    assert sorted(got.tolist()) == sorted(labels)


def test_infer_labels_bad_inputs():
    with pytest.raises(ValueError, match="last_weight_grad"):
        infer_labels(torch.zeros(7), 1)
    with pytest.raises(ValueError, match="n must be"):
        infer_labels(torch.zeros(7, 3), 0)
    with pytest.raises(ValueError, match="n must be"):
        infer_labels(torch.zeros(7, 3), 8)


# ------------------------------------------------------------------------------------ metrics
def test_mse_and_psnr_hand_values():
    x = torch.zeros(2, 1, 2, 2)
    xh = x.clone()
    xh[0] += 0.1  # mse 0.01 -> 20 dB
    xh[1, 0, 0, 0] = 1.0  # mse 0.25 -> 6.0206 dB
    assert mse(x, xh).tolist() == pytest.approx([0.01, 0.25], rel=1e-6)
    assert psnr(x, xh).tolist() == pytest.approx([20.0, 10 * math.log10(4.0)], rel=1e-5)
    assert psnr(x, xh, data_range=2.0).tolist() == pytest.approx([20.0 + 20 * math.log10(2), 10 * math.log10(16)],
                                                                 rel=1e-5)
    assert psnr(x, x).tolist() == pytest.approx([100.0, 100.0])  # identical images: the documented cap


def naive_ssim(a: np.ndarray, b: np.ndarray, r: float = 1.0, size: int = 7, sigma: float = 1.5) -> float:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    vals = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
            cab = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identity_and_naive_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 9, 10, generator=g, dtype=torch.float64)
    xh = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-12)
    got = ssim(x, xh)
    for i in range(3):
        assert got[i].item() == pytest.approx(naive_ssim(x[i, 0].numpy(), xh[i, 0].numpy(), size=9), abs=1e-10)
    assert torch.allclose(ssim(x, xh), ssim(xh, x))  # symmetric
    assert torch.allclose(ssim(x[:, 0], xh[:, 0]), got)  # (N, H, W) accepted
    assert bool((got < 1).all())


def test_match_order_recovers_a_permutation_and_metrics_use_it():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=g)
    perm = [2, 0, 3, 1]
    xh = x[perm] + 0.01 * torch.randn(4, 1, 6, 6, generator=g)
    order = match_order(x, xh)
    assert all(perm[order[i]] == i for i in range(4))  # xh[order[i]] is the reconstruction of x[i]
    m = reconstruction_metrics(x, xh)
    assert m["order"] == order
    assert m["mse"] == pytest.approx(float(mse(x, xh[order]).mean()), rel=1e-6)
    assert len(m["per_image"]["psnr"]) == 4 and m["mse"] < 2e-4
    unmatched = reconstruction_metrics(x, xh, match=False)
    assert unmatched["order"] == [0, 1, 2, 3] and unmatched["mse"] > 100 * m["mse"]
    flat = reconstruction_metrics(x.flatten(1), xh.flatten(1))
    assert math.isnan(flat["ssim"]) and flat["order"] == order


def test_metrics_bad_inputs():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        mse(x, x[:1])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, data_range=float("nan"))
    with pytest.raises(TypeError):
        mse(x.numpy(), x)


# ------------------------------------------------------------------------------------ the attacker
def _victim(seed=0, dtype=torch.float32):
    model = _mlp(dtype=dtype, act=nn.Sigmoid, d_in=16, h=24, c=4, seed=seed)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    y = torch.tensor([2])
    return model, x, y, model_gradients(model, x, y)


def test_attack_recovers_an_image_and_keeps_the_model_untouched():
    model, x, y, target = _victim()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    preset = InversionPreset(name="t", tv=0.0, iters=200, lr=0.1)
    res = GradientInversion(model, preset).run(target, y, PixelSpace(x.shape, generator=torch.Generator()
                                                                      .manual_seed(1)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # mode restored
    assert res.match_loss == min(res.history) and res.history[res.best_iter] == res.match_loss
    assert res.iterations == 200 and len(res.history) == 201
    assert float(res.x.min()) >= 0.0 and float(res.x.max()) <= 1.0  # PixelSpace clamp
    # the returned iterate is the one scored
    att = GradientInversion(model, preset)
    model.eval()
    assert att.matching_loss(res.x, y, target).item() == pytest.approx(res.match_loss, abs=1e-6)
    assert res.history[0] > 10 * res.match_loss
    assert float(mse(x, res.x)[0]) < float(mse(x, torch.rand_like(x))[0])


def test_true_input_has_zero_matching_loss_and_early_stop():
    model, x, y, target = _victim()
    att = GradientInversion(model, InversionPreset(name="t", iters=50, early_stop=1e-3))
    assert att.matching_loss(x, y, target).item() == pytest.approx(0.0, abs=1e-6)
    res = att.run(target, y, PixelSpace(x.shape, init=x.clone()))
    assert res.iterations == 0 and res.match_loss < 1e-3 and torch.equal(res.x, x)


def test_attack_is_deterministic_given_the_generator():
    model, x, y, target = _victim()
    preset = InversionPreset(name="t", iters=20)
    a = GradientInversion(model, preset).run(target, y, PixelSpace(x.shape, generator=torch.Generator().manual_seed(3)))
    b = GradientInversion(model, preset).run(target, y, PixelSpace(x.shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a.x, b.x) and a.history == b.history


def test_attack_bad_inputs():
    model, x, y, target = _victim()
    att = GradientInversion(model, InversionPreset(name="t", iters=2))
    space = PixelSpace(x.shape)
    with pytest.raises(ValueError, match="one tensor per model parameter"):
        att.run(target[:-1], y, space)
    with pytest.raises(ValueError, match="shape"):
        att.run([target[0].T] + target[1:], y, space)
    with pytest.raises(ValueError, match="labels were given"):
        att.run(target, torch.tensor([1, 2]), space)
    with pytest.raises(ValueError, match="labels must be"):
        att.run(target, torch.tensor([1.0]), space)
    small = GradientInversion(model, InversionPreset(name="t", iters=2, max_batch=1))
    with pytest.raises(ValueError, match="at most 1"):
        small.run(target, torch.tensor([1, 2]), PixelSpace((2, 1, 4, 4)))
    with pytest.raises(KeyError, match="unknown inversion preset"):
        GradientInversion(model, "no-such-preset")
    with pytest.raises(TypeError, match="SearchSpace"):
        att.run(target, y, x)
    with pytest.raises(TypeError, match="nn.Module"):
        GradientInversion(lambda t: t)


@pytest.mark.parametrize("kw, match", [
    (dict(cost="l1"), "cost"), (dict(schedule="steps"), "schedule"), (dict(model_mode="test"), "model_mode"),
    (dict(tv=-1.0), "tv"), (dict(lr=0.0), "lr"), (dict(iters=0), "iters"), (dict(max_batch=0), "max_batch"),
    (dict(early_stop=float("nan")), "early_stop"),
])
def test_preset_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        InversionPreset(name="bad", **kw)


def test_builtin_ig_preset_and_schedule():
    ig = PRESETS.get("ig")
    assert ig.cost == "cosine" and ig.signed and ig.schedule == "multistep"
    model, x, y, target = _victim()
    att = GradientInversion(model, replace(ig, iters=16))
    sched = att._scheduler(torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0))
    assert sorted(sched.milestones) == [6, 10, 14]


def test_spaces():
    with pytest.raises(ValueError, match="shape"):
        PixelSpace((4,))
    with pytest.raises(ValueError, match="init has shape"):
        PixelSpace((1, 2), init=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="init must be"):
        PixelSpace((1, 2), init="zeros")
    with pytest.raises(ValueError, match="clamp"):
        PixelSpace((1, 2), clamp=(1.0, 0.0))
    s = PixelSpace((2, 3), init="rand", generator=torch.Generator().manual_seed(0))
    assert s.signed_parameters() == s.parameters() and s.render() is s.x
    z0 = torch.randn(2, 5)
    lat = LatentSpace(lambda z: z @ torch.ones(5, 4), z0)
    with torch.no_grad():
        lat.z.mul_(3.0)
        lat.project()
    assert torch.allclose(lat.z.norm(dim=1), z0.norm(dim=1), rtol=1e-6)
    assert lat.signed_parameters() == [] and lat.render().shape == (2, 4)
    assert isinstance(SearchSpace().regularizer(), float)


def test_patience_stops_a_run_without_progress():
    model, x, y, target = _victim()
    # lr far below float resolution: the iterate never moves, so no iteration beats the first one
    preset = InversionPreset(name="t", iters=100, lr=1e-30, signed=False, patience=3)
    res = GradientInversion(model, preset).run(target, y, PixelSpace(x.shape, init="rand",
                                                                     generator=torch.Generator().manual_seed(0)))
    assert res.best_iter == 0 and res.iterations == 3 and len(res.history) == 4


def test_plateau_schedule_cuts_the_lr_after_its_patience():
    model, _, _, _ = _victim()
    att = GradientInversion(model, InversionPreset(name="t", schedule="plateau", plateau_patience=2))
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = att._scheduler(opt)
    for loss in (1.0, 1.0, 1.0, 1.0):  # no improvement after the first
        sched.step(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert PRESETS.get("dia").schedule == "plateau" and PRESETS.get("dia").patience == 4000


@pytest.mark.parametrize("kw", [dict(patience=-1), dict(plateau_patience=1.5), dict(schedule="linear")])
def test_preset_rejects_bad_schedule_settings(kw):
    with pytest.raises(ValueError):
        InversionPreset(name="t", **kw)
