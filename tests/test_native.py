"""Tests of the optional native CPU kernels (gradkit._native): each equals its PyTorch path, and gradkit falls back
to the PyTorch path when the kernels are off or cannot be built."""
from __future__ import annotations

import os

import pytest
import torch

from gradkit import _native
from gradkit.distributed.dgc import DGCCompressor, _blockwise_topk, decode_block16, encode_block16
from gradkit.functional.compressed import ActQuantizer, dequantize, group_range, quantize

needs_native = pytest.mark.skipif(_native.native() is None, reason="no C compiler: native kernels unavailable")

# (shape, groups, group_dim): short and long group runs, rows wider than the kernels' span, odd sizes
LAYOUTS = [((64, 17, 64), 4, -1), ((8, 16, 7, 5), 16, 1), ((1000,), 1, -1), ((3, 8), 8, 1),
           ((5, 6000), 2, -1), ((2, 3, 4100), 1, -1)]


@pytest.fixture
def torch_path():
    """Inside ``with torch_path():`` the kernels are off."""
    return _native.disabled


def _data(shape, groups, gdim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    return x, *group_range(x, groups, gdim)


def test_switch_off_and_on(monkeypatch):
    monkeypatch.setenv("GRADKIT_NATIVE", "1")
    with _native.disabled():
        assert not _native.enabled() and _native.native() is None
    assert _native.enabled() and os.environ["GRADKIT_NATIVE"] == "1"
    monkeypatch.delenv("GRADKIT_NATIVE")
    with _native.disabled():
        assert not _native.enabled()
    assert "GRADKIT_NATIVE" not in os.environ


def test_no_compiler_falls_back(monkeypatch, tmp_path):
    """No compiler and an empty cache: no library, and Mesa's quantiser still works (PyTorch path)."""
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GRADKIT_CACHE", str(tmp_path / "cache"))
    assert _native.native() is None
    codes, a, b = ActQuantizer(groups=2).pack(torch.randn(4, 8))
    assert codes.dtype == torch.uint8 and a.shape == (2,)


@needs_native
def test_failed_build_falls_back(monkeypatch, tmp_path):
    """A compiler that fails leaves no library file behind and gives None."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("GRADKIT_CACHE", str(tmp_path / "cache"))
    assert _native.native() is None
    assert not list((tmp_path / "cache").rglob("*.so"))


@needs_native
@pytest.mark.parametrize("shape,groups,gdim", LAYOUTS)
def test_group_range_equals_torch_path(shape, groups, gdim, torch_path):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    r, m = group_range(x, groups, gdim)
    with torch_path():
        r0, m0 = group_range(x, groups, gdim)
    assert torch.equal(r, r0) and torch.equal(m, m0)  # extremes are exact; hi - lo the same float op


@needs_native
@pytest.mark.parametrize("shape,groups,gdim", LAYOUTS)
def test_nearest_codes_equal_torch_path_but_at_halves(shape, groups, gdim, torch_path):
    x, a, b = _data(shape, groups, gdim)
    q = quantize(x, a, b, groups=groups, group_dim=gdim, stochastic=False)
    with torch_path():
        q0 = quantize(x, a, b, groups=groups, group_dim=gdim, stochastic=False)
    diff = q.int() - q0.int()
    assert q.dtype == q0.dtype == torch.uint8 and q.shape == x.shape
    # halves round up here and to even there; a product rounded the other way may also flip a code
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3


@needs_native
@pytest.mark.parametrize("shape,groups,gdim", LAYOUTS)
def test_stochastic_codes_are_floor_or_ceil_and_seeded(shape, groups, gdim):
    x, a, b = _data(shape, groups, gdim)
    kw = dict(groups=groups, group_dim=gdim)
    q1 = quantize(x, a, b, generator=torch.Generator().manual_seed(7), **kw)
    q2 = quantize(x, a, b, generator=torch.Generator().manual_seed(7), **kw)
    q3 = quantize(x, a, b, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(q1, q2) and not torch.equal(q1, q3)
    y = _scaled(x, a, b, groups, gdim)
    lo, q = y.floor().clamp(0, 255), q1.double()
    # floor or floor + 1 of the scaled value; within float32 rounding of a grid point either neighbour
    near = (y - y.round()).abs() < 1e-3
    assert ((q == lo) | (q == (lo + 1).clamp(max=255)) | (near & ((q - y).abs() <= 1))).all()


def _scaled(x, a, b, groups, gdim):
    """(x - beta) * s per element in float64 (s = 255 / |alpha|), for the code checks."""
    xg = x.double().reshape(*x.shape[:gdim % x.dim()], groups, -1, *x.shape[gdim % x.dim() + 1:])
    d = gdim % x.dim()
    view = (1,) * d + (groups,) + (1,) * (xg.dim() - d - 1)
    return ((xg - b.double().view(view)) * (255 / a.double().abs().view(view))).reshape(x.shape)


@needs_native
def test_stochastic_rounding_unbiased_and_uniform():
    """Averaged over draws the dequantised value is x (bias well under one step), and the fractional part of a
    code's step is hit with the probability the uniform draw gives."""
    x = torch.linspace(-1, 1, 4096).reshape(16, 256)
    a, b = torch.tensor([2.0]), torch.tensor([-1.0])
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(16, 256, dtype=torch.float64)
    n = 300
    for _ in range(n):
        acc += dequantize(quantize(x, a, b, generator=gen), a, b).double()
    step = 2.0 / 255
    err = (acc / n - x.double()) / step
    assert err.abs().max() < 0.2  # one element: the sd of a mean of 300 draws is <= 0.03 steps
    assert err.mean().abs() < 0.01  # all elements: no systematic bias


@needs_native
@pytest.mark.parametrize("shape,groups,gdim", LAYOUTS)
def test_dequantize_equals_torch_path(shape, groups, gdim, torch_path):
    x, a, b = _data(shape, groups, gdim)
    q = quantize(x, a, b, groups=groups, group_dim=gdim)
    out = dequantize(q, a, b, groups=groups, group_dim=gdim)
    with torch_path():
        out0 = dequantize(q, a, b, groups=groups, group_dim=gdim)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, out0, rtol=1e-6, atol=1e-6)


