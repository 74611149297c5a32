"""Tests of BiPer (paper slug: biper): periodic binariser, ApproxSign, layers, QE probe, claim, docs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.functional.periodic import (
    ApproxSign, BiPerSign, NormApproxSign, approx_sign, approx_sign_derivative, biper_binarize, biper_derivative,
    check_freq, norm_approx_sign,
)
from gradkit.functional.straight_through import ESTIMATORS, get_estimator, reste_derivative, ste_derivative
from gradkit.nn.binary import BinaryLinear, binary_modules, set_estimator_param
from gradkit.nn.periodic import BiPerConv2d, BiPerLinear, biper_regularizer, periodic_layers, set_stage
from gradkit.probes.quantization import QE_UNIFORM, biper_quantization_error, quantization_error

REPO = Path(__file__).resolve().parent.parent
EPS = 1e-5


# ---------------------------------------------------------------------------------------- references
def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """torch.sign with 0 -> +1."""
    return torch.where(x == 0, torch.ones_like(x), torch.sign(x))


def approx_sign_surrogate(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's piecewise quadratic, whose derivative is max(0, 2 - 2|x|): 2x - x|x| on |x| < 1, sign beyond."""
    inner = 2 * x - x * x.abs()
    return torch.where(x.abs() < 1, inner, torch.sign(x))


