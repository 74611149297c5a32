"""Tests of RevCol (paper slug: revcol): column stack, model, claim (smoke), benchmark, docs."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.nn.revcol import ConvNeXtBlock, DropPath, LayerNorm2d, RevColLevel, RevColNet, ReversibleColumnStack
from gradkit.testing import SavedBytesMeter, assert_same_grads, param_grads

REPO = Path(__file__).resolve().parent.parent
CH = (4, 8, 8, 16)


def tiny(cols: int, **kw) -> RevColNet:
    return RevColNet(1, 3, channels=CH, blocks=(1, 1, 1, 1), num_columns=cols, stem=1, **kw)


def naive_revcol(net: RevColNet, x: torch.Tensor) -> torch.Tensor:
    """The paper's column recursion written out by hand (plain autograd)."""
    h = net.stem(x)
    c = [0, 0, 0, 0]
    for i, col in enumerate(net.columns.columns):
        new = []
        for k, f in enumerate(col.levels):
            lower = h if k == 0 else new[k - 1]
            upper = None if (i == 0 or k == 3) else c[k + 1]
            out = f(lower, upper)
            new.append(out if i == 0 else out + col.alphas[k] * c[k])
        c = new
    return net.head(net.head_norm(c[-1].mean(dim=(-2, -1))))


def test_forward_matches_naive_recursion_and_twin_bitwise():
    torch.manual_seed(0)
    net = tiny(3, layer_scale=0.3).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    ref = naive_revcol(net, x)
    assert torch.allclose(net(x), ref, rtol=0, atol=1e-14)
    net.train()
    for strict in (False, True):
        net.columns.strict = strict
        net.reversible = True
        a = net(x)
        net.reversible = False
        assert torch.equal(a, net(x))


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_grads_equal_twin_float64(strict, drop_path):
    torch.manual_seed(0)
    net = tiny(4, layer_scale=0.3, drop_path=drop_path, strict=strict).double()
    with torch.no_grad():  # distinct alphas, one negative: sign handling and alpha grads
        net.columns.columns[2].alphas[1].mul_(-1.3)
    twin = copy.deepcopy(net)
    twin.reversible = False
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])

    def loss(m):
        torch.manual_seed(9)
        return nn.functional.cross_entropy(m(x), y)

    ga, gb = param_grads(net, loss), param_grads(twin, loss)
    assert any("alphas" in k and g.abs().max() > 0 for k, g in ga.items())
    assert_same_grads(ga, gb, rtol=1e-10, atol=1e-13)


def test_gradcheck_column_stack_float64():
    torch.manual_seed(0)
    stack = ReversibleColumnStack(
        lambda i, first: [RevColLevel(k, (2, 2), 1, first_column=first, layer_scale=0.5) for k in range(2)],
        (2, 2), num_columns=3, strict=True).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: stack(t)[1], (x,))


def test_x_grad_summed_over_columns():
    torch.manual_seed(0)
    net = tiny(3, layer_scale=0.3, strict=True).double()
    h = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    sum(c.sum() for c in net.columns(ha)).backward()
    net.reversible = False
    sum(c.sum() for c in net.columns(hb)).backward()
    assert torch.allclose(ha.grad, hb.grad, rtol=1e-10, atol=1e-12)


