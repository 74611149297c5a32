"""Tests of TrAct (paper slug: tract): the closed form, the layers, the wrapper, the claim, benchmark and docs."""
from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.functional.tract import (TrActConv2dFn, TrActLinearFn, conv2d_patches, conv2d_second_moment,
                                      tract_conv2d, tract_linear, tract_weight_grad)
from gradkit.nn.tract import TrActConv2d, TrActLinear, tract

REPO = Path(__file__).resolve().parent.parent
D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- references
def ridge_solution(X, Z_star, W, lam):
    """argmin_V (1/b)||X V^T - Z*||^2 + lam ||V - W||^2 as one stacked least-squares problem (no normal eqs)."""
    b, n = X.shape
    A = torch.cat([X / math.sqrt(b), math.sqrt(lam) * torch.eye(n, dtype=X.dtype)])
    B = torch.cat([Z_star / math.sqrt(b), math.sqrt(lam) * W.T])
    return torch.linalg.lstsq(A, B, driver="gelsd").solution.T


def naive_tract_grad(X, G, lam):
    """G^T X (X^T X / b + lam I)^-1 with an explicit inverse, one formula, no branches."""
    b, n = X.shape
    return G.T @ X @ torch.linalg.inv(X.T @ X / b + lam * torch.eye(n, dtype=X.dtype))