def st(surrogate: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Value of ``forward``, gradient of ``surrogate`` (the detach trick)."""
    return surrogate + (forward - surrogate).detach()


def naive_biper_weight(w: torch.Tensor, f: float, hard: bool = True) -> torch.Tensor:
    s = torch.sin(f * w)
    return st(s, sign_pm1(s)) if hard else s


def naive_act(x: torch.Tensor, dims, training: bool = True) -> torch.Tensor:
    a0 = x / torch.sqrt(x.var(dims, keepdim=True) + EPS) if training else x
    return st(approx_sign_surrogate(a0), sign_pm1(a0))


def away_from_kinks(n: int, kinks=(1.0,), seed: int = 0, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=dtype) * 2 - 1) * scale
    for k in kinks:
        x[((x.abs() - k).abs() < 1e-3)] += 3e-3
    x[x.abs() < 1e-3] = 0.05
    return x


# ---------------------------------------------------------------------------------------- weight binariser
@pytest.mark.parametrize("f", [1.0, 5.0, 20.0, 50.0, 3.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_forward_is_exactly_sign_of_sin(f, dtype):
    w = torch.cat([torch.randn(5000, dtype=dtype) * 0.2, torch.tensor([0.0, -0.0, 1e-30], dtype=dtype)])
    b = biper_binarize(w, f)
    assert b.dtype == dtype and b.shape == w.shape
    assert torch.equal(b, sign_pm1(torch.sin(f * w)))
    assert bool(((b == 1) | (b == -1)).all())
    assert bool((b[w == 0] == 1).all())  # documented: sign(0) := +1 (sin has zeros at k pi / f)
    assert torch.equal(BiPerSign.apply(w, f), b)


@pytest.mark.parametrize("f", [1.0, 20.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_backward_is_freq_cos_times_grad(f, dtype):
    w = (torch.randn(3000, dtype=dtype) * 0.1).requires_grad_()
    g = torch.randn(w.shape, dtype=dtype)
    biper_binarize(w, f).backward(g)
    # the same as autograd of sin alone (identity STE through sign, true derivative of sin)
    ws = w.detach().clone().requires_grad_()
    torch.sin(f * ws).backward(g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ws.grad, **tol)
    torch.testing.assert_close(w.grad, f * torch.cos(f * w.detach()) * g, **tol)
    torch.testing.assert_close(biper_derivative(w.detach(), f), f * torch.cos(f * w.detach()), **tol)


def test_no_clipping_of_the_weight_gradient():
    # official BinaryQuantize backward is the plain identity: large |w| still gets f cos(f w)
    w = torch.tensor([5.0, -7.0, 100.0], dtype=torch.float64, requires_grad=True)
    biper_binarize(w, 2.0).sum().backward()
    torch.testing.assert_close(w.grad, 2.0 * torch.cos(2.0 * w.detach()))


def test_soft_mode_is_sine_and_gradchecks():
    w = torch.randn(30, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(biper_binarize(w, 20.0, hard=False), torch.sin(20.0 * w))
    assert torch.autograd.gradcheck(lambda v: biper_binarize(v, 20.0, hard=False), (w,))
    assert torch.autograd.gradcheck(lambda v: biper_binarize(v, 1.3, hard=False), (w,))


class _SineWithBiPerBackward(torch.autograd.Function):
    """Forward: sin(f w) (smooth); backward: the library's BiPerSign backward."""

    @staticmethod
    def forward(w, f):
        return torch.sin(f * w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.f = inputs[1]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        wa = w.detach().clone().requires_grad_()
        with torch.enable_grad():
            BiPerSign.apply(wa, ctx.f).backward(g)
        return wa.grad, None


@pytest.mark.parametrize("f", [1.0, 20.0])
def test_gradcheck_biper_backward_float64(f):
    # gradcheck cannot see through sign; it checks BiPerSign's backward against finite differences of
    # the stage-1 sine, the surrogate whose derivative the paper backpropagates
    w = (torch.randn(25, dtype=torch.float64) * 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _SineWithBiPerBackward.apply(v, f), (w,), eps=1e-6, atol=1e-5)


def test_freq_gets_no_gradient_and_tensor_freq_works():
    w = torch.randn(10, requires_grad=True)
    f = torch.tensor(20.0, requires_grad=True)
    BiPerSign.apply(w, f).sum().backward()
    assert f.grad is None
    torch.testing.assert_close(w.grad, 20.0 * torch.cos(20.0 * w.detach()))
    with torch.no_grad():
        b = biper_binarize(w, torch.tensor(5.0))
    assert torch.equal(b, sign_pm1(torch.sin(5.0 * w.detach())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_binary_and_grads_finite(dtype):
    w32 = torch.cat([torch.randn(2000) * 0.1, torch.tensor([0.0, 1e4, -1e4])])
    w = w32.to(dtype).requires_grad_()
    b = biper_binarize(w, 20.0)
    assert b.dtype == dtype and bool(((b == 1) | (b == -1)).all())
    # the sine is evaluated in float32 (the bf16 product 20 * w would misplace the square wave's edges)
    assert torch.equal(b, sign_pm1(torch.sin(w.detach().float() * 20.0)).to(dtype))
    b.backward(torch.ones_like(b))
    assert w.grad.dtype == dtype and bool(torch.isfinite(w.grad).all())
    assert float(w.grad.float().abs().max()) <= 20.0 * 1.01


# ---------------------------------------------------------------------------------------- ApproxSign
def test_approx_sign_forward_and_backward():
    x = torch.cat([torch.randn(3000, dtype=torch.float64) * 1.5,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64)]).requires_grad_()
    b = approx_sign(x)
    assert torch.equal(b, sign_pm1(x.detach()))
    g = torch.randn(x.shape, dtype=torch.float64)
    b.backward(g)
    torch.testing.assert_close(x.grad, torch.clamp(2 - 2 * x.detach().abs(), min=0) * g, rtol=1e-14, atol=0)
    torch.testing.assert_close(approx_sign_derivative(x.detach()), torch.clamp(2 - 2 * x.detach().abs(), min=0))
    assert approx_sign_derivative(torch.tensor([0.0, 0.5, 1.0, 3.0])).tolist() == [2.0, 1.0, 0.0, 0.0]


class _QuadWithApproxSignBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return approx_sign_surrogate(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xa = x.detach().clone().requires_grad_()
        with torch.enable_grad():
            ApproxSign.apply(xa).backward(g)
        return xa.grad


def test_gradcheck_approx_sign_backward_float64():
    x = away_from_kinks(40, kinks=(1.0,), seed=2).requires_grad_()
    assert torch.autograd.gradcheck(_QuadWithApproxSignBackward.apply, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_approx_sign_dtypes(dtype):
    x = torch.randn(100).to(dtype).requires_grad_()
    b = approx_sign(x)
    assert b.dtype == dtype and bool(((b == 1) | (b == -1)).all())
    b.sum().backward()
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())


class _NormQuadWithFusedBackward(torch.autograd.Function):
    """Forward: the smooth surrogate of the normalised activation; backward: NormApproxSign's."""

    @staticmethod
    def forward(x, dims):
        return approx_sign_surrogate(x / torch.sqrt(x.var(dims, keepdim=True) + EPS))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dims = inputs[1]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xa = x.detach().clone().requires_grad_()
        with torch.enable_grad():
            NormApproxSign.apply(xa, ctx.dims, EPS).backward(g)
        return xa.grad, None


@pytest.mark.parametrize("shape, dims", [((4, 10), (-1,)), ((2, 3, 3, 3), (1, 2, 3)), ((6,), (0,))])
def test_gradcheck_norm_approx_sign_float64(shape, dims):
    # finite differences of the smooth surrogate 2a0 - a0|a0| of a0 = x / sqrt(Var(x) + eps) (chain rule
    # through the variance included) against the fused backward
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=torch.float64) * 1.3
    a0 = x / torch.sqrt(x.var(dims, keepdim=True) + EPS)
    x[((a0.abs() - 1).abs() < 1e-2)] *= 0.9  # keep away from the triangle's kinks |a0| = 1
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _NormQuadWithFusedBackward.apply(v, dims), (x,), eps=1e-6,
                                    atol=1e-5)


@pytest.mark.parametrize("dims", [(-1,), (1, 2, 3), (2, 3)])
def test_norm_approx_sign_equals_naive_autograd(dims):
    torch.manual_seed(5)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 0.3
    xa = x.clone().requires_grad_()
    b = norm_approx_sign(xa, dims)
    assert torch.equal(b, sign_pm1(x))
    g = torch.randn_like(x)
    b.backward(g)
    xr = x.clone().requires_grad_()
    naive_act(xr, dims).backward(g)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-10, atol=1e-12)
    # int dim accepted; float32 matches float64 closely
    x32 = x.float().requires_grad_()
    norm_approx_sign(x32, dims).backward(g.float())
    torch.testing.assert_close(x32.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_approx_sign_half(dtype):
    x = (torch.randn(8, 32) * 4).to(dtype).requires_grad_()
    b = norm_approx_sign(x, -1)
    assert b.dtype == dtype and bool(((b == 1) | (b == -1)).all())
    b.sum().backward()
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
    ref = x.detach().float().requires_grad_()
    norm_approx_sign(ref, -1).sum().backward()
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2e-2, atol=2e-2)


def test_norm_approx_sign_errors():
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="dims must be an int or a non-empty tuple of ints"):
        norm_approx_sign(x, dims=())
    with pytest.raises(TypeError, match="dims must be an int"):
        norm_approx_sign(x, dims=1.0)
    with pytest.raises(ValueError, match=r"dims \(2,\) out of range for a tensor with 2 dim"):
        norm_approx_sign(x, dims=2)
    with pytest.raises(ValueError, match="must not repeat"):
        norm_approx_sign(x, dims=(1, -1))
    with pytest.raises(ValueError, match="eps must be > 0, got 0.0"):
        norm_approx_sign(x, eps=0.0)
    with pytest.raises(ValueError, match="eps must be finite"):
        norm_approx_sign(x, eps=float("nan"))
    with pytest.raises(ValueError, match=r"needs >= 2 elements per group, got 1"):
        norm_approx_sign(torch.randn(4, 1, requires_grad=True), dims=-1)
    with pytest.raises(ValueError, match=r"needs >= 2 elements per group, got 1"):
        norm_approx_sign(torch.randn(4, 1), dims=-1)
    with pytest.raises(ValueError, match="x must be finite"):
        norm_approx_sign(torch.tensor([[1.0, float("inf")]]))


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("freq, exc, match", [
    (0.0, ValueError, r"freq must be > 0 .*got 0.0"),
    (-1.0, ValueError, r"freq must be > 0"),
    (float("nan"), ValueError, r"freq must be finite, got nan"),
    (float("inf"), ValueError, r"freq must be finite"),
    (True, TypeError, r"freq must be a real number"),
    ("20", TypeError, r"freq must be a real number"),
    (torch.ones(2), ValueError, r"freq must be a real scalar"),
])
def test_bad_freq(freq, exc, match):
    with pytest.raises(exc, match=match):
        biper_binarize(torch.randn(3), freq)
    with pytest.raises(exc, match=match):
        BiPerSign.apply(torch.randn(3), freq)
    with pytest.raises(exc, match=match):
        biper_derivative(torch.randn(3), freq)
    with pytest.raises(exc, match=match):
        BiPerLinear(4, 4, freq=freq)
    with pytest.raises(exc, match=match):
        quantization_error(torch.randn(3), freq)
    with pytest.raises(exc, match=match):
        check_freq(freq)