@needs_native
def test_non_contiguous_input(torch_path):
    x = torch.randn(4, 8, 6, 5).permute(0, 2, 1, 3)  # (4, 6, 8, 5), groups over dim 2
    a, b = group_range(x, 4, 2)
    with torch_path():
        a0, b0 = group_range(x, 4, 2)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    q = quantize(x, a, b, groups=4, group_dim=2, stochastic=False)
    with torch_path():
        q0 = quantize(x, a, b, groups=4, group_dim=2, stochastic=False)
    assert (q.int() - q0.int()).abs().max() <= 1


@needs_native
@pytest.mark.parametrize("stochastic", [False, True])
def test_pack_equals_torch_path(stochastic, torch_path):
    """Range, EMA and snapshot of one native pack equal the PyTorch path's; buffers update only when asked."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 17, 64, generator=gen) * (i + 1) for i in range(3)]
    qa = ActQuantizer(groups=4, stochastic=stochastic)
    qb = ActQuantizer(groups=4, stochastic=stochastic)
    for x in xs:
        ca, aa, ba = qa.pack(x)
        with torch_path():
            cb, ab, bb = qb.pack(x)
        torch.testing.assert_close(aa, ab, rtol=1e-6, atol=0)
        torch.testing.assert_close(ba, bb, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(qa.alpha, qb.alpha, rtol=1e-6, atol=0)
        assert bool(qa.initialized) and ca.dtype == torch.uint8 and ca.shape == x.shape
        assert (ca.int() - cb.int()).abs().max() <= 1
    snap = aa.clone()
    qa.eval()
    before = qa.alpha.clone()
    qa.pack(xs[0] * 100)  # eval: no update, snapshot of the running range
    assert torch.equal(qa.alpha, before) and torch.equal(snap, aa)
    qa.pack(xs[0] * 100, update=True)
    assert not torch.equal(qa.alpha, before)


@needs_native
def test_pack_first_call_uses_own_range_even_in_eval():
    q = ActQuantizer(groups=2).eval()
    x = torch.randn(6, 8)
    _, a, b = q.pack(x)
    r, m = group_range(x, 2, -1)
    assert torch.equal(a, r) and torch.equal(b, m) and bool(q.initialized)


@needs_native
def test_nan_and_inf_do_not_crash():
    x = torch.randn(4, 8)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    a, b = torch.tensor([4.0]), torch.tensor([-2.0])
    q = quantize(x, a, b, stochastic=False)
    assert q[1, 1] == 255 and q[2, 2] == 0 and q[0, 0] == 0


@needs_native
@pytest.mark.parametrize("nesterov,momentum,shape", [(False, 0.9, (1000, 300)), (False, 0.0, (1000, 300)),
                                                     (True, 0.9, (1000, 300)), (False, 0.9, (10, 1030))])
def test_dgc_fused_update_selects_as_torch_path(nesterov, momentum, shape, torch_path):
    """The fused update + blockwise selection sends the same entries as the PyTorch path; u and v agree to
    rounding (the two paths may contract multiply-adds differently)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # the fused kernel runs at one thread only
    try:
        a = DGCCompressor(density=1e-3, momentum=momentum, nesterov=nesterov, warmup=None)
        b = DGCCompressor(density=1e-3, momentum=momentum, nesterov=nesterov, warmup=None)
        assert a._native_fits(torch.empty(shape))
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            g = torch.randn(shape, generator=gen)
            sa = a.compress("w", g)
            with torch_path():
                sb = b.compress("w", g)
            assert torch.equal(sa.flat_indices().sort().values, sb.flat_indices().sort().values)
            ia, ib = sa.flat_indices().argsort(), sb.flat_indices().argsort()
            torch.testing.assert_close(sa.values[ia], sb.values[ib], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.v["w"], b.v["w"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.u["w"], b.u["w"], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(prev)


@needs_native
@pytest.mark.parametrize("n,k", [(64 * 50, 7), (64 * 50 + 13, 12), (100_003, 97)])
def test_dgc_select_kernel_gives_a_top_k_set(n, k, torch_path):
    """The blockwise top-k with the native filter picks entries of the same magnitudes as torch.topk, with
    ties (many equal values), a short last row, signed input ranked by |x|, and NaN ranked first."""
    gen = torch.Generator().manual_seed(n)
    for case in ("plain", "ties", "signed", "nan"):
        a = torch.randn(n, generator=gen).abs()
        if case == "ties":
            a = (a * 4).round()
        if case == "signed":
            a = torch.randn(n, generator=gen)
        if case == "nan":
            a[n // 3] = float("nan")
        c = 64
        rows = -(-n // c)
        rmax = torch.stack([a[r * c:(r + 1) * c].abs().max() for r in range(rows)])
        signed = case in ("signed", "nan")
        idx = _blockwise_topk(a, k, rmax=rmax if signed else None)
        with torch_path():
            ref = _blockwise_topk(a, k, rmax=rmax if signed else None)
        assert idx.numel() == k == idx.unique().numel()
        want = torch.topk(a.abs(), k).values.sort().values
        got, got_ref = a[idx].abs().sort().values, a[ref].abs().sort().values
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got_ref, want, rtol=0, atol=0, equal_nan=True)


@needs_native
def test_block16_and_finite_check_match_torch_path(torch_path):
    idx = torch.tensor([0, 5, 65535, 65536, 200_000, 262_143])
    with torch_path():
        want = encode_block16(idx, 262_144)
    assert torch.equal(encode_block16(idx, 262_144), want)
    assert torch.equal(decode_block16(want, 262_144, idx.numel()), idx)
    with pytest.raises((IndexError, RuntimeError)):  # an index beyond numel: both paths refuse
        encode_block16(torch.tensor([3, 300_000]), 262_144)
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.randn(1000, 300)
        g[999, 299] = bad
        with pytest.raises(ValueError, match="non-finite"):
            DGCCompressor(density=1e-3, warmup=None).compress("w", g)
    g = torch.full((1000, 300), 3e38)  # large but finite: sends
    assert DGCCompressor(density=1e-3, warmup=None).compress("w", g).values.numel() == 300


def test_dgc_native_not_used_where_it_does_not_fit():
    c = DGCCompressor(density=1e-3, warmup=None)
    assert not DGCCompressor(density=0.1, warmup=None)._native_fits(torch.empty(100, 10))  # too dense for rows
    assert not c._native_fits(torch.empty(1000, 300, dtype=torch.float64))
    assert not DGCCompressor(density=1e-3, warmup=None, sample_ratio=0.01)._native_fits(torch.empty(1000, 300))


@needs_native
@pytest.mark.parametrize("rows,n,k", [(5, 300, 7), (3, 16384, 1024), (4, 50, 50), (2, 33, 1)])
def test_rows_topk_selects_the_largest_per_row(rows, n, k, torch_path):
    """The native per-row selection of MoCHi's hardest negatives: the k largest values of each row (signed,
    with ties and NaN), each column once, in increasing order."""
    from gradkit.nn.hard_negative_mixing import _hardest

    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g)
    x[0] = (x[0] * 2).round()  # many ties
    x[-1, n // 2] = float("nan")  # ranks first, as in torch.topk
    if rows > 2:
        x[1] = -x[1].abs()  # all negative
    idx = _hardest(x, k)
    assert idx.shape == (rows, k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # increasing, so distinct
    want = torch.topk(x, k, dim=1).values.sort(dim=1).values
    torch.testing.assert_close(x.gather(1, idx).sort(dim=1).values, want, rtol=0, atol=0, equal_nan=True)
    with torch_path():
        ref = _hardest(x, k)
    torch.testing.assert_close(x.gather(1, ref).sort(dim=1).values, want, rtol=0, atol=0, equal_nan=True)


@needs_native
def test_rows_topk_when_the_sample_misleads():
    """A row whose strided sample holds its largest entries puts the sampled threshold too high, and a row far
    from normal the short rows' moment threshold: the selection falls back to the whole row and stays exact."""
    from gradkit.nn.hard_negative_mixing import _hardest

    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(0))
    x[:, ::16] += 100.0  # the 256 sampled entries
    idx = _hardest(x, 512)
    want = torch.topk(x, 512, dim=1).values.sort(dim=1).values
    torch.testing.assert_close(x.gather(1, idx).sort(dim=1).values, want, rtol=0, atol=0)
    # short rows take a threshold from the row's mean and deviation: a two-valued row puts it above all but the
    # 16 large entries, fewer than the 60 wanted
    x = torch.zeros(3, 256)
    x[:, :16] = 100.0
    x[:, 16:] += torch.rand(3, 240, generator=torch.Generator().manual_seed(1)) * 1e-3
    idx = _hardest(x, 60)
    want = torch.topk(x, 60, dim=1).values.sort(dim=1).values
    torch.testing.assert_close(x.gather(1, idx).sort(dim=1).values, want, rtol=0, atol=0)


def _info_nce_case(B, K, d, seed=1):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(K, d, generator=g), dim=1)
    q_raw = torch.randn(B, d, generator=g)
    k = 3 * torch.randn(B, d, generator=g)  # normalised by the loss
    return q_raw, k, keys


def _info_nce_reference(q_raw, k, keys, draws, tau):
    """float64, with the synthetic vectors built explicitly and held constant (no gradient through them)."""
    import torch.nn.functional as F

    q_raw, keys = q_raw.double(), keys.double()
    k = F.normalize(k.double(), dim=1)
    i, j, alpha, j2, beta = (t.double() if t.is_floating_point() else t for t in draws)
    q_raw = q_raw.clone().requires_grad_()
    q = F.normalize(q_raw, dim=1)
    with torch.no_grad():
        h1 = alpha[..., None] * keys[i] + (1 - alpha[..., None]) * keys[j]
        h2 = beta[..., None] * q[:, None] + (1 - beta[..., None]) * keys[j2]
        h = torch.cat([h1, h2], dim=1)
        h = h / h.norm(dim=2, keepdim=True).clamp_min(1e-12)
    syn = torch.einsum("bd,bsd->bs", q, h)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ keys.T, syn], dim=1) / tau
    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    loss.backward()
    return loss.detach(), syn.detach(), q_raw.grad


