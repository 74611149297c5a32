"""Tests of ReSTE (paper slug: reste): estimator math, binary layers, schedule, probes, claim, docs."""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.functional.straight_through import (
    ESTIMATORS, ReSTESign, STESign, binarize_sign, get_estimator, power_surrogate, register_estimator,
    reste_derivative, reste_sign, ste_derivative, ste_sign,
)
from gradkit.nn.binary import BinaryConv2d, BinaryLinear, binary_modules, set_estimator_param
from gradkit.probes.binary import estimating_error, gradient_stability
from gradkit.schedules.reste import reste_power

REPO = Path(__file__).resolve().parent.parent
T, M = 1.5, 0.1


# ---------------------------------------------------------------------------------------- references
def naive_reste_derivative(v: float, o: float, t: float = T, m: float = M) -> float:
    """The paper's closed form, one element at a time."""
    a = abs(v)
    if a > t:
        return 0.0
    if a > m:
        return (1.0 / o) * a ** ((1.0 - o) / o)
    return m ** (1.0 / o) / m


def rectified_surrogate(x: torch.Tensor, o: float, t: float = T, m: float = M) -> torch.Tensor:
    """A continuous function whose derivative is ReSTE's backward away from |x| in {m, t}:
    chord m^(1/o-1) x on |x| <= m, f_o(x) = sign(x)|x|^(1/o) on m < |x| <= t, constant beyond t."""
    a = x.abs()
    inner = x * m ** (1.0 / o - 1.0)
    middle = torch.sign(x) * a.clamp(min=m, max=t) ** (1.0 / o)
    return torch.where(a <= m, inner, middle)


def grid(dtype=torch.float64) -> torch.Tensor:
    pts = [0.0, -0.0, M, -M, T, -T, 0.05, -0.05, 0.3, -0.7, 1.0, -1.0, 1.2, 1.49, -1.51, 2.0, -3.0, 1e-8, 100.0]
    return torch.tensor(pts + torch.linspace(-2, 2, 41).tolist(), dtype=dtype)


def away_from_kinks(n: int, o_kinks=(M, T), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=dtype) * 4 - 2)
    for k in o_kinks:
        bad = (x.abs() - k).abs() < 1e-3
        x[bad] += 3e-3
    x[x.abs() < 1e-3] = 0.05
    return x


# ---------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("fn", [lambda x: reste_sign(x, 3.0), lambda x: ste_sign(x), binarize_sign])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_is_exactly_pm1_and_zero_maps_to_plus_one(fn, dtype):
    x = torch.cat([torch.randn(100), torch.tensor([0.0, -0.0, 1e-30, -1e-30])]).to(dtype)
    b = fn(x)
    assert b.dtype == dtype and b.shape == x.shape
    assert bool(((b == 1) | (b == -1)).all())
    assert torch.equal(b[x > 0], torch.ones_like(b[x > 0]))
    assert torch.equal(b[x < 0], -torch.ones_like(b[x < 0]))
    assert bool((b[x == 0] == 1).all())  # documented choice: sign(0) := +1 (torch.sign gives 0)


def test_forward_keeps_nan():
    assert torch.isnan(reste_sign(torch.tensor([float("nan")]), 2.0)).all()


# ---------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("o", [1.0, 2.0, 3.0, 1.7, 5.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_equals_closed_form_on_grid(o, dtype):
    x = grid(dtype).requires_grad_()
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    reste_sign(x, o).backward(g)
    # the reference compares |x| with m and t in the tensor's dtype, as the implementation does
    ref = torch.tensor([naive_reste_derivative(float(v), o, float(torch.tensor(T, dtype=dtype)),
                                               float(torch.tensor(M, dtype=dtype))) for v in x.detach()],
                       dtype=torch.float64)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), (ref * g.double()), **tol)