def test_bad_tensors():
    with pytest.raises(TypeError, match="w must be a torch.Tensor, got list"):
        biper_binarize([0.1, 0.2], 20.0)
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        biper_binarize(torch.tensor([1, 2]), 20.0)
    with pytest.raises(ValueError, match=r"w must be finite, got 2 non-finite value\(s\)"):
        biper_binarize(torch.tensor([0.1, float("nan"), float("inf")]), 20.0)
    with pytest.raises(ValueError, match="w must be finite"):
        biper_binarize(torch.tensor([float("-inf")]), 20.0, hard=False)
    with pytest.raises(TypeError, match="hard must be a bool, got int"):
        biper_binarize(torch.randn(3), 20.0, hard=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        approx_sign(3.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        approx_sign(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="x must be finite"):
        approx_sign(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        approx_sign_derivative(torch.tensor([1]))


# ---------------------------------------------------------------------------------------- registry
def test_biper_estimator_is_registered_for_binary_layers():
    assert "biper" in ESTIMATORS.names()
    w = torch.randn(20, dtype=torch.float64, requires_grad=True)
    get_estimator("biper")(w, 20.0).sum().backward()
    torch.testing.assert_close(w.grad, 20.0 * torch.cos(20.0 * w.detach()))
    # the generic layer switches estimator by name; its parameter o is the frequency
    layer = BinaryLinear(6, 3, estimator="biper", o=20.0, scale=None, binarize_act=False).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, sign_pm1(torch.sin(20.0 * layer.weight.detach())), layer.bias))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(layer.weight.grad, (g.t() @ x) * 20.0 * torch.cos(20.0 * layer.weight.detach()))
    assert [n for n, _, f in periodic_layers(nn.Sequential(layer))] == ["0"]
    assert periodic_layers(nn.Sequential(layer))[0][2] == 20.0


# ---------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_biper_linear_matches_naive_reference(hard, bias):
    torch.manual_seed(0)
    f = 20.0
    layer = BiPerLinear(12, 7, bias=bias, freq=f, hard=hard).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    y = layer(xa)
    params = [layer.weight, layer.alpha] + ([layer.bias] if bias else [])
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [xa] + params, g)
    wr = layer.weight.detach().clone().requires_grad_()
    ar = layer.alpha.detach().clone().requires_grad_()
    br = layer.bias.detach().clone().requires_grad_() if bias else None
    xr = x.clone().requires_grad_()
    ref = ar * F.linear(naive_act(xr, (-1,)), naive_biper_weight(wr, f, hard), br)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    rgrads = torch.autograd.grad(ref, [xr, wr, ar] + ([br] if bias else []), g)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if hard:
        bw = layer.binary_weight()
        assert bool(((bw == 1) | (bw == -1)).all())


