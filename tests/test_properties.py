"""Property tests: the public functional and optim entry points turn finite inputs into finite
outputs and gradients (no silent NaN), over shapes and values that hypothesis draws."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import gradkit.functional as F  # noqa: E402
import gradkit.optim as O  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def floats(lo, hi):
    return st.floats(lo, hi, allow_subnormal=False)
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                   width=64)  # some libraries flush subnormals to zero process-wide


@st.composite
def matrices(draw, rows=(1, 6), cols=(1, 6), elements=finite):
    n = draw(st.integers(*rows))
    d = draw(st.integers(*cols))
    vals = draw(st.lists(elements, min_size=n * d, max_size=n * d))
    return torch.tensor(vals, dtype=torch.float64).reshape(n, d)


def _all_finite(*ts):
    return all(t is None or bool(torch.isfinite(t).all()) for t in ts)


def _fwd_bwd(fn, *inputs):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return out.detach(), [x.grad for x in leaves]


@SETTINGS
@given(matrices(), floats(-10, 10))
def test_gradient_reversal_and_scaling(x, k):
    for fn in (lambda t: F.grad_reverse(t, k), lambda t: F.grad_scale(t, k)):
        out, (g,) = _fwd_bwd(fn, x)
        assert _all_finite(out, g)


@SETTINGS
@given(matrices(), floats(1.0, 6.0), floats(1.0, 3.0), floats(0.01, 1.0), floats(0.1, 5.0))
def test_sign_estimators(x, o, t, interval, clip):
    fns = [lambda v: F.reste_sign(v, o, t, interval), lambda v: F.ste_sign(v, clip), F.approx_sign,
           lambda v: F.biper_binarize(v, 20.0), lambda v: F.power_surrogate(v, o)]
    if x.shape[1] >= 2:
        fns.append(lambda v: F.norm_approx_sign(v))
    else:  # a variance over one element: a clear error, not a NaN
        with pytest.raises(ValueError, match="needs >= 2 elements"):
            F.norm_approx_sign(x)
    for fn in fns:
        out, (g,) = _fwd_bwd(fn, x)
        assert _all_finite(out, g)
    assert _all_finite(F.reste_derivative(x, o, t, interval), F.ste_derivative(x, clip))


@SETTINGS
@given(matrices(rows=(1, 6), cols=(2, 5)), st.integers(1, 4), floats(1e-3, 10.0))
def test_tract_linear(x, d_out, lam):
    w = torch.linspace(-1, 1, d_out * x.shape[1], dtype=x.dtype).reshape(d_out, x.shape[1])
    b = torch.zeros(d_out, dtype=x.dtype)
    out, grads = _fwd_bwd(lambda xx, ww, bb: F.tract_linear(xx, ww, bb, lambda_=lam), x, w, b)
    assert _all_finite(out, *grads)


@SETTINGS
@given(matrices(rows=(1, 6), cols=(1, 6)))
def test_quantized_ops_save_finite_codes(x):
    # a constant tensor has a zero range: the quantiser must not divide by it
    for t in (x, torch.full_like(x, float(x.flatten()[0]))):
        for fn in (lambda v: F.q_gelu(v, F.ActQuantizer()), lambda v: F.q_softmax(v, -1, F.ActQuantizer()),
                   lambda v: F.q_layer_norm(v, (v.shape[-1],), quantizer=F.ActQuantizer())):
            out, (g,) = _fwd_bwd(fn, t.float())
            assert _all_finite(out, g)


@SETTINGS
@given(matrices(rows=(1, 4), cols=(1, 4)), floats(0.0, 3.0), floats(0.0, 3.0))
def test_modulated_fusion(x, c1, c2):
    phis = [x * 0.5, -x]
    out, grads = _fwd_bwd(lambda f, p1, p2: F.modulated_fusion(f, [p1, p2], [c1, c2]), x, *phis)
    assert _all_finite(out, *grads)


@SETTINGS
@given(matrices(rows=(1, 1), cols=(1, 8)), matrices(rows=(1, 1), cols=(1, 8)), st.booleans())
def test_orthogonal_combine_even_for_zero_gradients(a, b, zero):
    d = min(a.shape[1], b.shape[1])
    g_main, g_aux = a[0, :d], b[0, :d]
    if zero:
        g_main = torch.zeros_like(g_main)
    out = O.orthogonal_combine(g_main, g_aux)
    assert _all_finite(out)
    if float(g_main.norm()) > 1e-6:  # the auxiliary part that is kept is orthogonal to the main gradient
        perp = out - g_main
        assert abs(float(perp @ g_main)) <= 1e-6 * float(g_main.norm()) * max(float(perp.norm()), 1.0)


@SETTINGS
@given(matrices(rows=(2, 12), cols=(1, 5)), st.integers(1, 4), st.integers(0, 2))
def test_robust_aggregations(g, k, c):
    k = min(k, g.shape[0])
    c = min(c, (g.shape[0] - 1) // 2)
    assert _all_finite(O.median_of_means(g, k), O.winsorized_mean(g, c))


def _step(opt_factory, grad):
    p = torch.nn.Parameter(torch.linspace(-1, 1, grad.numel(), dtype=grad.dtype).reshape(grad.shape))
    opt = opt_factory([p])
    for _ in range(3):
        opt.zero_grad()
        p.grad = grad.clone()
        opt.step()
    return p.detach()


@SETTINGS
@given(matrices(rows=(1, 4), cols=(1, 4)), st.booleans())
def test_optimizer_steps_stay_finite_even_on_zero_gradients(g, zero):
    if zero:
        g = torch.zeros_like(g)
    factories = [
        lambda ps: O.TransformedOptimizer(torch.optim.SGD(ps, lr=0.1),
                                          [O.GradientNoise(eta=0.01, generator=torch.Generator().manual_seed(0))]),
        lambda ps: O.MFAC(ps, lr=0.01, ngrads=4),
        lambda ps: O.NormalizedGD(ps, lr=0.1),
    ]
    for make in factories:
        assert _all_finite(_step(make, g)), make