def naive_patches(x, kernel, stride, padding):
    """Explicit loops over output positions: rows (N, H_out, W_out), columns (C, kh, kw)."""
    N, C, H, W = x.shape
    kh, kw = kernel
    xp = torch.zeros(N, C, H + 2 * padding[0], W + 2 * padding[1], dtype=x.dtype)
    xp[:, :, padding[0]:padding[0] + H, padding[1]:padding[1] + W] = x
    Ho = (H + 2 * padding[0] - kh) // stride[0] + 1
    Wo = (W + 2 * padding[1] - kw) // stride[1] + 1
    rows = []
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                patch = xp[n, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("b, n", [(40, 7), (7, 7), (5, 12), (1, 6)])
@pytest.mark.parametrize("lam", [0.1, 1.0, 3e-3])
def test_closed_form_equals_ridge_solution(b, n, lam):
    m, eta = 4, 0.3
    X = torch.randn(b, n, dtype=D, generator=gen(1))
    G = torch.randn(b, m, dtype=D, generator=gen(2))
    W = torch.randn(m, n, dtype=D, generator=gen(3))
    ref = ridge_solution(X, X @ W.T - eta * G, W, lam)
    for form in ("auto", "features", "batch"):
        for solver in ("solve", "cholesky", "inverse"):
            step = W - (eta / b) * tract_weight_grad(X, G, lam, form=form, solver=solver)
            torch.testing.assert_close(step, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("b, n", [(30, 5), (3, 20)])
def test_both_forms_agree_and_match_naive(b, n):
    X = torch.randn(b, n, dtype=D, generator=gen(4))
    G = torch.randn(b, 3, dtype=D, generator=gen(5))
    f = tract_weight_grad(X, G, 0.1, form="features")
    bt = tract_weight_grad(X, G, 0.1, form="batch")
    torch.testing.assert_close(f, bt, rtol=0, atol=1e-11)
    torch.testing.assert_close(tract_weight_grad(X, G, 0.1), naive_tract_grad(X, G, 0.1), rtol=1e-10, atol=1e-12)


def test_large_lambda_is_rescaled_ordinary_gradient():
    X = torch.randn(50, 6, dtype=D, generator=gen(6))
    G = torch.randn(50, 4, dtype=D, generator=gen(7))
    lam = 1e8
    for form in ("features", "batch"):
        torch.testing.assert_close(lam * tract_weight_grad(X, G, lam, form=form), G.T @ X, rtol=1e-6, atol=1e-9)


def test_zero_lambda_with_b_le_n_moves_preactivations_exactly():
    # b <= n, lambda = 0: the fitted weights reproduce the proposed pre-activations Z* = Z - eta' G exactly
    b, n, m, eta = 6, 10, 3, 0.5
    X = torch.randn(b, n, dtype=D, generator=gen(8))
    G = torch.randn(b, m, dtype=D, generator=gen(9))
    W = torch.randn(m, n, dtype=D, generator=gen(10))
    W2 = W - (eta / b) * tract_weight_grad(X, G, 0.0)
    torch.testing.assert_close(X @ W2.T, X @ W.T - eta * G, rtol=0, atol=1e-10)


def test_zero_lambda_preactivation_update_is_invariant_to_input_scale():
    # the paper's motivation: with lambda -> 0 the change of Z does not depend on the input's contrast
    X = torch.randn(40, 5, dtype=D, generator=gen(11))
    G = torch.randn(40, 3, dtype=D, generator=gen(12))
    dz = X @ tract_weight_grad(X, G, 0.0).T
    for c in (0.1, 7.0):
        torch.testing.assert_close((c * X) @ tract_weight_grad(c * X, G, 0.0).T, dz, rtol=1e-9, atol=1e-10)
    # while the ordinary gradient's change of Z scales with c^2
    torch.testing.assert_close((3 * X) @ (G.T @ (3 * X)).T, 9 * X @ (G.T @ X).T)


def test_empty_batch_gives_zero_gradient():
    out = tract_weight_grad(torch.zeros(0, 4), torch.zeros(0, 3), 0.1)
    assert out.shape == (3, 4) and bool((out == 0).all())


# ---------------------------------------------------------------------------------------- linear layer
def test_one_sgd_step_of_tractlinear_is_the_ridge_fit():
    # a smoke check: TrActLinear on a random regression batch
    b, n, m, lr, lam = 32, 8, 5, 0.05, 0.1
    X = torch.randn(b, n, dtype=D, generator=gen(13))
    Y = torch.randn(b, m, dtype=D, generator=gen(14))
    for bias in (False, True):
        layer = TrActLinear(n, m, bias=bias, lambda_=lam, dtype=D)
        W0 = layer.weight.detach().clone()
        b0 = None if layer.bias is None else layer.bias.detach().clone()
        opt = torch.optim.SGD(layer.parameters(), lr=lr)
        z = layer(X)
        loss = 0.5 * (z - Y).square().sum()
        G = (z - Y).detach()  # dL/dZ
        loss.backward()
        opt.step()
        ref = ridge_solution(X, X @ W0.T - lr * b * G, W0, lam)  # eta' = lr * b
        torch.testing.assert_close(layer.weight.detach(), ref, rtol=0, atol=1e-10)
        if bias:  # the bias takes the ordinary SGD step
            torch.testing.assert_close(layer.bias.detach(), b0 - lr * G.sum(0), rtol=0, atol=1e-12)


def test_linear_input_and_bias_gradients_match_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(6, 4).double()
    layer = tract(copy.deepcopy(ref))
    x1 = torch.randn(3, 5, 6, dtype=D, generator=gen(15), requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 4, dtype=D, generator=gen(16))
    y1, y2 = ref(x1), layer(x2)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-14, atol=1e-14)
    # every leading index is a row of X (b = 15)
    expected = naive_tract_grad(x1.detach().reshape(-1, 6), g.reshape(-1, 4), 0.1)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_linear_input_and_bias():
    x = torch.randn(7, 4, dtype=D, generator=gen(17), requires_grad=True)
    w = torch.randn(3, 4, dtype=D, generator=gen(18))
    bias = torch.randn(3, dtype=D, generator=gen(19), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: TrActLinearFn.apply(a, w, c, 0.1, "solve"), (x, bias))


class _LinearSurrogate(torch.autograd.Function):
    """Forward z = X M^-1 W^T (M fixed by X): its true W-gradient is TrAct's; backward runs TrActLinearFn."""

    @staticmethod
    def forward(x, w, lam):
        n = x.shape[1]
        return x @ torch.linalg.inv(x.T @ x / x.shape[0] + lam * torch.eye(n, dtype=x.dtype)) @ w.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.lam = inputs[2]

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            w_ = w.detach().requires_grad_()
            (gw,) = torch.autograd.grad(TrActLinearFn.apply(x, w_, None, ctx.lam, "solve"), w_, g)
        return None, gw, None


@pytest.mark.parametrize("b", [9, 2])
def test_gradcheck_linear_weight_against_surrogate(b):
    x = torch.randn(b, 4, dtype=D, generator=gen(20))
    w = torch.randn(3, 4, dtype=D, generator=gen(21), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _LinearSurrogate.apply(x, v, 0.1), (w,))


def test_tract_linear_function_form_and_1d_input():
    w = torch.randn(5, 8, requires_grad=True)
    tract_linear(torch.randn(8), w).sum().backward()  # one row: b = 1
    assert w.grad.shape == (5, 8) and bool(torch.isfinite(w.grad).all())


# ---------------------------------------------------------------------------------------- conv layer
@pytest.mark.parametrize("stride, padding, kernel", [((2, 2), (1, 1), (3, 3)), ((1, 2), (0, 1), (3, 2)),
                                                     ((1, 1), (1, 1), (3, 3))])
def test_conv_patches_match_explicit_unfolding(stride, padding, kernel):
    x = torch.randn(2, 3, 7, 6, dtype=D, generator=gen(22))
    p = conv2d_patches(x, kernel, stride, padding)
    assert torch.equal(p, naive_patches(x, kernel, stride, padding))
    ref = F.unfold(x, kernel, padding=padding, stride=stride).transpose(1, 2).reshape(p.shape)
    assert torch.equal(p, ref)


@pytest.mark.parametrize("stride, padding, kernel", [((2, 2), (1, 1), (3, 3)), ((1, 2), (0, 1), (3, 2)),
                                                     ((1, 1), (2, 0), (1, 3))])
def test_conv_second_moment_matches_patches(stride, padding, kernel):
    x = torch.randn(3, 2, 7, 6, dtype=D, generator=gen(33))
    X = naive_patches(x, kernel, stride, padding)
    mom = conv2d_second_moment(x, kernel, stride, padding)
    torch.testing.assert_close(mom, X.T @ X, rtol=1e-12, atol=1e-12)
    assert torch.equal(mom, mom.T)


@pytest.mark.parametrize("stride, padding, kernel", [(2, 1, 3), ((1, 2), (0, 1), (3, 2))])
def test_conv_weight_grad_matches_explicit_reference(stride, padding, kernel):
    torch.manual_seed(1)
    ref = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding).double()
    layer = tract(copy.deepcopy(ref), lambda_=0.2)
    x1 = torch.randn(2, 3, 7, 6, dtype=D, generator=gen(23), requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ref(x1), layer(x2)
    assert torch.equal(y1, y2)
    g = torch.randn(y1.shape, dtype=D, generator=gen(24))
    y1.backward(g)
    y2.backward(g)
    # input and bias gradients are nn.Conv2d's
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-13, atol=1e-13)
    s = layer.stride
    p = layer.padding
    X = naive_patches(x1.detach(), layer.kernel_size, s, p)
    G = g.permute(0, 2, 3, 1).reshape(-1, 5)  # rows (N, H_out, W_out)
    torch.testing.assert_close(layer.weight.grad.reshape(5, -1), naive_tract_grad(X, G, 0.2), rtol=1e-10,
                               atol=1e-12)
    # the ordinary gradient in the large-lambda limit, in the weight's (C, kh, kw) layout
    w = layer.weight
    w.grad = None
    layer.lambda_ = 1e9
    layer(x2).backward(g)
    torch.testing.assert_close(1e9 * w.grad, ref.weight.grad, rtol=1e-6, atol=1e-8)