@pytest.mark.parametrize("hard", [True, False])
def test_biper_conv_matches_naive_reference(hard):
    torch.manual_seed(1)
    f = 5.0
    conv = BiPerConv2d(3, 4, 3, padding=1, stride=2, freq=f, hard=hard).double()
    assert conv.alpha.shape == (4, 1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    y = conv(xa)
    g = torch.randn_like(y)
    gx, gw, ga = torch.autograd.grad(y, (xa, conv.weight, conv.alpha), g)
    wr = conv.weight.detach().clone().requires_grad_()
    ar = conv.alpha.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ref = F.conv2d(naive_act(xr, (1, 2, 3)), naive_biper_weight(wr, f, hard), None, stride=2, padding=1) * ar
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    rx, rw, ra = torch.autograd.grad(ref, (xr, wr, ar), g)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, ra, rtol=1e-10, atol=1e-12)
    # unbatched input normalises over (C, H, W) too
    y1 = conv(x[0])
    torch.testing.assert_close(y1, y[0])


@pytest.mark.parametrize("make, shape", [
    (lambda: BiPerLinear(16, 8), (6, 16)),
    (lambda: BiPerConv2d(3, 5, 3, padding=1), (2, 3, 5, 5)),
])
def test_train_and_eval_forward_are_equal(make, shape):
    # variance normalisation only in training mode: sign is scale invariant, only the surrogate changes
    torch.manual_seed(3)
    layer = make()
    x = torch.randn(shape) * 3 + 0.5
    layer.train()
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_train, y_eval)
    # ... but the activation gradient differs (train: through the normalisation)
    xt = x.clone().requires_grad_()
    layer.train()
    layer(xt).sum().backward()
    xe = x.clone().requires_grad_()
    layer.eval()
    layer(xe).sum().backward()
    assert not torch.allclose(xt.grad, xe.grad)
    ref = naive_act(xe.detach().clone().requires_grad_(), (-1,), training=False)
    assert torch.equal(ref, sign_pm1(x))


