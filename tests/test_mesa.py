"""Tests of Mesa (paper slug: mesa): quantiser math, Q*Fn backwards, saved bytes, modules, converter, claim, docs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.functional.compressed import (ActQuantizer, QGELUFn, QLayerNormFn, QLinearFn, QMatMulFn, QSoftmaxFn,
                                           dequantize, group_range, q_gelu, q_layer_norm, q_linear, q_matmul,
                                           q_softmax, quantize)
from gradkit.nn.mesa import (MesaAttention, MesaGELU, MesaLayerNorm, MesaLinear, MesaMatMul, MesaSoftmax, MesaViT,
                             mesa_convert, set_mesa_enabled)
from gradkit.testing import SavedBytesMeter

REPO = Path(__file__).resolve().parent.parent
D = torch.float64


def _q(bits=8, groups=1, group_dim=-1, stochastic=True):
    return ActQuantizer(bits=bits, groups=groups, group_dim=group_dim, stochastic=stochastic).double()


# ------------------------------------------------------------------------------------------ quantiser
def naive_quantize(x, alpha, beta, bits, u):
    """Element-wise reference for one group."""
    s = (2 ** bits - 1) / max(abs(alpha), 1e-8)
    return min(max(math.floor((x - beta) * s + u), 0), 2 ** bits - 1)


def test_quantize_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=D, generator=g)
    alpha, beta = torch.tensor([2.0, 3.0], dtype=D), torch.tensor([-1.0, -1.5], dtype=D)
    codes = quantize(x, alpha, beta, bits=8, groups=2, group_dim=-1, stochastic=True,
                     generator=torch.Generator().manual_seed(5))
    u = torch.rand(3, 2, 4, dtype=D, generator=torch.Generator().manual_seed(5)).reshape(3, 8)
    for i in range(3):
        for j in range(8):
            grp = j // 4
            ref = naive_quantize(float(x[i, j]), float(alpha[grp]), float(beta[grp]), 8, float(u[i, j]))
            assert int(codes[i, j]) == ref
    assert codes.dtype == torch.uint8


@pytest.mark.parametrize("shape,groups,gdim", [((2, 5, 12), 3, -1), ((4, 12), 4, -1), ((2, 4, 5, 6), 4, 1),
                                               ((2, 4, 5, 6), 2, 1), ((2, 4, 5, 6), 1, 1)])
def test_grouping_round_trip(shape, groups, gdim):
    """Values on the grid survive pack/unpack exactly; groups < H and == H; (B,N,C), (B,C), (B,H,N,D)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
    alpha = torch.rand(groups, dtype=D, generator=g) + 0.5
    beta = torch.randn(groups, dtype=D, generator=g)
    x = dequantize(codes.to(torch.uint8), alpha, beta, bits=8, groups=groups, group_dim=gdim, dtype=D)
    back = quantize(x, alpha, beta, bits=8, groups=groups, group_dim=gdim, stochastic=False)
    assert torch.equal(back.long(), codes)
    q = _q(8, groups, gdim, stochastic=False)
    c, a, b = q.pack(x)
    err = (q.unpack(c, a, b) - x).abs().max()
    assert err <= (a.abs().max() / 255) / 2 + 1e-12


def test_stochastic_rounding_unbiased():
    x = torch.full((2000,), 0.3137, dtype=D)
    alpha, beta = torch.tensor([1.0], dtype=D), torch.tensor([0.0], dtype=D)
    torch.manual_seed(0)
    c = quantize(x, alpha, beta, bits=4, stochastic=True)
    xh = dequantize(c, alpha, beta, bits=4, dtype=D)
    step = 1 / 15
    sigma = step / 2 / math.sqrt(len(x))  # upper bound of the std of the mean
    assert abs(float(xh.mean()) - 0.3137) < 4 * sigma
    assert set(xh.unique().tolist()) <= {4 * step, 5 * step}


def test_codes_clamped_far_outside_range():
    q = ActQuantizer(bits=8)
    q.pack(torch.linspace(0, 1, 100))  # calibrates alpha=1, beta=0
    q.eval()
    c, a, b = q.pack(torch.tensor([-50.0, 0.5, 1.0, 7.0, 1e6]))
    assert c.tolist()[0] == 0 and c.tolist()[3] == 255 and c.tolist()[4] == 255  # no wrap-around
    assert torch.allclose(q.unpack(c, a, b)[[0, 3]], torch.tensor([0.0, 1.0]))