def _fused_info_nce(q_raw, k, keys, tau, mixing):
    import torch.nn.functional as F

    from gradkit.functional.queue_info_nce import queue_info_nce

    q_raw = q_raw.clone().requires_grad_()
    q = F.normalize(q_raw, dim=1)
    out = queue_info_nce(q, k, q @ keys.T, keys, tau, mixing)
    out.loss.backward()
    return out, q_raw.grad, q.detach()


@needs_native
@pytest.mark.parametrize("B,K,d,n_hard,s,s2,tau", [(6, 50, 16, 10, 7, 3, 0.2), (4, 300, 32, 1, 0, 0, 0.07),
                                                   (3, 4099, 24, 300, 40, 9, 0.1), (5, 64, 8, 64, 5, 0, 1.0),
                                                   (5, 64, 8, 1, 0, 4, 0.5)])
def test_fused_queue_info_nce_equals_the_formula(B, K, d, n_hard, s, s2, tau):
    """Given the draws it made: loss, synthetic logits and the gradient of the raw (unnormalised) queries agree
    with a float64 reference that builds the synthetic negatives as constant vectors."""
    import torch.nn.functional as F

    from gradkit.functional.queue_info_nce import Mixing

    q_raw, k, keys = _info_nce_case(B, K, d)
    mixing = Mixing(n_hard, s, s2, 0.5, torch.Generator().manual_seed(2)) if s + s2 else None
    out, grad, q = _fused_info_nce(q_raw, k, keys, tau, mixing)
    draws = out.draws or tuple(torch.empty(B, 0, dtype=t) for t in (torch.long, torch.long, torch.float32,
                                                                      torch.long, torch.float32))
    want_loss, want_syn, want_grad = _info_nce_reference(q_raw, k, keys, draws, tau)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0 and not out.synthetic.requires_grad
    torch.testing.assert_close(out.pos.double(), (q * F.normalize(k, dim=1)).sum(1).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.synthetic.double(), want_syn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@needs_native
@pytest.mark.parametrize("K,n_hard", [(64, 8), (4096, 256), (4096, 2048)])
def test_fused_draws_come_from_the_hardest_keys_uniformly(K, n_hard):
    """The mixed keys are among each query's n_hard most similar, every one of them is drawn about equally
    often, alpha ~ U(0, 1) and beta ~ U(0, beta_max); a seeded generator fixes the draws, another seed changes
    them."""
    from gradkit.functional.queue_info_nce import Mixing

    B, d, s, s2 = 4, 16, 4000, 2000
    q_raw, k, keys = _info_nce_case(B, K, d, seed=5)
    draws = []
    for seed in (7, 7, 8):
        out, _, q = _fused_info_nce(q_raw, k, keys, 0.2, Mixing(n_hard, s, s2, 0.3, torch.Generator().manual_seed(seed)))
        draws.append(out.draws)
    for a, b in zip(draws[0], draws[1]):
        assert torch.equal(a, b)
    assert not torch.equal(draws[0].i, draws[2].i) and not torch.equal(draws[0].alpha, draws[2].alpha)
    i, j, alpha, j2, beta = draws[0]
    top = (q @ keys.T).topk(n_hard, dim=1).indices
    member = torch.zeros(B, K, dtype=torch.bool).scatter_(1, top, True)
    for idx in (i, j, j2):
        assert bool(member.gather(1, idx).all())
    counts = torch.zeros(B, K).scatter_add_(1, torch.cat([i, j, j2], 1), torch.ones(B, 2 * s + s2))
    expect = (2 * s + s2) / n_hard
    assert float(counts.sum(1).min()) == 2 * s + s2
    # every hard key drawn, none far more often than chance (binomial counts: 6 standard deviations)
    assert bool((counts.gather(1, top) > 0).all()) or expect < 5
    assert float(counts.max()) <= expect + 6 * expect ** 0.5 + 3
    assert 0 <= float(alpha.min()) and float(alpha.max()) < 1 and abs(float(alpha.mean()) - 0.5) < 0.02
    assert 0 <= float(beta.min()) and float(beta.max()) < 0.3 and abs(float(beta.mean()) - 0.15) < 0.01


@needs_native
def test_fused_queue_info_nce_wide_logits_and_nan():
    """Logits spread over hundreds (tau = 0.005): the native exponential underflows to 0 where float32 does and
    keeps the loss to float32 rounding; a NaN query gives a NaN loss, as the PyTorch path does."""
    from gradkit.functional.queue_info_nce import Mixing, queue_info_nce

    q_raw, k, keys = _info_nce_case(4, 500, 16, seed=3)
    out, grad, q = _fused_info_nce(q_raw, k, keys, 0.005, Mixing(50, 6, 2, 0.5, torch.Generator().manual_seed(0)))
    want_loss, _, want_grad = _info_nce_reference(q_raw, k, keys, out.draws, 0.005)
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-3)
    q[1, 0] = float("nan")
    assert torch.isnan(queue_info_nce(q, k, q @ keys.T, keys, 0.2).loss)