def test_act_options():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    layer = BiPerLinear(6, 3, binarize_act=False)
    torch.testing.assert_close(layer(x), layer.alpha * F.linear(x, layer.binary_weight()))
    layer = BiPerLinear(6, 3, act_norm=False).double()
    xa = x.double().requires_grad_()
    layer(xa).sum().backward()
    xr = x.double().requires_grad_()
    (layer.alpha * F.linear(naive_act(xr, (-1,), training=False), layer.binary_weight())).sum().backward()
    torch.testing.assert_close(xa.grad, xr.grad)
    # a single feature: the variance is undefined, the normalisation is skipped (no NaN)
    one = BiPerLinear(1, 2)
    y = one(torch.randn(3, 1))
    assert bool(torch.isfinite(y).all())


def test_stages_state_and_repr():
    torch.manual_seed(0)
    model = nn.Sequential(BiPerLinear(8, 8, hard=False, freq=5.0), nn.BatchNorm1d(8),
                          nn.Sequential(BiPerConv2d(2, 2, 1, hard=False)), BinaryLinear(4, 4), nn.Linear(8, 2))
    lin = model[0]
    torch.testing.assert_close(lin.binary_weight(), torch.sin(5.0 * lin.weight))
    assert set_stage(model, 2) == 2
    assert lin.hard and model[2][0].hard
    assert torch.equal(lin.binary_weight(), sign_pm1(torch.sin(5.0 * lin.weight.detach())))
    assert set_stage(model, 1) == 2 and not lin.hard
    assert set_stage(nn.Linear(2, 2), 2) == 0
    for bad in (0, 3, True, "2", None):
        with pytest.raises(ValueError, match="stage must be 1 .* or 2"):
            set_stage(model, bad)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        set_stage("model", 2)
    assert len(binary_modules(model)) == 3  # BiPer layers are binary modules (set_estimator_param sees them)
    r = repr(lin)
    assert "weight_estimator=biper" in r and "freq=5" in r and "hard=False" in r and "act_norm=True" in r
    assert "weight_estimator=ste" in repr(BiPerLinear(4, 4, weight_estimator="ste"))
    assert "kernel_size=(1, 1)" in repr(model[2][0])
    # alpha ~ U(0, 1) per output channel
    big = BiPerLinear(4, 1000)
    alpha = big.alpha.detach()
    assert alpha.shape == (1000,) and 0.0 <= float(alpha.min()) and float(alpha.max()) < 1.0
    assert 0.45 < float(alpha.mean()) < 0.55


def test_frequency_travels_with_the_state_dict():
    a = BiPerLinear(6, 4, freq=20.0, hard=False)
    sd = a.state_dict()
    assert set(sd) == {"weight", "alpha", "_extra_state"} and sd["_extra_state"] == {"freq": 20.0}
    b = BiPerLinear(6, 4, freq=30.0, hard=True)
    b.load_state_dict(sd)
    assert b.freq == 20.0 and b.hard  # stage 2 binarises with the stage-1 frequency; the stage is not loaded
    assert torch.equal(b.binary_weight(), sign_pm1(torch.sin(20.0 * a.weight.detach())))
    with pytest.raises(ValueError, match="BiPer layer state must be a dict with 'freq'"):
        b.set_extra_state({"f": 1.0})
    with pytest.raises(ValueError, match="freq must be > 0"):
        b.set_extra_state({"freq": -1.0})