def test_conv_batch_form_when_fewer_patches_than_features():
    # N * H_out * W_out = 2 patches < C * kh * kw = 36: the b x b system
    x = torch.randn(2, 4, 3, 3, dtype=D, generator=gen(25))
    w = torch.randn(3, 4, 3, 3, dtype=D, generator=gen(26), requires_grad=True)
    y = tract_conv2d(x, w, None, 1, 0, 0.1)
    g = torch.randn(y.shape, dtype=D, generator=gen(27))
    y.backward(g)
    X = naive_patches(x, (3, 3), (1, 1), (0, 0))
    torch.testing.assert_close(w.grad.reshape(3, -1), naive_tract_grad(X, g.reshape(2, 3), 0.1), rtol=1e-10,
                               atol=1e-12)


def test_gradcheck_conv_input_and_bias():
    x = torch.randn(2, 2, 5, 4, dtype=D, generator=gen(28), requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=D, generator=gen(29))
    bias = torch.randn(3, dtype=D, generator=gen(30), requires_grad=True)
    fn = lambda a, c: TrActConv2dFn.apply(a, w, c, (2, 1), (1, 1), 0.1, "solve")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias))


class _ConvSurrogate(torch.autograd.Function):
    """Forward: the conv with patches X M^-1 (M fixed by x); its true W-gradient is TrAct's."""

    @staticmethod
    def forward(x, w, stride, padding, lam):
        X = conv2d_patches(x, tuple(w.shape[2:]), stride, padding)
        n = X.shape[1]
        Xt = X @ torch.linalg.inv(X.T @ X / X.shape[0] + lam * torch.eye(n, dtype=x.dtype))
        ho = (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1
        wo = (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1
        return (Xt @ w.reshape(w.shape[0], -1).T).reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.args = inputs[2:]

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, lam = ctx.args
        with torch.enable_grad():
            w_ = w.detach().requires_grad_()
            (gw,) = torch.autograd.grad(TrActConv2dFn.apply(x, w_, None, stride, padding, lam, "solve"), w_, g)
        return None, gw, None, None, None


def test_gradcheck_conv_weight_against_surrogate():
    x = torch.randn(2, 2, 5, 4, dtype=D, generator=gen(31))
    w = torch.randn(3, 2, 3, 3, dtype=D, generator=gen(32), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _ConvSurrogate.apply(x, v, (2, 1), (1, 1), 0.1), (w,))


def test_conv_unbatched_input_and_padding_strings():
    conv = TrActConv2d(2, 4, 3, padding="same")
    y = conv(torch.randn(2, 6, 6))
    assert y.shape == (4, 6, 6)
    y.sum().backward()
    assert conv.weight.grad.shape == (4, 2, 3, 3)
    valid = TrActConv2d(2, 4, 3, padding="valid")
    assert valid(torch.randn(1, 2, 6, 6)).shape == (1, 4, 4, 4)


# ---------------------------------------------------------------------------------------- the wrapper
def test_tract_wrapper_shares_parameters_and_keeps_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    keys, conv = set(model.state_dict()), model[0]
    buf = opt.state[conv.weight]["momentum_buffer"].clone()
    model[0] = tract(model[0], lambda_=0.1)
    assert isinstance(model[0], TrActConv2d) and model[0].weight is conv.weight and model[0].bias is conv.bias
    assert set(model.state_dict()) == keys and torch.equal(model[0](x), conv(x))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = conv.weight.grad.clone()
    w0 = conv.weight.detach().clone()
    opt.step()  # the momentum buffer from before the conversion is used
    torch.testing.assert_close(conv.weight.detach(), w0 - 0.1 * (0.9 * buf + g))
    model.eval()
    assert not tract(model[3]).training and tract(model[3]).weight is model[3].weight


def test_tract_of_tract_layer_and_no_bias_and_repr():
    lin = nn.Linear(4, 2, bias=False)
    t1 = tract(lin, lambda_=0.5)
    t2 = tract(t1, lambda_=2.0, solver="cholesky")
    assert t2.weight is lin.weight and t2.bias is None and t2.lambda_ == 2.0 and t2.solver == "cholesky"
    assert "lambda_=2" in repr(t2) and "solver='cholesky'" in repr(t2)
    assert t1.lambda_ == 0.5
    conv = TrActConv2d(3, 4, 3, lambda_=0.3, bias=False)
    assert "lambda_=0.3" in repr(conv) and tract(conv).bias is None


def test_no_grad_forward_is_plain_and_eval_accuracy_path():
    layer = TrActLinear(5, 3)
    x = torch.randn(4, 5)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    conv = TrActConv2d(2, 3, 3, stride=2, padding=1)
    xc = torch.randn(2, 2, 7, 7)
    with torch.no_grad():
        assert torch.equal(conv(xc), F.conv2d(xc, conv.weight, conv.bias, 2, 1))


def test_lambda_is_a_schedulable_attribute():
    layer = TrActLinear(4, 2, lambda_=0.1)
    layer.lambda_ = torch.tensor(0.5)
    assert layer.lambda_ == 0.5
    x = torch.randn(10, 4, dtype=torch.float32)
    layer(x).sum().backward()
    expected = naive_tract_grad(x.double(), torch.ones(10, 2, dtype=D), 0.5).float()
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    torch.manual_seed(0)
    ref = nn.Linear(6, 3)
    x = torch.randn(32, 6)
    layer = tract(copy.deepcopy(ref).to(dtype))
    layer(x.to(dtype)).float().square().sum().backward()
    assert layer.weight.grad.dtype == dtype and bool(torch.isfinite(layer.weight.grad).all())
    ref32 = tract(ref)
    ref32(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad.float(), ref32.weight.grad, rtol=0.1, atol=0.05)
    conv = TrActConv2d(2, 3, 3, padding=1).to(dtype)
    conv(torch.randn(2, 2, 5, 5).to(dtype)).float().sum().backward()
    assert conv.weight.grad.dtype == dtype and bool(torch.isfinite(conv.weight.grad).all())


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("lam, exc, match", [
    (-0.1, ValueError, r"lambda_ must be finite and >= 0, got -0.1"),
    (float("nan"), ValueError, r"lambda_ must be finite and >= 0, got nan"),
    (float("inf"), ValueError, r"lambda_ must be finite"),
    (True, TypeError, r"lambda_ must be a real number"),
    ("0.1", TypeError, r"lambda_ must be a real number"),
])
def test_bad_lambda(lam, exc, match):
    X, G = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(exc, match=match):
        tract_weight_grad(X, G, lam)
    with pytest.raises(exc, match=match):
        TrActLinear(3, 2, lambda_=lam)
    with pytest.raises(exc, match=match):
        TrActConv2d(1, 2, 3, lambda_=lam)
    with pytest.raises(exc, match=match):
        tract(nn.Linear(3, 2), lambda_=lam)
    layer = TrActLinear(3, 2)
    with pytest.raises(exc, match=match):
        layer.lambda_ = lam
    with pytest.raises(exc, match=match):
        tract_linear(torch.randn(2, 3), layer.weight, None, lam)


def test_bad_weight_grad_arguments():
    X, G = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"X must be 2-D \(rows, features\), got shape \(5,\)"):
        tract_weight_grad(torch.randn(5), G)
    with pytest.raises(ValueError, match=r"same number of rows b, got X \(5, 3\) and G \(4, 2\)"):
        tract_weight_grad(X, torch.randn(4, 2))
    with pytest.raises(ValueError, match="X must be finite"):
        tract_weight_grad(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="G must be finite"):
        tract_weight_grad(X, torch.full((5, 2), float("inf")))
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        tract_weight_grad([[1.0]], G)
    with pytest.raises(TypeError, match="G must be a floating-point tensor"):
        tract_weight_grad(X, torch.ones(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="solver must be one of"):
        tract_weight_grad(X, G, solver="qr")
    with pytest.raises(ValueError, match="form must be one of"):
        tract_weight_grad(X, G, form="dual")


def test_singular_system_with_zero_lambda_raises():
    X = torch.ones(6, 3)  # rank 1
    G = torch.randn(6, 2)
    for solver in ("solve", "cholesky", "inverse"):
        with pytest.raises(ValueError, match="lambda_ > 0"):
            tract_weight_grad(X, G, 0.0, solver=solver, form="features")


def test_nonfinite_layer_input_raises_in_backward():
    layer = TrActLinear(3, 2)
    x = torch.randn(4, 3)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite values"):
        layer(x).sum().backward()
    conv = TrActConv2d(1, 2, 3)
    xc = torch.randn(2, 1, 5, 5)
    xc[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        conv(xc).sum().backward()


def test_bad_layer_inputs_and_configs():
    layer = TrActLinear(3, 2)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 3\)"):
        layer(torch.randn(4, 5))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    conv = TrActConv2d(2, 4, 3)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 2, H, W\)"):
        conv(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"input must have shape \(N, 2, H, W\)"):
        conv(torch.randn(6, 6))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv(torch.randn(1, 2, 2, 6))
    with pytest.raises(ValueError, match="groups=1 only"):
        TrActConv2d(2, 4, 3, groups=2)
    with pytest.raises(ValueError, match="dilation=1 only"):
        TrActConv2d(2, 4, 3, dilation=2)
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        TrActConv2d(2, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="odd kernel sizes"):
        TrActConv2d(2, 4, 2, padding="same")
    with pytest.raises(ValueError, match="solver must be one of"):
        TrActLinear(3, 2, solver="lu")
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        tract_conv2d(torch.randn(1, 2, 5, 5), w, stride=0)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        tract_conv2d(torch.randn(1, 2, 5, 5), w, padding=(1, 2, 3))
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \(4,\)"):
        tract_conv2d(torch.randn(1, 2, 5, 5), w, bias=torch.zeros(3))


def test_tract_rejects_other_modules():
    from gradkit.nn.binary import BinaryLinear

    with pytest.raises(TypeError, match="got Conv1d"):
        tract(nn.Conv1d(2, 3, 3))
    with pytest.raises(TypeError, match="got BinaryLinear"):
        tract(BinaryLinear(4, 2))
    with pytest.raises(TypeError, match="got LazyLinear"):
        tract(nn.LazyLinear(3))
    with pytest.raises(TypeError, match="got str"):
        tract("conv1")
    with pytest.raises(ValueError, match="groups=1 only"):
        tract(nn.Conv2d(2, 4, 3, groups=2))


# ---------------------------------------------------------------------------------------- claim
@pytest.fixture(scope="module")
def claim():
    import gradkit.harness.claims.tract  # noqa: F401  (registers the claim)
    from gradkit.harness.claims import CLAIMS

    return CLAIMS.get("tract")


@pytest.fixture(scope="module")
def smoke_out(smoke_run):
    threads = torch.get_num_threads()
    out = smoke_run("tract")
    assert torch.get_num_threads() == threads
    return out


def test_claim_registered(claim):
    from gradkit.harness.claims.tract import ARMS

    assert claim.arxiv == "2410.23970" and claim.primary.ours == "tract_x1" and claim.primary.baseline == "base_x2"
    assert [v.name for v in claim.variants] == ["cifar10"] and "test_acc" in claim.plots
    assert claim.resolve(None).control == {"tract_x1": "base_x1", "tract_x2": "base_x2", "tract_x4": "base_x4"}
    assert "gradkit.nn.tract.tract" in claim.uses
    assert set(ARMS) == {"tract_x1", "tract_x2", "tract_x4", "base_x1", "base_x2", "base_x4", "base_x8"}
    assert set(claim.arms) == set(ARMS)


def test_claim_smoke(claim, smoke_out):
    out = smoke_out
    assert claim.protocol.at("smoke").e0 == 1
    for arm, m in out.metrics.items():
        assert m["train_loss"] < 5
        assert len(out.curves["test_acc"][arm]) == int(m["epochs"])
    assert {a: int(m["epochs"]) for a, m in out.metrics.items()} == {
        "tract_x1": 1, "tract_x2": 2, "tract_x4": 4, "base_x1": 1, "base_x2": 2, "base_x4": 4, "base_x8": 8}
    losses = out.curves["train_loss"]["tract_x2"]  # 2 epochs with TrAct lower the loss
    assert losses[1] < losses[0]
    assert out.info["n_train"] == claim.protocol.at("smoke").n_train
    ok, checks = claim.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 3 and checks[0].description.startswith("at least 2 of")


def test_claim_criterion_two_of_three():
    from gradkit.harness.claims.tract import _criterion

    def metrics(t1, t2, t4, b8):
        acc = {"tract_x1": t1, "tract_x2": t2, "tract_x4": t4, "base_x1": 90, "base_x2": 95, "base_x4": 97,
               "base_x8": b8}
        return {a: {"test_acc": float(v)} for a, v in acc.items()}

    crit = _criterion()
    assert crit.evaluate([metrics(94.8, 96.8, 97.0, 99.0)])[0]  # x1 and x2 hold (within 0.3), x4 fails
    assert not crit.evaluate([metrics(94.0, 96.8, 97.0, 99.0)])[0]  # only one holds
    assert not crit.evaluate([metrics(95.0, 97.0, 96.4, 96.0)])[0]  # 3/3, but x4 trails base_x4 by 0.6
    assert crit.evaluate([metrics(95.0, 97.0, 97.0, 97.0)])[0]
    assert not crit.evaluate([metrics(float("nan"), 97.0, 97.0, 97.0)])[0]  # a non-finite metric fails the seed
    ok, checks = crit.evaluate([metrics(95.0, 97.0, 97.0, 97.0), metrics(94.0, 96.0, 97.0, 97.0)])
    assert not ok and checks[0].detail.startswith("1/3 hold")  # seed means: 94.5 vs 95 and 96.5 vs 97 fail


def test_claim_data_is_contrast_varied_and_fixed(claim):
    from gradkit.harness.claims.tract import contrast_digits

    a, b = contrast_digits(), contrast_digits()
    assert torch.equal(a.x_train, b.x_train) and a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape[0] == 360
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-3  # one global mean/std
    plain = contrast_digits(contrast=None)
    ratio = a.x_train.flatten(1).std(1) / plain.x_train.flatten(1).std(1)
    assert float(ratio.max() / ratio.min()) > 3  # contrast factors span [0.3, 1.5]


def test_claim_rerun_bit_identical(claim, smoke_out):
    from gradkit.harness.claims import RunContext

    again = claim.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_out.metrics and again.curves == smoke_out.curves


def test_claim_real_data_smoke_is_stored_under_the_data_it_used(claim, data_root, smoke_run):
    if (data_root / "cifar-10-batches-py").is_dir():
        pytest.skip("needs no CIFAR-10 under the real data folder")
    expect = "fashion_mnist" if (data_root / "fashion_mnist").is_dir() else "mnist"
    if not (data_root / expect).is_dir():
        pytest.skip("needs Fashion-MNIST or MNIST under the real data folder")
    out = smoke_run("tract", data_root=data_root)
    assert out.data == expect and out.info["n_train"] == claim.variants[0].protocol.at("smoke").n_train
    assert out.info["protocol"] == claim.variants[0].protocol.at("smoke").asdict()


def test_claim_missing_real_data_raises(claim, tmp_path):
    from gradkit.harness.claims import RunContext
    from gradkit.data import DataError

    with pytest.raises(DataError, match="CIFAR-10 .*Fashion-MNIST .* or MNIST"):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def _write_fake_cifar(root: Path, n: int = 8) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, size=(n, 3072)).astype(np.uint8),
                 b"labels": list(rng.randint(0, 10, size=n))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)