def test_ema_updates_only_in_training_and_in_state_dict():
    q = ActQuantizer(groups=2, ema_decay=0.9)
    q.pack(torch.tensor([[0.0, 2.0, 0.0, 4.0]]))
    assert torch.allclose(q.alpha, torch.tensor([2.0, 4.0])) and torch.allclose(q.beta, torch.zeros(2))
    q.pack(torch.tensor([[-1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(q.alpha, torch.tensor([0.9 * 2 + 0.1 * 2, 0.9 * 4 + 0.1 * 0]))
    assert torch.allclose(q.beta, torch.tensor([-0.1, 0.1]))
    q.eval()
    before = q.alpha.clone()
    q.pack(torch.randn(3, 4) * 100)
    assert torch.equal(q.alpha, before)
    sd = q.state_dict()
    assert {"alpha", "beta", "initialized"} <= set(sd) and not list(q.parameters())


def test_zero_range_group_is_finite():
    q = ActQuantizer(groups=2)
    x = torch.tensor([[3.0, 3.0, 0.0, 1.0]])
    c, a, b = q.pack(x)
    xh = q.unpack(c, a, b)
    assert torch.isfinite(xh).all() and torch.allclose(xh[0, :2], torch.tensor([3.0, 3.0]))


def test_sixteen_bits_uses_int16():
    q = ActQuantizer(bits=16, stochastic=False)
    x = torch.randn(100, dtype=D)
    c, a, b = q.pack(x)
    assert c.dtype == torch.int16
    assert (q.unpack(c, a, b, dtype=D) - x).abs().max() <= float(a) / 65535


def test_group_range():
    x = torch.arange(12.0).reshape(1, 2, 6)
    r, m = group_range(x, groups=3, group_dim=-1)
    assert r.tolist() == [7.0, 7.0, 7.0] and m.tolist() == [0.0, 2.0, 4.0]


# ------------------------------------------------------------------------------------------ Functions
def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_exact_path_float64():
    """With no quantiser the Functions save the exact tensor: their backward is the true Jacobian."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=D, generator=g, requires_grad=True)  # noqa: E731
    _gc(lambda x, w, b: QLinearFn.apply(x, w, b, None), r(2, 3, 4), r(5, 4), r(5))
    _gc(lambda x: QGELUFn.apply(x, None, "none"), r(3, 4))
    _gc(lambda x: QGELUFn.apply(x, None, "tanh"), r(3, 4))
    _gc(lambda x: QSoftmaxFn.apply(x, -1, None), r(2, 3, 4))
    _gc(lambda a, b: QMatMulFn.apply(a, b, None, None), r(2, 3, 4), r(2, 4, 5))
    _gc(lambda x, w, b: QLayerNormFn.apply(x, (4,), w, b, 1e-5, None), r(2, 3, 4), r(4), r(4))


def test_gradcheck_sixteen_bit_deterministic():
    """16-bit codes: the backward is the exact one up to the 2^-16 grid (loose tolerance)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=D, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=D, generator=g, requires_grad=True)
    q = ActQuantizer(bits=16, stochastic=False)
    assert torch.autograd.gradcheck(lambda x, w: QLinearFn.apply(x, w, None, q), (x, w), eps=1e-6, atol=1e-3,
                                    nondet_tol=1e-3)


def _xhat_of(q, x):
    c, a, b = q.pack(x, update=False)
    return q.unpack(c, a, b, dtype=x.dtype)


@pytest.mark.parametrize("op", ["linear", "gelu", "softmax", "matmul", "layernorm"])
def test_backward_equals_exact_backward_at_xhat(op):
    """Each Q*Fn backward equals autograd of the plain op evaluated at the dequantised saved tensor."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 8, dtype=D, generator=g, requires_grad=True)
    gout_gen = torch.Generator().manual_seed(4)
    q = _q(8, 4, 1, stochastic=False)
    q.pack(x)  # calibrate (then deterministic: the same codes in forward and in the reference)
    q.eval()
    if op == "linear":
        w = torch.randn(3, 8, dtype=D, generator=g, requires_grad=True)
        bias = torch.randn(3, dtype=D, generator=g, requires_grad=True)
        y = q_linear(x, w, bias, q)
        gy = torch.randn(y.shape, dtype=D, generator=gout_gen)
        got = torch.autograd.grad(y, (x, w, bias), gy)
        xh = _xhat_of(q, x.detach()).requires_grad_()
        ref = torch.autograd.grad(F.linear(xh, w, bias), (xh, w, bias), gy)
    elif op == "gelu":
        y = q_gelu(x, q)
        gy = torch.randn(y.shape, dtype=D, generator=gout_gen)
        got = torch.autograd.grad(y, (x,), gy)
        xh = _xhat_of(q, x.detach()).requires_grad_()
        ref = torch.autograd.grad(F.gelu(xh), (xh,), gy)
    elif op == "softmax":
        y = q_softmax(x, -1, q)
        gy = torch.randn(y.shape, dtype=D, generator=gout_gen)
        got = torch.autograd.grad(y, (x,), gy)
        yh = _xhat_of(q, torch.softmax(x.detach(), -1))
        ref = (yh * (gy - (gy * yh).sum(-1, keepdim=True)),)
    elif op == "matmul":
        b = torch.randn(2, 4, 8, 3, dtype=D, generator=g, requires_grad=True)
        qb = _q(8, 4, 1, stochastic=False)
        qb.pack(b)
        qb.eval()
        y = q_matmul(x, b, q, qb)
        gy = torch.randn(y.shape, dtype=D, generator=gout_gen)
        got = torch.autograd.grad(y, (x, b), gy)
        ah, bh = _xhat_of(q, x.detach()), _xhat_of(qb, b.detach())
        ref = (gy @ bh.transpose(-2, -1), ah.transpose(-2, -1) @ gy)
    else:
        w = torch.randn(8, dtype=D, generator=g, requires_grad=True)
        bias = torch.randn(8, dtype=D, generator=g, requires_grad=True)
        q = _q(8, 2, -1, stochastic=False)
        q.pack(x)
        q.eval()
        y = q_layer_norm(x, 8, w, bias, 1e-5, q)
        gy = torch.randn(y.shape, dtype=D, generator=gout_gen)
        got = torch.autograd.grad(y, (x, w, bias), gy)
        # reference: LN backward at x_hat with mean/rstd of the exact x (the paper keeps them exact)
        xd = x.detach()
        mean = xd.mean(-1, keepdim=True)
        rstd = (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        xn = (_xhat_of(q, xd) - mean) * rstd
        gxn = gy * w.detach()
        gx = rstd * (gxn - gxn.mean(-1, keepdim=True) - xn * (gxn * xn).mean(-1, keepdim=True))
        ref = (gx, (gy * xn).sum((0, 1, 2)), gy.sum((0, 1, 2)))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_linear_bias_grad_sums_all_leading_dims():
    x = torch.randn(2, 3, 4, requires_grad=True)
    layer = MesaLinear(4, 5)
    layer(x).sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((5,), 6.0))


def test_on_grid_inputs_give_exact_grads():
    """stochastic=False and inputs on the quantisation grid: gradient equals the exact one."""
    torch.manual_seed(0)
    layer = MesaLinear(8, 3, stochastic=False, groups=2)
    codes = torch.randint(0, 256, (16, 8))
    codes[0] = 0
    codes[1] = 255  # pins each group's min/max so the calibrated range is the grid's
    x = codes.float() / 255 * 2 - 1
    layer(x).sum().backward()
    got = layer.weight.grad.clone()
    layer.weight.grad = None
    F.linear(x, layer.weight, layer.bias).sum().backward()
    assert torch.allclose(got, layer.weight.grad, atol=1e-6)


def test_gradient_fidelity_improves_with_bits_and_cosine_high():
    torch.manual_seed(0)
    x, y = torch.rand(32, 64), torch.randint(0, 10, (32,))
    errs, cos_min = [], None
    for bits in (4, 6, 8):
        torch.manual_seed(0)
        m = MesaViT(depth=2, bits=bits)
        set_mesa_enabled(m, False)
        ex = torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
        set_mesa_enabled(m, True)
        ap = torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
        e, a = torch.cat([g.flatten() for g in ex]), torch.cat([g.flatten() for g in ap])
        errs.append(float((a - e).norm() / e.norm()))
        if bits == 8:
            cos_min = min(float(F.cosine_similarity(p.flatten(), q.flatten(), dim=0)) for p, q in zip(ap, ex))
    assert errs[0] > 2 * errs[1] > 4 * errs[2]  # roughly x4 per 2 bits
    assert cos_min >= 0.99 and errs[2] < 0.05


def test_sixteen_bits_relative_error_tiny():
    torch.manual_seed(0)
    x, y = torch.rand(16, 64), torch.randint(0, 10, (16,))
    m = MesaViT(depth=1, bits=16)
    set_mesa_enabled(m, False)
    ex = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))])
    set_mesa_enabled(m, True)
    ap = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))])
    assert float((ap - ex).norm() / ex.norm()) < 1e-3


# ------------------------------------------------------------------------------------------ saved bytes
def test_saved_bytes_exact_per_layer():
    """Exactly one byte per element (plus the small alpha/beta snapshots) is saved for the input."""
    x = torch.randn(8, 16, 32)
    layer = MesaLinear(32, 10, groups=4)
    with SavedBytesMeter() as m:
        layer(x).sum()
    assert m.bytes == x.numel() + 2 * 4 * 4  # uint8 codes + alpha, beta (4 groups, float32)
    ref = nn.Linear(32, 10)
    with SavedBytesMeter() as m2:
        ref(x).sum()
    assert m2.bytes == 4 * x.numel()  # plain Linear saves the fp32 input
    sm = MesaSoftmax(-1, groups=4, group_dim=1)
    s = torch.randn(2, 4, 5, 5, requires_grad=True)
    with SavedBytesMeter() as m3:
        sm(s)
    assert m3.bytes == s.numel() + 2 * 4 * 4


def test_vit_saved_bytes_ratio():
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    out = []
    for enabled in (False, True):
        torch.manual_seed(0)
        m = MesaViT(depth=2, enabled=enabled)
        with SavedBytesMeter() as meter:
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        out.append(meter.bytes)
    assert out[1] / out[0] < 0.30


# ------------------------------------------------------------------------------------------ modules, converter
def test_modules_plain_in_eval_and_disabled():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for mod, ref in ((MesaLinear(8, 4), None), (MesaGELU(), nn.GELU()), (MesaLayerNorm(8), None),
                     (MesaSoftmax(-1, group_dim=-1), nn.Softmax(-1))):
        if ref is None:
            ref = (nn.Linear(8, 4) if isinstance(mod, MesaLinear) else nn.LayerNorm(8))
            ref.load_state_dict({k: v for k, v in mod.state_dict().items() if "quantizer" not in k})
        torch.testing.assert_close(mod(x), ref(x))  # forward is exact in training too
        mod.eval()
        with SavedBytesMeter():
            torch.testing.assert_close(mod(x), ref(x))
    mm = MesaMatMul(groups=2)
    a, b = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 5, 3)
    torch.testing.assert_close(mm(a, b), a @ b)


def test_attention_disabled_equals_enabled_forward_and_mha():
    torch.manual_seed(0)
    attn = MesaAttention(16, heads=4, groups=2)
    x = torch.randn(3, 7, 16)
    y1 = attn(x)
    set_mesa_enabled(attn, False)
    torch.testing.assert_close(attn(x), y1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], y1, rtol=1e-5, atol=1e-5)


def test_converter_swaps_and_keeps_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 4)),
                          nn.Softmax(-1))
    params = [p for p in model.parameters()]
    x = torch.randn(5, 16)
    ref = model(x)
    mesa_convert(model, groups=4)
    assert [type(m).__name__ for m in (model[0], model[1], model[2][0], model[2][1], model[3])] == \
        ["MesaLinear", "MesaGELU", "MesaLayerNorm", "MesaLinear", "MesaSoftmax"]
    assert all(a is b for a, b in zip(params, model.parameters()))
    torch.testing.assert_close(model(x), ref)
    model(x)[:, 0].sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    m2 = mesa_convert(nn.Sequential(nn.Linear(4, 4), nn.GELU()), policy={"gelu": False})
    assert type(m2[1]) is nn.GELU
    assert type(mesa_convert(nn.Linear(4, 4))) is MesaLinear
    sd_keys = set(model.state_dict())
    assert "0.quantizer.alpha" in sd_keys


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_vit_other_dtypes(dtype):
    torch.manual_seed(0)
    m = MesaViT(depth=1).to(dtype)
    F.cross_entropy(m(torch.rand(4, 64, dtype=dtype)).float(), torch.arange(4)).backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in m.parameters())


def test_autocast_saves_codes():
    torch.manual_seed(0)
    layer = MesaLinear(32, 8)
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedBytesMeter() as m:
        y = layer(x)
    assert y.dtype == torch.bfloat16 and m.bytes == x.numel() + 8
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    with pytest.raises(ValueError, match="bits must be an int in \\[1, 16\\], got 0"):
        ActQuantizer(bits=0)
    with pytest.raises(ValueError, match="bits must be an int in \\[1, 16\\], got 17"):
        MesaLinear(4, 4, bits=17)
    with pytest.raises(ValueError, match="groups=3 must divide heads=4"):
        MesaAttention(16, heads=4, groups=3)
    with pytest.raises(ValueError, match="groups must be a positive int, got 0"):
        ActQuantizer(groups=0)
    with pytest.raises(ValueError, match="ema_decay must be in \\[0, 1\\), got 1.0"):
        ActQuantizer(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay must be finite"):
        ActQuantizer(ema_decay=float("nan"))
    with pytest.raises(ValueError, match="groups=3 must divide in_features=4"):
        MesaLinear(4, 4, groups=3)
    with pytest.raises(ValueError, match="groups=3 must divide the size 8"):
        ActQuantizer(groups=3).pack(torch.randn(2, 8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ActQuantizer().pack(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="groups=3 must divide in_features=16 of layer '0'"):
        mesa_convert(nn.Sequential(nn.Linear(16, 4)), groups=3)
    with pytest.raises(ValueError, match="policy has unknown keys"):
        mesa_convert(nn.Linear(4, 4), policy={"relu": True})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mesa_convert("model")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        MesaGELU("fast")
    with pytest.raises(TypeError, match="quantizer must be an ActQuantizer"):
        q_linear(torch.randn(2, 3), torch.randn(3, 3), None, quantizer="q")
    with pytest.raises(ValueError, match="patch=3 must divide image_size=8"):
        MesaViT(image_size=8, patch=3)


# ------------------------------------------------------------------------------------------ claim, bench, docs
def test_claim_memory_and_fidelity(smoke_run):
    from gradkit.harness.claims.mesa import CLAIM

    out = smoke_run("mesa")
    assert out.data == "digits"
    assert out.metrics["mesa"]["bytes_ratio"] < 0.30
    assert out.metrics["mesa"]["grad_cos_min"] >= 0.99
    assert out.metrics["mesa_b4"]["grad_relerr"] > out.metrics["mesa_b8"]["grad_relerr"]
    assert out.info["saved_bytes"]["mesa"] < out.info["saved_bytes"]["fp32"]
    # the deterministic-rounding arm trains too and is reported (not judged)
    nearest = out.metrics["mesa_nearest"]
    assert 0.0 <= nearest["test_acc"] <= 100.0 and nearest["time_ratio"] > 0
    assert nearest["test_acc"] != out.metrics["mesa"]["test_acc"] or nearest["train_loss"] != out.metrics["mesa"]["train_loss"]
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 6


def test_claim_real_data_missing_folder(tmp_path):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.mesa import CLAIM
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "nope"))


def test_claim_real_mnist_smoke(smoke_run):
    import os

    from gradkit.harness.claims.mesa import CLAIM

    root = Path(os.environ.get("GRADKIT_TEST_DATA", str(REPO / ".." / "shared" / "data")))
    if not (root / "mnist").is_dir():
        pytest.skip(f"no MNIST under {root}")
    out = smoke_run("mesa", data_root=root)
    assert out.data == "mnist" and out.info["n_train"] == 500
    assert out.info["protocol"]["image_size"] == 28
    assert out.metrics["mesa"]["bytes_ratio"] < 0.30
    assert all(math.isfinite(v) for vals in out.metrics.values() for v in vals.values())
    assert len(CLAIM.criterion_for(out.data).checks([out.metrics])) == 4


def test_benchmark_registers_and_runs():
    import gradkit.harness.benchmarks.mesa as bm
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get(bm.NAME)
    res = b.run(1)
    assert res.baseline_s > 0 and res.candidate_s > 0 and 0 < res.extra["saved_bytes_ratio"] < 0.3