def test_other_weight_estimators_keep_alpha_and_activation_path():
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    biper = BiPerLinear(8, 4, weight_estimator="biper").double()
    ste = BiPerLinear(8, 4, weight_estimator="ste").double()
    reste = BiPerLinear(8, 4, weight_estimator="reste").double()
    for m in (ste, reste):
        m.load_state_dict(biper.state_dict())
    set_estimator_param(reste, o=3.0)
    assert reste.o == 3.0
    for m, deriv in ((ste, lambda w: ste_derivative(w, 1.0)), (reste, lambda w: reste_derivative(w, 3.0))):
        assert torch.equal(m.binary_weight(), sign_pm1(m.weight.detach()))
        xa = x.clone().requires_grad_()
        y = m(xa)
        g = torch.randn_like(y)
        gw, gx = torch.autograd.grad(y, (m.weight, xa), g)
        # same alpha and activation path as BiPer; only the weight surrogate differs
        xr = x.clone().requires_grad_()
        out = m.alpha.detach() * F.linear(naive_act(xr, (-1,)), sign_pm1(m.weight.detach()))
        rx, = torch.autograd.grad(out, (xr,), g)
        torch.testing.assert_close(gx, rx)
        # dL/dW = (surrogate') * dL/dW_b where dL/dW_b = (alpha g)^T a_b
        ab = sign_pm1(x / torch.sqrt(x.var(-1, keepdim=True) + EPS))
        gwb = (m.alpha.detach()[None] * g).t() @ ab
        torch.testing.assert_close(gw, gwb * deriv(m.weight.detach()))
    # hard and freq are irrelevant for non-periodic weights
    assert periodic_layers(nn.Sequential(ste, reste)) == []


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(weight_estimator="nope"), ValueError, "estimator must be one of"),
    (dict(hard=1), TypeError, "hard must be a bool, got int"),
    (dict(act_norm="yes"), TypeError, "act_norm must be a bool"),
    (dict(binarize_act=1), ValueError, "binarize_act must be a bool"),
    (dict(o=float("nan")), ValueError, "o must be finite"),
    (dict(freq=0.0), ValueError, "freq must be > 0"),
])
def test_layer_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BiPerLinear(4, 4, **kwargs)
    with pytest.raises(exc, match=match):
        BiPerConv2d(2, 2, 3, **kwargs)


def test_layer_bad_shapes_and_sizes():
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        BiPerLinear(0, 4)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        BiPerConv2d(2, -1, 3)
    with pytest.raises(ValueError, match=r"input must have 4 features in its last dim, got shape \(2, 5\)"):
        BiPerLinear(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input must be \(N, 2, H, W\)"):
        BiPerConv2d(2, 3, 1)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"input must be \(N, 2, H, W\)"):
        BiPerConv2d(2, 3, 1)(torch.randn(4, 4))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        BiPerLinear(4, 3)([1.0] * 4)
    layer = BiPerLinear(4, 3)
    with pytest.raises(ValueError, match="freq must be finite"):
        layer.freq = float("inf")
    with pytest.raises(TypeError, match="hard must be a bool"):
        layer.hard = "yes"