@pytest.mark.parametrize("o", [1.0, 2.0, 3.0])
def test_boundaries_are_assigned_as_the_official_code(o):
    x = torch.tensor([M, -M, T, -T, 0.0], dtype=torch.float64)
    d = reste_derivative(x, o)
    inner, at_t = M ** (1 / o - 1), (1 / o) * T ** ((1 - o) / o)
    torch.testing.assert_close(d, torch.tensor([inner, inner, at_t, at_t, inner], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    big = torch.nextafter(torch.tensor(T, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64))
    assert reste_derivative(big.reshape(1), o).item() == 0.0


def test_inner_slope_is_the_secant_not_the_tangent():
    # intended jump at |x| = m: chord slope m^(1/o-1) is o times the tangent f_o'(m)
    for o in (2.0, 3.0, 5.0):
        inner = reste_derivative(torch.tensor([M], dtype=torch.float64), o).item()
        just_out = reste_derivative(torch.tensor([M * (1 + 1e-12)], dtype=torch.float64), o).item()
        assert inner == pytest.approx(o * just_out, rel=1e-9)
        assert inner == pytest.approx(power_surrogate(torch.tensor(M, dtype=torch.float64), o).item() / M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_o_equal_one_is_clipped_ste_at_t_exactly(dtype):
    x = torch.cat([grid(dtype), torch.randn(1000, dtype=dtype) * 2])
    g = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    reste_sign(x1, 1.0).backward(g)
    ste_sign(x2, clip=T).backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(reste_sign(x, 1.0), ste_sign(x, clip=T))
    assert torch.equal(reste_derivative(x, 1.0), ste_derivative(x, clip=T))


class _RectifiedSurrogateFn(torch.autograd.Function):
    """Forward: the continuous rectified surrogate; backward: the library's ReSTE derivative."""

    @staticmethod
    def forward(x, o):
        return rectified_surrogate(x, o)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.o = inputs[1]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * reste_derivative(x, ctx.o), None


@pytest.mark.parametrize("o", [1.0, 2.0, 3.0, 5.0])
def test_gradcheck_backward_against_smooth_surrogate_float64(o):
    # gradcheck cannot see through sign; it checks ReSTE's backward against finite differences of the
    # (piecewise smooth) rectified surrogate at points away from the kinks |x| in {m, t}
    x = away_from_kinks(40).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _RectifiedSurrogateFn.apply(v, o), (x,), eps=1e-6, atol=1e-6)
    # and in the middle region it is the true derivative of f_o (autograd of the power function)
    xm = x.detach()[(x.detach().abs() > M) & (x.detach().abs() < T)].clone().requires_grad_()
    power_surrogate(xm, o).sum().backward()
    xs = xm.detach().clone().requires_grad_()
    reste_sign(xs, o).sum().backward()
    torch.testing.assert_close(xs.grad, xm.grad, rtol=1e-12, atol=0)


def test_ste_backward_matches_clamp_surrogate():
    for clip in (0.5, 1.0, 1.5):
        x = away_from_kinks(60, o_kinks=(clip,), seed=3).requires_grad_()
        ste_sign(x, clip).sum().backward()
        xr = x.detach().clone().requires_grad_()
        xr.clamp(-clip, clip).sum().backward()
        assert torch.equal(x.grad, xr.grad)
    x = torch.tensor([-1.0, 1.0, -1.0000001, 1.0000001], dtype=torch.float64, requires_grad=True)
    ste_sign(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # the official STE keeps |x| == 1


def test_no_gradient_for_o_and_t():
    x = torch.randn(10, requires_grad=True)
    o = torch.tensor(2.5, requires_grad=True)
    t = torch.tensor(1.5, requires_grad=True)
    m = torch.tensor(0.1, requires_grad=True)
    ReSTESign.apply(x, o, t, m).sum().backward()
    assert x.grad is not None and o.grad is None and t.grad is None and m.grad is None
    x2 = torch.randn(10, requires_grad=True)
    ReSTESign.apply(x2, 2.0).sum().backward()  # t and interval default
    torch.testing.assert_close(x2.grad, reste_derivative(x2.detach(), 2.0))
    c = torch.tensor(1.0, requires_grad=True)
    STESign.apply(x2, c).sum().backward()
    assert c.grad is None


@pytest.mark.parametrize("o", [1.0, 1.01, 2.0, 3.0, 5.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients_finite(o, dtype):
    x = torch.tensor([0.0, -0.0, 1e-30, 1e-8, -1e-4, 0.1, 0.10001, 1.5, 1e4, -1e4], dtype=torch.float32)
    x = torch.cat([x, torch.randn(500)]).to(dtype).requires_grad_()
    reste_sign(x, o).backward(torch.ones_like(x))
    assert x.grad.dtype == dtype
    assert bool(torch.isfinite(x.grad).all())
    assert bool((x.grad >= 0).all())


def test_half_precision_matches_float32_closed_form():
    x = torch.randn(200).to(torch.bfloat16)
    d = reste_derivative(x, 3.0)
    ref = reste_derivative(x.float(), 3.0).to(torch.bfloat16)
    assert torch.equal(d, ref)


def test_works_under_no_grad_and_with_tensor_o():
    x = torch.randn(5)
    with torch.no_grad():
        b = reste_sign(x, torch.tensor(3.0))
    assert bool(((b == 1) | (b == -1)).all())


@pytest.mark.parametrize("kwargs, match", [
    (dict(o=0.5), r"o must be >= 1"),
    (dict(o=float("nan")), r"o must be finite"),
    (dict(o=float("inf")), r"o must be finite"),
    (dict(o=True), r"o must be a real number"),
    (dict(o="3"), r"o must be a real number"),
    (dict(o=torch.ones(2)), r"o must be a real scalar"),
    (dict(o=2.0, t=0.0), r"t must be > 0"),
    (dict(o=2.0, t=-1.0), r"t must be > 0"),
    (dict(o=2.0, interval=0.0), r"interval must be in \(0, t\]"),
    (dict(o=2.0, interval=2.0), r"interval must be in \(0, t\]"),
])
def test_reste_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reste_sign(torch.randn(3), **kwargs)
    with pytest.raises(ValueError, match=match):
        reste_derivative(torch.randn(3), **kwargs)


def test_bad_x_and_clip():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        reste_sign([1.0, 2.0], 2.0)
    with pytest.raises(TypeError, match="floating-point"):
        reste_sign(torch.tensor([1, -2]), 2.0)
    with pytest.raises(TypeError, match="floating-point"):
        ste_sign(torch.tensor([1, -2]))
    with pytest.raises(ValueError, match="clip must be > 0, got 0.0"):
        ste_sign(torch.randn(3), clip=0.0)
    with pytest.raises(ValueError, match="clip must be finite"):
        ste_sign(torch.randn(3), clip=float("nan"))
    with pytest.raises(ValueError, match="o must be > 0"):
        power_surrogate(torch.randn(3), 0.0)


# ---------------------------------------------------------------------------------------- registry
def test_estimator_registry():
    assert {"ste", "reste"} <= set(ESTIMATORS.names())
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    get_estimator("reste")(x, 3.0).sum().backward()
    torch.testing.assert_close(x.grad, reste_derivative(x.detach(), 3.0))
    x.grad = None
    get_estimator("ste")(x, 3.0).sum().backward()  # STE ignores the parameter, clips at 1
    assert torch.equal(x.grad, ste_derivative(x.detach(), 1.0))
    fn = lambda v, p: ste_sign(v, clip=2.0)  # noqa: E731
    assert get_estimator(fn) is fn
    with pytest.raises(ValueError, match="estimator must be one of"):
        get_estimator("nope")
    with pytest.raises(TypeError, match="estimator must be a registered name"):
        get_estimator(3)
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("ste", fn)
    with pytest.raises(TypeError, match="must be callable"):
        register_estimator("bad", 3)
    register_estimator("test_wide_ste", fn)
    try:
        layer = BinaryLinear(4, 3, estimator="test_wide_ste")
        assert layer.estimator == "test_wide_ste"
        layer(torch.randn(2, 4)).sum().backward()
    finally:
        ESTIMATORS.remove("test_wide_ste")


# ---------------------------------------------------------------------------------------- layers
def _st_reference(x: torch.Tensor, o: float) -> torch.Tensor:
    """sign(x) in the forward, the rectified surrogate's gradient in the backward (detach trick)."""
    s = rectified_surrogate(x, o)
    return s + (binarize_sign(x) - s).detach()


@pytest.mark.parametrize("o", [1.0, 3.0])
def test_binary_linear_matches_naive_reference(o):
    torch.manual_seed(0)
    layer = BinaryLinear(12, 7, estimator="reste", o=o).double()
    with torch.no_grad():
        layer.weight.copy_(away_from_kinks(84, seed=5).reshape(7, 12) * 0.3)
    x = away_from_kinks(5 * 12, seed=6).reshape(5, 12)
    y = layer(x)
    w = layer.weight
    ref_out = F.linear(binarize_sign(x), binarize_sign(w) * w.abs().mean(), layer.bias)
    torch.testing.assert_close(y, ref_out, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    xa = x.clone().requires_grad_()
    gx, gw, gb = torch.autograd.grad(layer(xa), (xa, layer.weight, layer.bias), g)
    wr = w.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out = F.linear(_st_reference(xr, o), _st_reference(wr, o) * wr.abs().mean(), layer.bias)
    rx, rw = torch.autograd.grad(out, (xr, wr), g)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, g.sum(0))


def test_binary_linear_options():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    layer = BinaryLinear(6, 3, bias=False, scale=None, binarize_act=False, estimator="ste")
    assert torch.equal(layer(x), F.linear(x, binarize_sign(layer.weight)))
    bw = layer.binary_weight()
    assert bool(((bw == 1) | (bw == -1)).all())
    r = repr(BinaryLinear(6, 3, o=2.5))
    assert "estimator=reste" in r and "o=2.5" in r and "scale=mean_abs" in r and "binarize_act=True" in r
    sd = BinaryLinear(6, 3).state_dict()
    assert set(sd) == {"weight", "bias"}
    with torch.no_grad():
        assert BinaryLinear(6, 3)(x).shape == (4, 3)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(estimator="nope"), ValueError, "estimator must be one of"),
    (dict(scale="max"), ValueError, "scale must be 'mean_abs' or None, got 'max'"),
    (dict(binarize_act=1), ValueError, "binarize_act must be a bool"),
    (dict(o=float("nan")), ValueError, "o must be finite"),
])
def test_binary_layer_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BinaryLinear(4, 4, **kwargs)
    with pytest.raises(exc, match=match):
        BinaryConv2d(2, 2, 3, **kwargs)


def test_reste_layer_rejects_o_below_one_at_forward():
    layer = BinaryLinear(4, 4)
    layer.o = 0.5  # a generic estimator parameter; ReSTE checks its own range
    with pytest.raises(ValueError, match="o must be >= 1"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("o", [1.0, 2.0])
def test_binary_conv_matches_naive_reference(o):
    torch.manual_seed(1)
    conv = BinaryConv2d(3, 4, 3, padding=1, stride=2, estimator="reste", o=o).double()
    x = away_from_kinks(2 * 3 * 6 * 6, seed=7).reshape(2, 3, 6, 6)
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    y = conv(xa)
    gx, gw = torch.autograd.grad(y, (xa, conv.weight), g)
    wr = conv.weight.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ref = F.conv2d(_st_reference(xr, o), _st_reference(wr, o) * wr.abs().mean(), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    rx, rw = torch.autograd.grad(ref, (xr, wr), g)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    assert "estimator=reste" in repr(conv) and "kernel_size=(3, 3)" in repr(conv)


def test_set_estimator_param_walks_all_binary_layers():
    model = nn.Sequential(BinaryLinear(4, 4), nn.Sequential(nn.ReLU(), BinaryLinear(4, 4, estimator="ste")),
                          nn.Linear(4, 2))
    assert set_estimator_param(model, o=2.5) == 2
    assert [m.o for _, m in binary_modules(model)] == [2.5, 2.5]
    assert set_estimator_param(model, o=torch.tensor(3.0)) == 2
    assert all(isinstance(m.o, float) and m.o == 3.0 for _, m in binary_modules(model))
    assert set_estimator_param(nn.Linear(2, 2), o=2.0) == 0
    with pytest.raises(ValueError, match="o must be finite"):
        set_estimator_param(model, o=float("inf"))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        set_estimator_param("model", o=2.0)


# ---------------------------------------------------------------------------------------- schedule
def test_reste_power_schedule():
    assert reste_power(0.0) == 1.0
    assert reste_power(1.0) == pytest.approx(3.0)
    assert reste_power(1.0, o_end=5.0) == pytest.approx(5.0)
    assert reste_power(0.37, o_end=1.0) == 1.0
    p = 0.4
    assert reste_power(p, 3.0) == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 2 * p)))
    vals = [reste_power(e / 40, 3.0) for e in range(41)]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    # cosine-shaped: slow start (convex), below the linear ramp in the middle
    assert reste_power(0.5, 3.0) < 2.0
    for bad, match in [(dict(progress=-0.1), "progress must be in"), (dict(progress=1.5), "progress must be in"),
                       (dict(progress=float("nan")), "progress must be finite"),
                       (dict(progress=0.5, o_end=0.5), "o_end must be >= 1"),
                       (dict(progress=0.5, o_end=float("inf")), "o_end must be finite")]:
        with pytest.raises(ValueError, match=match):
            reste_power(**bad)


# ---------------------------------------------------------------------------------------- probes
def test_probes_equal_naive_formulas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), BinaryLinear(8, 8), nn.ReLU(), BinaryConv2d(2, 3, 2))
    lin, conv = model[1], model[3]
    for o in (1.0, 2.0, 3.0):
        ref = sum(
            math.sqrt(sum((math.copysign(abs(v) ** (1 / o), v) - (1.0 if v >= 0 else -1.0)) ** 2
                          for v in w.detach().reshape(-1).tolist()))
            for w in (lin.weight, conv.weight))
        assert estimating_error(model, o) == pytest.approx(ref, rel=1e-5)
    ees = [estimating_error(model, o) for o in (1.0, 2.0, 3.0, 5.0)]
    assert all(b < a for a, b in zip(ees, ees[1:]))
    with pytest.raises(ValueError, match="has no weight gradient"):
        gradient_stability(model)
    lin(torch.randn(4, 8)).square().sum().backward()
    conv(torch.randn(1, 2, 4, 4)).square().sum().backward()
    ref_gs = sum(float(torch.var(m.weight.grad.abs().reshape(-1), unbiased=True)) for m in (lin, conv))
    assert gradient_stability(model) == pytest.approx(ref_gs, rel=1e-6)