@needs_native
def test_fused_queue_info_nce_bad_input(torch_path):
    """The kernels read raw memory: shapes, dtypes, devices and mixing arguments are checked first."""
    from gradkit._validate import ArgumentError
    from gradkit.functional.queue_info_nce import Mixing, queue_info_nce

    q_raw, k, keys = _info_nce_case(4, 50, 8)
    q = q_raw / q_raw.norm(dim=1, keepdim=True)
    lneg = q @ keys.T
    bad = [((q, k, lneg[:, :40], keys, 0.2, None), "lneg"),
           ((q, k[:3], lneg, keys, 0.2, None), "k"),
           ((q, k, lneg, keys[:, :6], 0.2, None), "keys"),
           ((q.double(), k, lneg, keys, 0.2, None), "float32"),
           ((q, k, lneg.t().contiguous().t(), keys, 0.2, None), "contiguous"),
           ((q, k, lneg, keys, 0.0, None), "tau"),
           ((q, k, lneg, keys, 0.2, Mixing(51, 4, 2, 0.5)), "n_hard"),
           ((q, k, lneg, keys, 0.2, Mixing(8, -1, 2, 0.5)), "s"),
           ((q, k, lneg, keys, 0.2, Mixing(8, 4, 2, 0.7)), "beta_max")]
    for args, match in bad:
        with pytest.raises(ArgumentError, match=match):
            queue_info_nce(*args)
    with torch_path(), pytest.raises(ArgumentError, match="native kernels"):
        queue_info_nce(q, k, lneg, keys, 0.2)


@needs_native
def test_module_native_and_pytorch_paths_agree_without_mixing(torch_path):
    """Plain MoCo (no draws, so both paths see the same logits): loss, gradient and diagnostics agree."""
    from gradkit.nn.hard_negative_mixing import InfoNCEWithMixing

    q_raw, k, keys = _info_nce_case(16, 1000, 32, seed=4)
    out = []
    for ctx in (torch_path, None):
        q = q_raw.clone().requires_grad_()
        fn = InfoNCEWithMixing(tau=0.1, s=0, s_prime=0)
        if ctx is None:
            loss = fn(q, k, keys)
        else:
            with ctx():
                loss = fn(q, k, keys)
        loss.backward()
        out.append((loss.detach(), q.grad, fn.last_stats))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-7)
    assert out[0][2] == pytest.approx(out[1][2], rel=1e-4, abs=1e-6)