# ---------------------------------------------------------------------------------------- probe, regulariser
def test_quantization_error_equals_naive_formula():
    torch.manual_seed(0)
    model = nn.Sequential(BiPerLinear(8, 8, freq=20.0), nn.ReLU(), BiPerConv2d(2, 3, 2, freq=5.0),
                          BiPerLinear(8, 8, weight_estimator="ste"))
    ref = {}
    for name, m, f in (("0", model[0], 20.0), ("2", model[2], 5.0)):
        vals = [math.sin(f * v) for v in m.weight.detach().reshape(-1).tolist()]
        ref[name] = sum(abs(s - (1.0 if s >= 0 else -1.0)) for s in vals) / len(vals)
    per = biper_quantization_error(model, reduction="none")
    assert set(per) == {"0", "2"}  # the STE-weight layer has no frequency: not counted
    for k in ref:
        assert per[k] == pytest.approx(ref[k], rel=1e-5)
    assert biper_quantization_error(model) == pytest.approx(sum(ref.values()), rel=1e-5)
    assert biper_quantization_error(model, reduction="mean") == pytest.approx(sum(ref.values()) / 2, rel=1e-5)
    # freq overrides every layer's own frequency
    w = model[0].weight
    assert biper_quantization_error(nn.Sequential(model[0]), freq=7.0) == pytest.approx(quantization_error(w, 7.0))
    assert quantization_error(w, 7.0) == pytest.approx(1 - float(torch.sin(7.0 * w.detach()).abs().mean()), rel=1e-6)


def test_qe_falls_with_freq_and_matches_the_spec_values():
    # protocol: Gaussian weights with std 0.05 -> QE ~ 0.96, 0.80, 0.42, 0.364 at freq = 1, 5, 20, 50
    w = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) * 0.05
    qes = [quantization_error(w, f) for f in (1.0, 5.0, 20.0, 50.0)]
    for q, ref in zip(qes, (0.96, 0.80, 0.42, 0.364)):
        assert q == pytest.approx(ref, abs=0.01)
    assert all(b < a for a, b in zip(qes, qes[1:]))
    # closed form for Gaussian w: E|sin(f w)| has no simple form, but QE -> 1 - 2/pi once f * std >= 3
    for std, f in ((0.05, 60.0), (0.1, 30.0), (0.02, 400.0), (1.0, 3.0)):
        wg = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * std
        assert abs(quantization_error(wg, f) - QE_UNIFORM) < 0.05
    assert QE_UNIFORM == pytest.approx(0.3634, abs=1e-4)
    # f |w| << 1: the sine is near 0, QE near 1
    assert quantization_error(w, 1e-3) > 0.999