def test_probe_errors():
    with pytest.raises(ValueError, match="no binary layers"):
        estimating_error(nn.Linear(2, 2), 3.0)
    with pytest.raises(ValueError, match="no binary layers"):
        gradient_stability(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="o must be >= 1"):
        estimating_error(BinaryLinear(2, 2), 0.5)
    with pytest.raises(ValueError, match="o must be finite"):
        estimating_error(BinaryLinear(2, 2), float("nan"))


# ---------------------------------------------------------------------------------------- claim
def test_claim_registered():
    from gradkit.harness.claims import get_claim
    from gradkit.harness.claims.reste import ARMS

    claim = get_claim("reste")
    assert claim.arxiv == "2308.06689" and claim.primary.ours == "reste_o3" and claim.primary.baseline == "ste"
    assert set(ARMS) == {"ste", "reste_o1", "reste_o2", "reste_o3", "reste_o5"} == set(claim.arms)
    assert [v.name for v in claim.variants] == ["mnist"] and claim.plots == ("test_acc", "gs")
    assert claim.resolve(None).control == {"reste_o3": "reste_o1"}
    for dotted in claim.uses:
        mod, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), name), dotted


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.reste import ARMS, CLAIM

    out = smoke_run("reste")
    epochs = CLAIM.protocol.at("smoke").epochs
    for arm, m in out.metrics.items():
        assert 50.0 <= m["test_acc"], (arm, m)
        assert m["gs"] > 0
        assert m["ee_o3"] < m["ee_o1"]  # EE(o=3) < EE(o=1)
        losses = out.curves["train_loss"][arm]
        assert len(losses) == epochs and losses[-1] < losses[0]  # loss decreases
    assert out.metrics["reste_o3"]["o_last"] == pytest.approx(reste_power((epochs - 1) / epochs, 3.0))
    assert out.metrics["ste"]["o_last"] == 1.0
    assert set(out.curves["test_acc"]) == set(ARMS) and set(out.curves["gs"]) == set(ARMS)
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 2