def test_saved_bytes_flat_strict_and_per_column_growth():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    res = {}
    for mode in ("twin", "strict", "per_column"):
        res[mode] = []
        for cols in (2, 4, 8):
            net = tiny(cols, reversible=mode != "twin", strict=mode == "strict")
            with SavedBytesMeter() as m:
                net(x)
            res[mode].append(m.bytes)
    assert res["strict"][0] == res["strict"][2]
    assert res["twin"][2] > 3 * res["twin"][0]
    out_bytes = 8 * sum(c * (8 // 2 ** k) ** 2 for k, c in enumerate(CH)) * 4
    assert (res["per_column"][2] - res["per_column"][0]) / 6 <= out_bytes


def test_reconstruction_and_alpha_clamp():
    torch.manual_seed(0)
    net = tiny(6).double()
    with torch.no_grad():
        net.columns.columns[1].alphas[0].fill_(1e-6)
        net.columns.columns[2].alphas[0].fill_(-1e-6)
        net.columns.columns[3].alphas[0].fill_(0.0)
    h = net.stem(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with torch.no_grad():
        outs = net.columns(h)
    a = [net.columns.columns[i].alphas[0] for i in (1, 2, 3)]
    assert torch.allclose(a[0], torch.full_like(a[0], 1e-3))
    assert torch.allclose(a[1], torch.full_like(a[1], -1e-3))
    assert torch.allclose(a[2], torch.full_like(a[2], 1e-3))
    with torch.no_grad():
        for i in (1, 2, 3):
            net.columns.columns[i].alphas[0].fill_(0.5)
        outs = net.columns(h)
        first = net.columns.reconstruct(h, outs)
        one = copy.deepcopy(net.columns)
        one.columns = one.columns[:1]
        ref = one(h)
    for r, f in zip(first, ref):
        assert (r - f).abs().max() / f.abs().max() < 1e-10


def test_components_shapes():
    x = torch.randn(2, 4, 5, 5)
    assert LayerNorm2d(4)(x).shape == x.shape
    assert ConvNeXtBlock(4)(x).shape == x.shape
    d = DropPath(0.5).train()
    assert d(x).shape == x.shape
    assert torch.equal(DropPath(0.5).eval()(x), x)


def test_bad_input():
    with pytest.raises(ValueError, match="num_columns must be a positive int"):
        tiny(0)
    with pytest.raises(ValueError, match="channels and blocks"):
        RevColNet(1, 3, channels=(4, 8), blocks=(1,))
    with pytest.raises(ValueError, match="alpha_min must be > 0"):
        ReversibleColumnStack(lambda i, f: [nn.Identity()], [2], 2, alpha_min=0.0)
    with pytest.raises(ValueError, match=r"\|alpha_init\| >= alpha_min"):
        ReversibleColumnStack(lambda i, f: [nn.Identity()], [2], 2, alpha_init=0.0)
    with pytest.raises(ValueError, match="returned 1 level functions, expected 2"):
        ReversibleColumnStack(lambda i, f: [nn.Identity()], [2, 2], 2)
    with pytest.raises(TypeError, match="make_level_fns must be callable"):
        ReversibleColumnStack(None, [2], 2)
    with pytest.raises(ValueError, match="p must be in"):
        DropPath(1.0)
    with pytest.raises(ValueError, match="kernel must be odd"):
        ConvNeXtBlock(4, kernel=2)
    net = tiny(2)
    with pytest.raises(ValueError, match="x must have 4 channels"):
        net.columns(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="alpha_init must be finite"):
        tiny(2, alpha_init=float("nan"))


def test_claim_smoke(smoke_run):
    import gradkit.harness.claims.revcol as mod

    out = smoke_run("revcol")
    m = out.metrics
    assert m["revcol"]["bytes_growth"] <= 1.15 < m["twin"]["bytes_growth"]
    assert m["revcol"]["nonstrict_growth_ratio"] <= 1.0 < m["twin"]["nonstrict_growth_ratio"]
    assert m["revcol"]["grad_rel_err"] < 1e-8 and m["revcol"]["recon_err"] < 1e-10
    p = mod.CLAIM.protocol.at("smoke")
    assert len(out.curves["test_acc"]["revcol"]) == p.epochs
    assert len(out.curves["saved_mib_per_column"]["revcol"]) == len(p.columns_sweep)
    ok, checks = mod.CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 9
    assert m["revcol"]["grad_rel_err_f32_nmax"] <= 1e-3 and m["revcol"]["safe_columns_f32"] >= p.columns_sweep[0]


def test_benchmark_registers_and_runs():
    import gradkit.harness.benchmarks.revcol as bmod
    from gradkit.harness.bench import BENCHMARKS

    assert BENCHMARKS.get("revcol-step").slug == "revcol"
    res = bmod.run(repeats=1)
    assert res.ratio > 0 and res.extra["saved_bytes_ratio"] < 0.1