def test_probe_errors():
    with pytest.raises(ValueError, match="no BiPer \\(periodic\\) binary layers"):
        biper_quantization_error(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no BiPer"):
        biper_quantization_error(nn.Sequential(BiPerLinear(2, 2, weight_estimator="ste")))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        biper_quantization_error("model")
    with pytest.raises(ValueError, match="reduction must be 'sum', 'mean' or 'none', got 'max'"):
        biper_quantization_error(BiPerLinear(2, 2), reduction="max")
    with pytest.raises(ValueError, match="freq must be > 0"):
        biper_quantization_error(BiPerLinear(2, 2), freq=-2.0)
    layer = BiPerLinear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '<model>': w must be finite"):
        biper_quantization_error(layer)
    with pytest.raises(ValueError, match="at least one element"):
        quantization_error(torch.empty(0), 20.0)


def test_regularizer_value_and_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(BiPerLinear(8, 8, freq=20.0), BiPerConv2d(2, 3, 2, freq=5.0)).double()
    r = biper_regularizer(model, tau=0.037)
    ref = 0.037 * sum(torch.mean(0.5 - 0.5 * torch.cos(2 * f * m.weight)) for m, f in ((model[0], 20.0),
                                                                                       (model[1], 5.0)))
    torch.testing.assert_close(r, ref)
    r.backward()
    w = model[0].weight.detach()
    torch.testing.assert_close(model[0].weight.grad, 0.037 * torch.sin(2 * 20.0 * w) * 20.0 / w.numel())
    assert float(biper_regularizer(model, 0.0).detach()) == 0.0
    with pytest.raises(ValueError, match="tau must be finite and >= 0, got -1"):
        biper_regularizer(model, -1.0)
    with pytest.raises(ValueError, match="tau must be finite"):
        biper_regularizer(model, float("nan"))
    with pytest.raises(ValueError, match="no BiPer"):
        biper_regularizer(nn.Linear(2, 2), 1e-3)


# ---------------------------------------------------------------------------------------- claim
def test_claim_registered():
    from gradkit.harness.claims.base import CLAIMS
    from gradkit.harness.claims.biper import ARMS, BASELINE, OURS

    claim = CLAIMS.get("biper")
    assert claim.arxiv == "2404.01278" and claim.primary.ours == OURS == "biper_f20"
    assert claim.primary.baseline == BASELINE == "ste" and "reste" in ARMS
    desc = claim.criterion.describe()
    assert "biper_f20 >= ste - 1" in desc and "biper_f20 >= reste - 1" in desc
    assert "qe: biper_f1 > biper_f5 > biper_f20 > biper_f50" in desc
    assert [v.name for v in claim.variants] == ["mnist"]
    assert claim.criterion_for("mnist").describe() == desc


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.biper import BIPER_ARMS, CLAIM

    out = smoke_run("biper")
    n_epochs = 2 * CLAIM.protocol.at("smoke").stage_epochs
    for arm, m in out.metrics.items():
        assert m["test_acc"] >= 50.0, (arm, m)
        assert m["binary_frac"] == 1.0  # forward weights in {-1, +1} (stage 2 for BiPer)
        assert m["grads_finite"] == 1.0
        assert len(out.curves["test_acc"][arm]) == n_epochs and len(out.curves["train_loss"][arm]) == n_epochs
    for arm in BIPER_ARMS:
        m = out.metrics[arm]
        assert m["qe_layer"] > 0.0 and m["qe"] == pytest.approx(2 * m["qe_layer"])
        assert 0.0 <= m["qe_gap"] < 1.0 and len(out.curves["qe"][arm]) == n_epochs
        assert m["stage1_acc"] >= 30.0
    assert out.metrics["biper_f20"]["qe"] < out.metrics["biper_f1"]["qe"]


def test_claim_model_is_binary_in_stage_two():
    from gradkit.harness.claims.biper import build_model

    model = build_model(64, 10, "biper", 20.0)
    layers = [m for m in model if isinstance(m, BiPerLinear)]
    assert len(layers) == 2 and isinstance(model[0], nn.Linear) and isinstance(model[-1], nn.Linear)
    set_stage(model, 2)
    for layer in layers:
        bw = layer.binary_weight()
        assert bool(((bw == 1) | (bw == -1)).all())
        ba = layer.binary_input(torch.randn(8, 256))
        assert bool(((ba == 1) | (ba == -1)).all())


def test_claim_smoke_is_bit_reproducible(smoke_run):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.biper import CLAIM

    again = CLAIM.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("biper").metrics


def test_claim_missing_data_root(tmp_path):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.biper import CLAIM
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "absent"))
    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))  # a folder without mnist files


def test_claim_real_mnist_smoke(data_root, smoke_run):
    if not (data_root / "mnist").is_dir():
        pytest.skip("mnist/ not in the real data folder")
    out = smoke_run("biper", data_root=data_root)
    assert out.data == "mnist" and out.info["n_train"] == out.info["protocol"]["n_train"] == 1000
    for m in out.metrics.values():
        assert all(math.isfinite(v) for v in m.values()) and 30.0 <= m["test_acc"] <= 100.0


# ---------------------------------------------------------------------------------------- benchmark, docs, device
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.biper  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("biper-binary-linear-step")
    assert b.slug == "biper" and b.target == 1.10 and b.baseline == "STE binary layer"
    r = b.run(1)
    assert math.isfinite(r.ratio) and r.ratio > 0
    assert math.isfinite(r.extra["ratio_vs_plain_ste_binary_linear"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    w = torch.randn(1000, dtype=torch.float64) * 0.2
    wc = w.cuda().requires_grad_()
    wr = w.clone().requires_grad_()
    biper_binarize(wc, 20.0).sum().backward()
    biper_binarize(wr, 20.0).sum().backward()
    torch.testing.assert_close(wc.grad.cpu(), wr.grad)
    torch.manual_seed(0)
    layer = BiPerLinear(8, 4).cuda()
    layer(torch.randn(3, 8, device="cuda")).sum().backward()
    assert layer.weight.grad.device.type == "cuda" and layer.alpha.grad.device.type == "cuda"
    assert biper_quantization_error(layer) > 0
    conv = BiPerConv2d(3, 4, 3, padding=1).cuda()
    conv(torch.randn(2, 3, 5, 5, device="cuda")).sum().backward()
    assert float(biper_regularizer(conv, 1e-3)) >= 0
