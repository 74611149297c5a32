"""agm: grad_scale, Shapley attribution, scores, controller, fused output, AGM wrapper, data, claim, docs."""
from __future__ import annotations

import copy
import importlib
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.functional.scale import GradScale, ModulatedFusion, grad_scale, modulated_fusion
from gradkit.nn.modulation import (AGM, MAX_MODALITIES, AGMController, FusionMLP, GradientScale, modality_scores,
                                   shapley_outputs, shapley_weights, subset_outputs)

REPO = Path(__file__).resolve().parents[1]


class ThreeWay(nn.Module):
    """A non-additive 3-input model (interactions between modalities), float64-friendly."""

    def __init__(self, dims=(3, 4, 5), classes=4, bn=False, dropout=0.0):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(d, 6) for d in dims)
        self.bn = nn.BatchNorm1d(6 * len(dims)) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(6 * len(dims), 8), nn.Tanh(), nn.Linear(8, classes))

    def forward(self, *xs):
        h = torch.cat([torch.tanh(e(x)) for e, x in zip(self.enc, xs)], dim=1)
        return self.head(self.drop(self.bn(h)))


def _inputs(dims, n=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype) for d in dims]


def naive_shapley(f, xs):
    """Average marginal contribution over all M! orderings, f(empty) := 0 (the definition)."""
    m_ = len(xs)
    cache = {}

    def value(s):
        if not s:
            return 0.0
        if s not in cache:
            cache[s] = f(*[x if i in s else torch.zeros_like(x) for i, x in enumerate(xs)])
        return cache[s]

    phis = [0.0] * m_
    perms = list(itertools.permutations(range(m_)))
    for order in perms:
        seen = frozenset()
        for i in order:
            phis[i] = phis[i] + (value(seen | {i}) - value(seen))
            seen = seen | {i}
    return [p / len(perms) for p in phis]


# ---------------------------------------------------------------------------------------- grad_scale
@pytest.mark.parametrize("k", [0.0, 0.3, 1.0, 2.5, -1.0])
def test_grad_scale_identity_forward_and_k_times_backward(k):
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_scale(x, k)
    assert torch.equal(y, x) and y.data_ptr() == x.data_ptr()
    g = torch.randn(5, 3)
    y.backward(g)
    assert torch.equal(x.grad, g * k)


def test_grad_scale_k1_is_bit_for_bit_and_tensor_k():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    ref = torch.autograd.grad(lin(x).sin().sum(), lin.weight)[0]
    got = torch.autograd.grad(grad_scale(lin(x), 1.0).sin().sum(), lin.weight)[0]
    assert torch.equal(ref, got)
    k = torch.tensor(0.25)
    x2 = torch.ones(3, requires_grad=True)
    y = grad_scale(x2, k)
    k.fill_(9.0)  # the value at call time is used
    y.sum().backward()
    assert torch.equal(x2.grad, torch.full((3,), 0.25))