def test_claim_model_forward_is_binary():
    from gradkit.harness.claims.reste import build_model

    model = build_model(64, 10, "reste")
    layer = model[2]
    bw = layer.binary_weight() / layer.weight.abs().mean()
    torch.testing.assert_close(bw.abs(), torch.ones_like(bw))
    ba = layer.binary_input(torch.randn(8, 256))
    assert bool(((ba == 1) | (ba == -1)).all())


def test_claim_smoke_is_bit_reproducible(smoke_run):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.reste import CLAIM

    again = CLAIM.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("reste").metrics


def test_claim_missing_data_root(tmp_path):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.reste import CLAIM
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "absent"))
    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))  # a folder without mnist files


def test_claim_real_mnist_smoke(data_root, smoke_run):
    if not (data_root / "mnist").is_dir():
        pytest.skip("mnist/ not in the real data folder")
    from gradkit.harness.claims.reste import CLAIM

    out = smoke_run("reste", data_root=data_root)
    assert out.data == "mnist" and out.info["n_train"] == CLAIM.variants[0].protocol.at("smoke").n_train
    for m in out.metrics.values():
        assert all(math.isfinite(v) for v in m.values()) and 30.0 <= m["test_acc"] <= 100.0


# ---------------------------------------------------------------------------------------- benchmark, docs, device
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.reste  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("reste-binary-linear-step")
    assert b.slug == "reste" and b.target == 1.10 and b.baseline == "STE binary layer"
    r = b.run(1)
    assert math.isfinite(r.ratio) and r.ratio > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    x = torch.randn(1000, dtype=torch.float64)
    xc = x.cuda().requires_grad_()
    xr = x.clone().requires_grad_()
    reste_sign(xc, 3.0).sum().backward()
    reste_sign(xr, 3.0).sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), xr.grad)
    layer = BinaryLinear(8, 4).cuda()
    set_estimator_param(layer, o=2.0)
    layer(torch.randn(3, 8, device="cuda")).sum().backward()
    assert layer.weight.grad.device.type == "cuda"
