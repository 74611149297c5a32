"""Tests of Rev-MBConv (paper slug: rev-mbconv): MBConv functions, reversible blocks and stages, the 3D U-Net,
procedural volumes, the claim at smoke scale, the benchmark and the docs page."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.data.volumes import make_ellipsoid_volumes
from gradkit.nn.rev_mbconv import (
    MBConv2d, MBConv3d, RevMBConv2d, RevMBConv3d, RevMBConvUNet3d, rev_mbconv_stage,
)
from gradkit.testing import SavedBytesMeter, assert_same_grads, param_grads

ROOT = Path(__file__).resolve().parents[1]


def f64(m: nn.Module) -> nn.Module:
    return m.to(torch.float64)


# ---------------------------------------------------------------------------------------- math
def test_gradcheck_rev_block_float64():
    torch.manual_seed(0)
    blk = f64(RevMBConv3d(4, expansion=2))
    x = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_stage_float64():
    torch.manual_seed(0)
    st = f64(rev_mbconv_stage(4, 2, expansion=2))
    x = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(st, (x,), eps=1e-6, atol=1e-5)


def test_block_matches_naive_coupling():
    torch.manual_seed(0)
    blk = f64(RevMBConv3d(8))
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    x1, x2 = x.chunk(2, 1)
    y1 = x1 + blk.f(x2)
    y2 = x2 + blk.g(y1)
    torch.testing.assert_close(blk(x), torch.cat([y1, y2], 1), rtol=0, atol=1e-14)


def test_mbconv_structure_and_no_inner_residual():
    f = MBConv3d(4, expansion=3)
    convs = [m for m in f.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [12, 12, 4]
    assert convs[1].groups == 12 and convs[1].kernel_size == (3, 3, 3)
    # zeroing the last conv gives exactly 0 (no skip inside F; the coupling adds it)
    nn.init.zeros_(convs[-1].weight)
    assert f(torch.randn(1, 4, 3, 3, 3)).abs().max() == 0
    assert MBConv2d(4, se=True)(torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)
    blk2 = RevMBConv2d(4).double()
    x2 = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert (blk2.inverse(blk2(x2)) - x2).abs().max() < 1e-12


def test_inverse_float64_and_float32_16_blocks():
    torch.manual_seed(0)
    st = f64(rev_mbconv_stage(8, 16))
    x = torch.randn(1, 8, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert (st.inverse(st(x)) - x).abs().max() < 1e-12
    blk = f64(RevMBConv3d(8))
    with torch.no_grad():
        assert (blk.inverse(blk(x)) - x).abs().max() < 1e-12
    st32 = rev_mbconv_stage(8, 16)
    x32 = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        # float32 round-off accumulates over the 16 inversions: measured ~1e-5 relative (the protocol's former bound 1e-5)
        assert (st32.inverse(st32(x32)) - x32).abs().max() / x32.abs().max() < 5e-5


def test_unet_gradients_equal_twin_float64():
    torch.manual_seed(0)
    net = f64(RevMBConvUNet3d(4, 3, width=8, levels=2, blocks=2, reversible=False))
    x = torch.randn(1, 4, 8, 8, 8, dtype=torch.float64)
    y = torch.randint(3, (1, 8, 8, 8))

    def loss(m):
        return nn.functional.cross_entropy(m(x), y)

    ref = param_grads(net, loss)
    net.reversible = True
    assert all(s.reversible for s in [*net.enc, *net.dec])
    assert_same_grads(param_grads(net, loss), ref, rtol=1e-10, atol=1e-13)


def test_batchnorm_and_instance_norm_variants_match_twin():
    torch.manual_seed(0)
    for norm in ("batch", "instance", "none"):
        st = f64(rev_mbconv_stage(4, 2, norm=norm, act="relu6", reversible=False))
        x = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64)
        ref = param_grads(st, lambda m: m(x).pow(2).sum())
        st.reversible = True
        got = param_grads(st, lambda m: m(x).pow(2).sum())
        assert_same_grads(got, ref, rtol=1e-10, atol=1e-12)


def test_batchnorm_running_stats_updated_once():
    torch.manual_seed(0)
    st0 = f64(rev_mbconv_stage(4, 2, norm="batch"))
    x = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64)
    rev, twin = copy.deepcopy(st0), copy.deepcopy(st0)
    twin.reversible = False
    for m in (rev, twin):
        m(x.clone().requires_grad_()).sum().backward()
    for (name, a), b in zip(rev.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------------------------------- memory
def _saved(net, x):
    with SavedBytesMeter() as m:
        out = net(x)
    del out
    return m.bytes


def test_saved_bytes_flat_in_depth_twin_grows():
    x = torch.randn(1, 4, 8, 8, 8)
    rev = [_saved(RevMBConvUNet3d(4, 3, width=8, levels=2, blocks=n), x) for n in (1, 4)]
    twin = [_saved(RevMBConvUNet3d(4, 3, width=8, levels=2, blocks=n, reversible=False), x) for n in (1, 4)]
    assert rev[1] <= 1.2 * rev[0]
    assert twin[1] >= 3 * twin[0]
    assert rev[0] < twin[0]


# ---------------------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match="channels must be even"):
        RevMBConv3d(7)
    with pytest.raises(ValueError, match="width must be even"):
        RevMBConvUNet3d(4, 3, width=9)
    with pytest.raises(ValueError, match="norm must be one of"):
        MBConv3d(4, norm="layer")
    with pytest.raises(ValueError, match="act must be one of"):
        MBConv3d(4, act="gelu")
    with pytest.raises(ValueError, match="kernel must be odd"):
        MBConv3d(4, kernel=2)
    with pytest.raises(ValueError, match="expansion must be an int >= 1"):
        MBConv3d(4, expansion=0)
    with pytest.raises(ValueError, match="blocks must be an int >= 1"):
        rev_mbconv_stage(4, 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        RevMBConvUNet3d(4, 3, width=8, levels=3)(torch.randn(1, 4, 6, 8, 8))
    with pytest.raises(ValueError, match=r"expects input \(N, 4"):
        MBConv3d(4)(torch.randn(1, 6, 3, 3, 3))
    with pytest.raises(ValueError, match="odd size"):
        rev_mbconv_stage(4, 1)(torch.randn(1, 5, 3, 3, 3))
    with pytest.raises(ValueError, match="noise must be"):
        make_ellipsoid_volumes(2, noise=float("nan"))


def test_inplace_function_raises_at_first_call():
    class InPlace(nn.Module):
        def forward(self, u):
            return u.mul_(2)

    blk = RevMBConv3d(4)
    blk.f_level.f = InPlace()
    with pytest.raises(RuntimeError, match="in place"):
        blk(torch.randn(1, 4, 2, 2, 2, requires_grad=True))


# ---------------------------------------------------------------------------------------- data
def test_volumes_deterministic_and_labelled():
    x, y = make_ellipsoid_volumes(4, side=12, seed=3)
    x2, y2 = make_ellipsoid_volumes(4, side=12, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (4, 4, 12, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 2}
    assert all((y[i] > 0).any() for i in range(4))
    # label means differ per channel (the task is learnable)
    m1 = x.movedim(1, -1)[y == 1].mean(0)
    m0 = x.movedim(1, -1)[y == 0].mean(0)
    assert (m1 - m0).abs().max() > 0.3


# ---------------------------------------------------------------------------------------- claim
def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.rev_mbconv import CLAIM

    out = smoke_run("rev-mbconv")
    assert out.data == "ellipsoids3d"
    r, t = out.metrics["rev_mbconv"], out.metrics["twin"]
    assert r["bytes_growth"] <= 1.2 and t["bytes_growth"] >= 3
    assert r["grad_rel_err"] < 1e-8 and r["inverse_err"] < 1e-10
    assert r["volume_ratio"] >= 1.5 and t["volume_ratio"] == 1.0
    sweep = CLAIM.protocol.at("smoke").sweep
    assert len(out.curves["saved_mib"]["twin"]) == len(sweep) == len(out.info["curve_axes"]["saved_mib"]["x"])
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 10


def test_dice_helpers():
    from gradkit.harness.claims.rev_mbconv import dice_loss, region_dice

    y = torch.tensor([[0, 1, 2, 2]])
    assert region_dice(y.clone(), y)["dice"] == 100.0
    assert region_dice(torch.zeros_like(y), y)["dice"] == 0.0
    logits = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float() * 50
    assert dice_loss(logits, y) < 1e-3


# ---------------------------------------------------------------------------------------- benchmark, docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.rev_mbconv  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("rev-mbconv-step")
    assert b.slug == "rev-mbconv" and b.target == 1.5
    r = b.run(1)
    assert math.isfinite(r.ratio) and r.ratio > 0
    assert r.extra["saved_bytes_ratio"] < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    net = RevMBConvUNet3d(4, 3, width=8, levels=2, blocks=2)
    x = torch.randn(1, 4, 8, 8, 8)
    ref = param_grads(net, lambda m: m(x).sum())
    netc = copy.deepcopy(net).cuda()
    got = param_grads(netc, lambda m: m(x.cuda()).sum())
    assert_same_grads({k: v.cpu() for k, v in got.items()}, ref, rtol=1e-3, atol=1e-4)