def test_grad_scale_gradcheck_float64():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    # k = 1: a true identity, so torch's gradcheck applies as is
    assert torch.autograd.gradcheck(lambda t: GradScale.apply(t, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: grad_scale(t, torch.tensor(1.0, dtype=torch.float64)) ** 3, (x,))
    assert torch.autograd.gradgradcheck(lambda t: grad_scale(t, 1.0) ** 2, (x,))
    # other k: the backward is by design not the derivative of the forward; the Jacobian autograd
    # builds must be that of x -> k x
    for k in (0.37, 3.0):
        jac = torch.autograd.functional.jacobian(lambda t: grad_scale(t, k), x)
        ref = torch.autograd.functional.jacobian(lambda t: k * t, x)
        torch.testing.assert_close(jac, ref, rtol=0, atol=0)


def test_grad_scale_module_and_errors():
    gs = GradientScale(2.0)
    gs.k = 0.5
    x = torch.ones(2, requires_grad=True)
    gs(x).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 0.5)) and "k=0.5" in repr(gs)
    with pytest.raises(ValueError, match="k must be finite"):
        gs.k = float("nan")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        grad_scale([1.0, 2.0], 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        grad_scale(torch.ones(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="k must be finite"):
        grad_scale(torch.ones(2), float("inf"))
    with pytest.raises(ValueError, match="k must be a float or a 0-dim tensor"):
        grad_scale(torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="k must be a real number"):
        grad_scale(torch.ones(2), "2")


# ------------------------------------------------------------------------------------ attribution
def test_shapley_weights_two_modalities_and_columns():
    w = shapley_weights(2)
    torch.testing.assert_close(w, torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]], dtype=torch.float64))
    for m in range(1, 6):
        col = shapley_weights(m).sum(0)
        expect = torch.zeros(2**m - 1, dtype=torch.float64)
        expect[-1] = 1.0
        torch.testing.assert_close(col, expect, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dims", [(3, 4), (3, 4, 5), (2, 3, 4, 2)])
def test_shapley_outputs_match_the_permutation_definition(dims):
    torch.manual_seed(1)
    model = ThreeWay(dims).double()
    xs = _inputs(dims, dtype=torch.float64)
    phis = shapley_outputs(model, xs)
    ref = naive_shapley(model, xs)
    for p, r in zip(phis, ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    # efficiency: sum_m phi_m = f(all)
    torch.testing.assert_close(sum(phis), model(*xs), rtol=0, atol=1e-12)


def test_efficiency_float32_within_spec_tolerance():
    torch.manual_seed(2)
    for dims in ((10, 64), (3, 4, 5)):
        model = ThreeWay(dims)
        xs = _inputs(dims, n=50)
        assert (sum(shapley_outputs(model, xs)) - model(*xs)).abs().max() <= 1e-5


def test_spec_formulas_for_two_and_three_modalities():
    torch.manual_seed(3)
    model = ThreeWay((3, 4)).double()
    a, v = _inputs((3, 4), dtype=torch.float64)
    z = torch.zeros_like
    f = model
    phi_a, phi_v = shapley_outputs(model, [a, v])
    torch.testing.assert_close(phi_a, 0.5 * ((f(a, v) - f(z(a), v)) + f(a, z(v))))
    torch.testing.assert_close(phi_v, 0.5 * ((f(a, v) - f(a, z(v))) + f(z(a), v)))
    model3 = ThreeWay((3, 4, 5)).double()
    a, v, t = _inputs((3, 4, 5), dtype=torch.float64)
    g = model3
    phi_t = shapley_outputs(model3, [a, v, t])[2]
    ref = ((g(a, v, t) - g(a, v, z(t)) + g(z(a), z(v), t)) / 3
           + (g(a, z(v), t) - g(a, z(v), z(t)) + g(z(a), v, t) - g(z(a), v, z(t))) / 6)
    torch.testing.assert_close(phi_t, ref)


def test_additive_model_attributes_each_branch():
    # f = A a + V v (no biases, so padding a branch removes it): phi_m is exactly that branch's term
    A, V = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    a, v = _inputs((3, 5), dtype=torch.float64)
    phi_a, phi_v = shapley_outputs(lambda a, v: a @ A + v @ V, [a, v])
    torch.testing.assert_close(phi_a, a @ A)
    torch.testing.assert_close(phi_v, v @ V)


def test_padded_passes_leave_batchnorm_stats_and_dropout_alone():
    torch.manual_seed(4)
    model = ThreeWay((3, 4), bn=True, dropout=0.5)
    model.head[1].eval()  # a submodule in its own mode must get it back
    ref = copy.deepcopy(model)
    xs = _inputs((3, 4), n=16)
    torch.manual_seed(9)
    outs = subset_outputs(model, xs)
    torch.manual_seed(9)
    full_ref = ref(*xs)  # one train-mode pass: same dropout mask, same BN update
    torch.testing.assert_close(outs[-1], full_ref, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=0, atol=0)
    assert int(model.bn.num_batches_tracked) == 1
    assert model.training and model.bn.training and model.drop.training and not model.head[1].training
    # padded passes ran in eval mode (deterministic, running stats)
    ev = copy.deepcopy(model).eval()
    torch.testing.assert_close(outs[0], ev(xs[0], torch.zeros_like(xs[1])))
    torch.testing.assert_close(outs[1], ev(torch.zeros_like(xs[0]), xs[1]))
    # gradients flow through every pass
    assert all(o.requires_grad for o in outs)


def test_eval_padded_false_uses_train_mode():
    torch.manual_seed(5)
    model = ThreeWay((3, 4), bn=True)
    subset_outputs(model, _inputs((3, 4), n=16), eval_padded=False)
    assert int(model.bn.num_batches_tracked) == 3


def test_batch_padded_and_custom_pad():
    torch.manual_seed(6)
    model = ThreeWay((3, 4, 5))
    xs = _inputs((3, 4, 5), n=9)
    for p, q in zip(shapley_outputs(model, xs), shapley_outputs(model, xs, batch_padded=True)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    outs = subset_outputs(model, xs, pad=lambda x: torch.ones_like(x))
    torch.testing.assert_close(outs[0], model(xs[0], torch.ones_like(xs[1]), torch.ones_like(xs[2])))


def test_attribution_errors():
    model = ThreeWay((3, 4))
    a, v = _inputs((3, 4))
    with pytest.raises(ValueError, match="empty modality list"):
        shapley_outputs(model, [])
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        shapley_outputs(model, a)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a torch.Tensor"):
        shapley_outputs(model, [a, 3.0])
    with pytest.raises(ValueError, match=r"inputs\[1\] has batch size 6, expected 7"):
        shapley_outputs(model, [a, v[:6]])
    with pytest.raises(ValueError, match="at most 8 modalities"):
        shapley_outputs(model, [a] * (MAX_MODALITIES + 1))
    with pytest.raises(ValueError, match="pad must return a tensor shaped like its input"):
        shapley_outputs(model, [a, v], pad=lambda x: x[:1])
    with pytest.raises(TypeError, match="pad must be a callable"):
        shapley_outputs(model, [a, v], pad=0.0)
    with pytest.raises(TypeError, match="model must return a tensor"):
        shapley_outputs(lambda a, v: (a, v), [a, v])
    with pytest.raises(ValueError, match="model output must have shape"):
        shapley_outputs(lambda a, v: a.sum(), [a, v])
    with pytest.raises(ValueError, match="num_modalities must be an int in"):
        shapley_weights(0)


# ------------------------------------------------------------------------------------------ scores
def official_scores(out, label):
    """The official code's per-sample loop (run/AVMNIST_main.py)."""
    sm = torch.softmax(out, dim=1)
    s = 0.0
    for k in range(out.size(0)):
        p = sm[k][label[k]]
        s += -math.log(1e-8) if p < 1e-8 else -torch.log(p).item()
    return s / out.size(0)


def test_modality_scores_match_official_loop_with_clamp():
    g = torch.Generator().manual_seed(0)
    phi_a = torch.randn(12, 5, generator=g, dtype=torch.float64)
    phi_v = torch.randn(12, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (12,), generator=g)
    phi_v[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    phi_v[0, (y[0] + 1) % 5] = 60.0  # p_y ~ e^-60 < 1e-8: clamped
    scores = modality_scores([phi_a, phi_v.requires_grad_()], y)
    assert scores == pytest.approx([official_scores(phi_a, y), official_scores(phi_v.detach(), y)], rel=1e-12)
    assert all(isinstance(s, float) for s in scores)


def test_modality_scores_errors():
    p = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="non-empty list"):
        modality_scores([], y)
    with pytest.raises(ValueError, match=r"phis\[1\] has shape"):
        modality_scores([p, p[:2]], y)
    with pytest.raises(ValueError, match="1-D tensor of 4 class indices"):
        modality_scores([p, p], y[:3])
    with pytest.raises(TypeError, match="integer class indices"):
        modality_scores([p, p], y.float())
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\], expected \[0, 2\]"):
        modality_scores([p, p], torch.tensor([0, 1, 3, 0]))
    bad = p.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="output of modality 1 is not finite"):
        modality_scores([p, bad], y)
    with pytest.raises(ValueError, match="min_prob must be in"):
        modality_scores([p, p], y, min_prob=0.0)


# -------------------------------------------------------------------------------------- controller
def official_two(scores_seq, alpha, clamp=None):
    """The official 2-modality loop: ratios, coefficients, then the cumulative running means."""
    ta = tv = 0.0
    out = []
    for it, (sa, sv) in enumerate(scores_seq):
        mean = (sa + sv) / 2
        ra, rv = math.exp((mean - sa) * 2), math.exp((mean - sv) * 2)
        om = (ta + tv) / 2
        ora, orv = math.exp((om - ta) * 2), math.exp((om - tv) * 2)
        da, dv = ora - ra, orv - rv
        if clamp is not None:
            da, dv = min(da, clamp), min(dv, clamp)
        out.append((math.exp(alpha * da), math.exp(alpha * dv)))
        ta = ta * it / (it + 1) + sa / (it + 1)
        tv = tv * it / (it + 1) + sv / (it + 1)
    return out, (ta, tv)


def official_three(scores_seq, alpha, clamp):
    """The official 3-modality loop (run/URFunny_main.py): factor 3/2, clamp 7."""
    t = [0.0, 0.0, 0.0]
    out = []
    for it, s in enumerate(scores_seq):
        mean, om = sum(s) / 3, sum(t) / 3
        r = [math.exp((mean - x) * 3 / 2) for x in s]
        rb = [math.exp((om - x) * 3 / 2) for x in t]
        out.append(tuple(math.exp(alpha * min(b - a, clamp)) for a, b in zip(r, rb)))
        t = [x * it / (it + 1) + v / (it + 1) for x, v in zip(t, s)]
    return out


def test_controller_matches_official_two_modality_loop():
    g = torch.Generator().manual_seed(0)
    seq = [tuple(v) for v in (torch.rand(40, 2, generator=g, dtype=torch.float64) * 3).tolist()]
    for alpha, clamp in ((1.0, None), (2.5, None), (1.0, 10.0), (3.0, 0.2)):
        ctrl = AGMController(2, alpha=alpha, clamp=clamp)
        got = [tuple(ctrl.coefficients(s)) for s in seq]
        ref, means = official_two(seq, alpha, clamp)
        for a, b in zip(got, ref):
            assert a == pytest.approx(b, rel=1e-12)
        assert ctrl.running_means == pytest.approx(list(means), rel=1e-12) and ctrl.steps == 40
    # M = 2: r_m = exp(s_other - s_m)
    assert AGMController(2).ratios([0.3, 1.1]) == pytest.approx([math.exp(0.8), math.exp(-0.8)])


def test_controller_matches_official_three_modality_loop():
    g = torch.Generator().manual_seed(1)
    seq = [tuple(v) for v in (torch.rand(30, 3, generator=g, dtype=torch.float64) * 2).tolist()]
    ctrl = AGMController(3, alpha=1.5, clamp=7.0)
    for a, b in zip([tuple(ctrl.coefficients(s)) for s in seq], official_three(seq, 1.5, 7.0)):
        assert a == pytest.approx(b, rel=1e-12)


def test_controller_invariants():
    ctrl = AGMController(2, alpha=1.0)
    assert ctrl.coefficients([0.7, 0.7]) == [1.0, 1.0]  # first step: rb = 1 and equal scores: r = 1
    ctrl = AGMController(2, alpha=2.0)
    for _ in range(3):
        ctrl.coefficients([0.4, 0.9])
    # scores equal to the running means: r = rb, k = 1
    k = ctrl.coefficients(list(ctrl.running_means), update=False)
    assert k == pytest.approx([1.0, 1.0], abs=1e-15) and all(math.isfinite(x) for x in k)
    # a modality doing better than its average relative to the others is slowed, the other boosted
    k_a, k_v = ctrl.coefficients([0.2, 1.2])
    assert k_a < 1.0 < k_v
    # coefficients come before the update: the first call saw running means of 0
    c2 = AGMController(2)
    k0 = c2.coefficients([0.5, 1.5])
    assert k0 == pytest.approx([math.exp(1 - math.exp(1.0)), math.exp(1 - math.exp(-1.0))])
    assert c2.running_means == [0.5, 1.5]
    # the clamp bounds every coefficient by exp(alpha * clamp)
    c3 = AGMController(2, alpha=1.0, clamp=0.5)
    c3.coefficients([0.0, 10.0])
    assert max(c3.coefficients([10.0, 0.0])) <= math.exp(0.5) + 1e-12


def test_controller_state_and_reset():
    a = AGMController(3, alpha=0.7, clamp=7.0)
    for s in ([0.1, 0.5, 0.9], [0.3, 0.2, 1.0]):
        a.coefficients(s)
    b = AGMController(3)
    b.load_state_dict(a.state_dict())
    assert b.coefficients([0.5, 0.5, 0.1]) == a.coefficients([0.5, 0.5, 0.1])
    a.reset()
    assert a.running_means == [0.0, 0.0, 0.0] and a.steps == 0
    with pytest.raises(ValueError, match="state is for 3 modalities"):
        AGMController(2).load_state_dict(b.state_dict())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_modalities=1), ValueError, r"num_modalities must be an int in \[2, 8\], got 1"),
    (dict(num_modalities=True), TypeError, "num_modalities must be an int"),
    (dict(num_modalities=2, alpha=-1.0), ValueError, "alpha must be finite and >= 0"),
    (dict(num_modalities=2, alpha=float("nan")), ValueError, "alpha must be finite"),
    (dict(num_modalities=2, clamp=float("inf")), ValueError, "clamp must be finite"),
])
def test_controller_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        AGMController(**kw)