def test_real_data_loader_reads_cifar10_layout(tmp_path):
    from gradkit.harness.claims.tract import _real_images, build_cnn

    _write_fake_cifar(tmp_path)
    s = _real_images(tmp_path, n_train=30, n_test=5)
    assert s.name == "cifar10" and s.x_train.shape == (30, 3, 32, 32) and s.x_test.shape == (5, 3, 32, 32)
    assert abs(float(s.x_train.mean())) < 1e-4
    assert build_cnn(3, 32)(s.x_test).shape == (5, 10)


def test_real_data_loader_prefers_fashion_mnist_then_mnist(data_root, tmp_path):
    from gradkit.harness.claims.tract import _real_images

    for name in ("fashion_mnist", "mnist"):
        if not (data_root / name).is_dir():
            continue
        only = tmp_path / name
        only.mkdir()
        (only / name).symlink_to(data_root / name, target_is_directory=True)
        s = _real_images(only, n_train=100, n_test=50)
        assert s.name == name and s.x_train.shape == (100, 1, 28, 28) and s.y_test.shape == (50,)
    if not any((data_root / n).is_dir() for n in ("fashion_mnist", "mnist")):
        pytest.skip("real Fashion-MNIST / MNIST files not present")


# ---------------------------------------------------------------------------------------- benchmark, docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.tract  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("tract-first-conv-step-digits")
    assert b.slug == "tract" and b.target == 1.10
    assert BENCHMARKS.get("tract-first-conv-step-cifar").target == 1.10
    r = b.run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    x = torch.randn(4, 3, 8, 8, dtype=D)
    cpu = tract(copy.deepcopy(conv))
    gpu = tract(copy.deepcopy(conv).cuda())
    cpu(x).square().sum().backward()
    gpu(x.cuda()).square().sum().backward()
    assert gpu.weight.grad.device.type == "cuda"
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-9, atol=1e-10)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    model[0] = tract(model[0])
    x = torch.randn(8, 1, 8, 8)
    model(x).sum().backward()
    eager = model[0].weight.grad.clone()
    model.zero_grad()
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager, rtol=1e-5, atol=1e-6)