def test_controller_bad_scores_and_overflow():
    ctrl = AGMController(2)
    with pytest.raises(ValueError, match="scores must hold 2 values"):
        ctrl.coefficients([0.1])
    with pytest.raises(ValueError, match=r"scores\[1\] must be finite"):
        ctrl.coefficients([0.1, float("nan")])
    with pytest.raises(TypeError, match="scores must be a list"):
        ctrl.coefficients(torch.tensor([0.1, 0.2]))
    c = AGMController(2, alpha=1.0, clamp=None)
    c.coefficients([0.0, 18.0])
    with pytest.raises(ValueError, match="overflows.*set clamp"):
        c.coefficients([18.0, 0.0])
    assert c.steps == 1  # a failed call changes nothing


# ----------------------------------------------------------------------------------- fused output
def test_modulated_fusion_forward_exact_and_backward_scaled():
    g = torch.Generator().manual_seed(0)
    p1, p2 = (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    full = (p1 + p2).detach()
    out = modulated_fusion(full, [p1, p2], [0.5, 2.0])
    assert torch.equal(out, full)
    gout = torch.randn(4, 3, dtype=torch.float64)
    out.backward(gout)
    assert torch.equal(p1.grad, 0.5 * gout) and torch.equal(p2.grad, 2.0 * gout)


def test_modulated_fusion_gradcheck_float64():
    ps = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    # with every k = 1 and full = sum(phis) the backward is the true derivative of the forward
    fn = lambda *p: ModulatedFusion.apply(sum(p).detach(), (1.0, 1.0, 1.0), *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(ps))
    # other k: the Jacobian equals that of sum_m k_m phi_m
    ks = (0.3, 1.7, 1.0)
    jac = torch.autograd.functional.jacobian(lambda *p: modulated_fusion(sum(p).detach(), list(p), ks), tuple(ps))
    ref = torch.autograd.functional.jacobian(lambda *p: sum(k * q for k, q in zip(ks, p)), tuple(ps))
    for a, b in zip(jac, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_modulated_fusion_errors():
    p = torch.randn(2, 3)
    with pytest.raises(ValueError, match="coefficients must be a list of 2"):
        modulated_fusion(p, [p, p], [1.0])
    with pytest.raises(ValueError, match=r"phis\[1\] has shape"):
        modulated_fusion(p, [p, p[:1]], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"coefficients\[0\] must be finite"):
        modulated_fusion(p, [p, p], [float("nan"), 1.0])
    with pytest.raises(ValueError, match="non-empty list"):
        modulated_fusion(p, [], [])


# ------------------------------------------------------------------------------------ AGM wrapper
def _agm_pair(enabled=True, alpha=1.0, bn=False, dims=(3, 4)):
    torch.manual_seed(7)
    net = ThreeWay(dims, bn=bn, dropout=0.2 if bn else 0.0)
    return net, AGM(copy.deepcopy(net), num_modalities=len(dims), alpha=alpha, enabled=enabled)


def test_agm_disabled_is_bit_identical_to_joint_training():
    net, agm = _agm_pair(enabled=False, bn=True)
    opt_a = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(agm.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        xs = _inputs((3, 4), n=16, seed=step)
        y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(step))
        for model, opt, kw in ((net, opt_a, {}), (agm, opt_b, {"target": y})):
            torch.manual_seed(100 + step)  # same dropout mask in both full passes
            opt.zero_grad()
            F.cross_entropy(model(*xs, **kw), y).backward()
            opt.step()
        for (n, p), q in zip(net.named_parameters(), agm.model.parameters()):
            assert torch.equal(p, q), n
        assert torch.equal(net.bn.running_mean, agm.model.bn.running_mean)
    assert agm.last_coefficients == [1.0, 1.0] and agm.controller.steps == 3  # still scoring


def test_agm_gradients_match_naive_hook_reference():
    # reference: the paper's usage, out = sum_m grad_scale(phi_m, k_m), with the official order
    # (scores of this step, coefficients, then running means)
    net, agm = _agm_pair(alpha=2.0, dims=(3, 4, 5))
    ctrl = AGMController(3, alpha=2.0)
    for step in range(3):
        xs = _inputs((3, 4, 5), n=10, seed=step)
        y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(step))
        net.zero_grad()
        phis = shapley_outputs(net, xs)
        k = ctrl.coefficients(modality_scores(phis, y))
        F.cross_entropy(sum(grad_scale(p, km) for p, km in zip(phis, k)), y).backward()
        agm.zero_grad()
        F.cross_entropy(agm(*xs, target=y), y).backward()
        assert agm.last_coefficients == pytest.approx(k, rel=1e-6)
        assert any(abs(x - 1) > 1e-3 for x in k)
        for (n, p), q in zip(net.named_parameters(), agm.model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_agm_two_modality_gradient_mixing():
    # gradient into f(a,v): (k_a + k_v)/2 g; into f(a): (k_a - k_v)/2 g; into f(v): (k_v - k_a)/2 g
    outs = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]  # f(a), f(v), f(a,v)
    phi_a = 0.5 * (outs[2] - outs[1] + outs[0])
    phi_v = 0.5 * (outs[2] - outs[0] + outs[1])
    ka, kv = 0.4, 1.9
    g = torch.randn(4, 3, dtype=torch.float64)
    modulated_fusion(outs[2].detach(), [phi_a, phi_v], [ka, kv]).backward(g)
    torch.testing.assert_close(outs[2].grad, 0.5 * (ka + kv) * g)
    torch.testing.assert_close(outs[0].grad, 0.5 * (ka - kv) * g)
    torch.testing.assert_close(outs[1].grad, 0.5 * (kv - ka) * g)


def test_agm_modes_state_and_repr():
    net, agm = _agm_pair()
    xs = _inputs((3, 4))
    y = torch.randint(0, 4, (7,))
    torch.testing.assert_close(agm(*xs), net(*xs))                 # no target: one plain pass
    agm(*xs, target=y)
    assert agm.controller.steps == 1 and len(agm.last_phis) == 2 and not agm.last_phis[0].requires_grad
    agm.eval()
    agm(*xs, target=y)
    with torch.no_grad():
        agm.train()(*xs, target=y)
    assert agm.controller.steps == 1                               # eval / no_grad: no scoring
    sd = agm.state_dict()
    other = AGM(copy.deepcopy(net), 2)
    other.load_state_dict(sd)
    assert other.controller.running_means == agm.controller.running_means and other.controller.steps == 1
    assert "alpha=1" in repr(agm) and "num_modalities=2" in repr(agm)
    assert sum(agm.attribute(*xs)).shape == (7, 4)


def test_agm_bad_input():
    net = ThreeWay((3, 4))
    xs = _inputs((3, 4))
    y = torch.randint(0, 4, (7,))
    agm = AGM(net, 2)
    with pytest.raises(ValueError, match="expected 2 modality inputs, got 1"):
        agm(xs[0], target=y)
    with pytest.raises(ValueError, match="empty modality list"):
        agm(target=y)
    with pytest.raises(ValueError, match="1-D tensor of 7 class indices"):
        agm(*xs, target=y[:3])
    bad = [xs[0].clone(), xs[1]]
    bad[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"inputs\[0\] holds non-finite values"):
        agm(*bad, target=y)
    bad[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        agm(*bad, target=y)
    assert agm.controller.steps == 0
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        AGM(lambda a, v: a, 2)
    with pytest.raises(ValueError, match="num_modalities must be an int in"):
        AGM(net, 1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        AGM(net, 2, alpha=float("nan"))
    with pytest.raises(TypeError, match="enabled must be a bool"):
        AGM(net, 2, enabled=1)
    with pytest.raises(ValueError, match="min_prob must be in"):
        AGM(net, 2, min_prob=2.0)
    three_d = AGM(_Reshape(), 2)
    with pytest.raises(ValueError, match=r"\(N, C\) logits"):
        three_d(torch.randn(4, 6), torch.randn(4, 6), target=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_agm_other_dtypes(dtype):
    torch.manual_seed(8)
    net = FusionMLP([3, 4], [5, 6], 4).to(dtype)
    agm = AGM(net, 2, alpha=2.0)
    xs = [x.to(dtype) for x in _inputs((3, 4), n=16)]
    y = torch.randint(0, 4, (16,))
    F.cross_entropy(agm(*xs, target=y).float(), y).backward()
    assert all(math.isfinite(s) for s in agm.last_scores)
    assert all(p.grad.dtype == dtype and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


class _Reshape(nn.Module):
    def forward(self, a, v):
        return (a + v).view(4, 2, 3)


def test_fusion_mlp():
    a, v = torch.randn(5, 10), torch.randn(5, 64)
    for fusion in ("concat", "sum"):
        net = FusionMLP([10, 64], [16, 64], 10, fusion=fusion)
        assert net(a, v).shape == (5, 10) and len(net.final_weights()) == (1 if fusion == "concat" else 2)
    with pytest.raises(ValueError, match="fusion must be 'concat' or 'sum'"):
        FusionMLP([10], [16], 10, fusion="late")
    with pytest.raises(ValueError, match="one entry per modality"):
        FusionMLP([10, 64], [16], 10)
    with pytest.raises(ValueError, match="in_dims must be a non-empty list"):
        FusionMLP([], [], 10)
    with pytest.raises(ValueError, match="expected 2 modality inputs"):
        FusionMLP([10, 64], [16, 64], 10)(a)


# -------------------------------------------------------------------------------------------- data
def test_shortcut_digits():
    from gradkit.data.multimodal import load_shortcut_digits

    d = load_shortcut_digits()
    assert d.modalities == ("a", "v") and d.num_features == (10, 64) and d.num_classes == 10
    assert len(d.y_train) == 1437 and len(d.y_test) == 360
    assert load_shortcut_digits() is d  # cached
    ia = d.index("a")
    rel = (d.x_train[ia].argmax(1) == d.y_train).float().mean().item()
    assert 0.69 < rel < 0.77  # 0.7 + 0.3/10 = 0.73 expected
    clean = load_shortcut_digits(image_noise=0.0, reliability=1.0, shortcut_noise=0.0)
    assert bool((clean.x_test[ia].argmax(1) == clean.y_test).all())
    from gradkit.data import load_digits_split
    assert torch.allclose(clean.x_train[d.index("v")], load_digits_split().x_train)
    noise = d.x_train[1] - load_digits_split().x_train
    assert 0.45 < noise.std().item() < 0.55
    with pytest.raises(KeyError, match="unknown modality"):
        d.index("t")
    with pytest.raises(ValueError, match=r"reliability must be in \[0, 1\]"):
        load_shortcut_digits(reliability=1.5)
    with pytest.raises(ValueError, match="image_noise must be finite and >= 0"):
        load_shortcut_digits(image_noise=-0.1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        load_shortcut_digits(seed=-1)


# ------------------------------------------------------------------------------------------- claim
def test_claim_registered():
    from gradkit.harness.claims import get_claim

    claim = get_claim("agm")
    assert claim.arxiv == "2308.07686" and claim.primary.ours == "agm_early" and claim.primary.baseline == "joint_early"
    assert len(claim.criterion.criteria) == 6  # premise, suppressed-modality gain, fused gain per fusion variant
    assert claim.control == {"agm_early": "joint_early", "agm_late": "joint_late"}
    for dotted in claim.uses:
        mod, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), name), dotted


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.agm import CLAIM

    out = smoke_run("agm")
    epochs = CLAIM.protocol.at("smoke").epochs
    for arm, m in out.metrics.items():
        assert m["test_acc"] >= 30.0, (arm, m)
        assert len(out.curves["test_acc"][arm]) == epochs
        if arm not in ("v_only", "a_only"):
            assert m["sum_phi_err"] <= 1e-5  # sum_m phi_m == f(all)
        if arm.startswith("agm"):
            assert m["k_a_mean"] > 0 and m["k_v_mean"] > 0  # coefficients finite and positive
    assert out.metrics["v_only"]["phi_v_acc"] == out.metrics["v_only"]["test_acc"]
    assert out.metrics["a_only"]["phi_a_acc"] == out.metrics["a_only"]["test_acc"]


def test_claim_smoke_is_bit_reproducible(smoke_run):
    from gradkit.harness.claims.agm import CLAIM
    from gradkit.harness.claims.base import RunContext

    again = CLAIM.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("agm").metrics


def test_claim_alpha_override_reaches_the_arms(smoke_run):
    # alpha = 0 makes every k_m = exp(0) = 1: the AGM arms then train exactly as joint training
    from gradkit.harness.claims.agm import CLAIM
    from gradkit.harness.claims.base import RunContext

    out = CLAIM.run(RunContext(scale="smoke", seed=0, overrides={"alpha": 0.0}))
    assert out.info["overrides"] == {"alpha": 0.0}
    for f in ("early", "late"):
        for k in ("test_acc", "phi_v_acc", "phi_a_acc"):
            assert out.metrics[f"agm_{f}"][k] == out.metrics[f"joint_{f}"][k], (f, k)
    default = smoke_run("agm").metrics
    assert out.metrics["agm_early"] != default["agm_early"]  # the override did change the AGM arm
    assert out.metrics["agm_late_a2.5"] == default["agm_late_a2.5"]  # alpha_secondary untouched


# --------------------------------------------------------------------------------- bench, docs, cuda
def test_benchmarks_registered_and_run():
    import gradkit.harness.benchmarks.agm  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    for name in ("agm-step", "agm-modulation-overhead"):
        b = BENCHMARKS.get(name)
        assert b.slug == "agm" and b.target == 1.15
    r = BENCHMARKS.get("agm-modulation-overhead").run(1)
    assert math.isfinite(r.ratio) and r.ratio > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    net = ThreeWay((3, 4)).double()
    xs = _inputs((3, 4), n=16, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    cpu = AGM(copy.deepcopy(net), 2, alpha=2.0)
    gpu = AGM(copy.deepcopy(net).cuda(), 2, alpha=2.0)
    F.cross_entropy(cpu(*xs, target=y), y).backward()
    F.cross_entropy(gpu(*[x.cuda() for x in xs], target=y.cuda()), y.cuda()).backward()
    assert gpu.last_scores == pytest.approx(cpu.last_scores, rel=1e-10)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert q.grad.device.type == "cuda"
        torch.testing.assert_close(q.grad.cpu(), p.grad)
