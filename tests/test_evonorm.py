"""Tests of EvoNorm (paper slug: evonorm): exact formulas, train/eval, running stats, groups, claim, docs."""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.nn.evonorm import (
    EvoNormB0, EvoNormS0, batch_var, evonorm_b0, evonorm_s0, group_std, instance_std, replace_bn_relu,
    resolve_groups,
)

REPO = Path(__file__).resolve().parent.parent
D64 = torch.float64


# ---------------------------------------------------------------------------------------- naive references
def ref_b0(x, v, gamma, beta, var_c, eps):
    """B0 with explicit loops over samples and channels (var_c: the left-term variance per channel)."""
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    for i in range(n):
        for j in range(c):
            xi = x[i, j]
            inst = ((xi - xi.mean()) ** 2).mean()
            left = math.sqrt(float(var_c[j]) + eps)
            right = v[j] * xi + torch.sqrt(inst + eps)
            den = torch.where(right > left, right, torch.full_like(right, left))
            y[i, j] = xi / den * gamma[j] + beta[j]
    return y


def ref_batch_var(x):
    n, c, h, w = x.shape
    out = []
    for j in range(c):
        vals = x[:, j].reshape(-1)
        out.append(((vals - vals.mean()) ** 2).sum() / vals.numel())
    return torch.stack(out)


def ref_s0(x, v, gamma, beta, groups, eps):
    n, c = x.shape[:2]
    cg = c // groups
    y = torch.empty_like(x)
    for i in range(n):
        for g in range(groups):
            block = x[i, g * cg:(g + 1) * cg]
            std = torch.sqrt(((block - block.mean()) ** 2).mean() + eps)
            for j in range(g * cg, (g + 1) * cg):
                xi = x[i, j]
                y[i, j] = xi * torch.sigmoid(v[j] * xi) / std * gamma[j] + beta[j]
    return y


def rand_params(c, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(c, generator=g, dtype=dtype)
    gamma = 1 + 0.3 * torch.randn(c, generator=g, dtype=dtype)
    beta = 0.2 * torch.randn(c, generator=g, dtype=dtype)
    return v, gamma, beta


def rand_x(shape, seed=1, dtype=D64, scale=1.5, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale + shift


def set_params(layer, v, gamma, beta):
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
        layer.v.copy_(v)
    return layer


# ---------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_b0_train_matches_reference(eps):
    x = rand_x((3, 4, 5, 6))
    v, gamma, beta = rand_params(4)
    layer = set_params(EvoNormB0(4, eps=eps).double(), v, gamma, beta)
    y = layer(x)
    torch.testing.assert_close(y, ref_b0(x, v, gamma, beta, ref_batch_var(x), eps))
    torch.testing.assert_close(batch_var(x), ref_batch_var(x))
    # eps placement: inside the sqrt on both sides
    torch.testing.assert_close(instance_std(x, eps), (x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt())


def test_b0_eval_uses_running_var_left_and_instance_var_right():
    x = rand_x((2, 4, 5, 5))
    v, gamma, beta = rand_params(4)
    layer = set_params(EvoNormB0(4).double(), v, gamma, beta)
    rv = torch.tensor([0.5, 2.0, 0.01, 9.0], dtype=D64)
    layer.running_var.copy_(rv)
    layer.eval()
    y = layer(x)
    torch.testing.assert_close(y, ref_b0(x, v, gamma, beta, rv, layer.eps))
    # the right term stays per-sample: sample 0's output does not depend on sample 1 in eval
    x2 = x.clone()
    x2[1] = 10 * torch.randn_like(x2[1])
    torch.testing.assert_close(layer(x2)[0], y[0])
    assert torch.equal(layer.running_var, rv)  # eval does not update


def test_b0_running_var_update_biased_momentum():
    layer = EvoNormB0(4, momentum=0.25).double()
    x = rand_x((3, 4, 5, 6))
    layer(x)
    expected = 0.75 * torch.ones(4, dtype=D64) + 0.25 * ref_batch_var(x)
    torch.testing.assert_close(layer.running_var, expected)
    x2 = rand_x((3, 4, 5, 6), seed=7)
    layer(x2)
    torch.testing.assert_close(layer.running_var, 0.75 * expected + 0.25 * ref_batch_var(x2))
    # momentum 0.1 is the official TF decay 0.9: m <- m - 0.1 (m - s2)
    l2 = EvoNormB0(4).double()
    l2(x)
    torch.testing.assert_close(l2.running_var, 1 - 0.1 * (1 - ref_batch_var(x)))


def test_b0_train_uses_batch_var_not_running():
    x = rand_x((3, 4, 5, 6))
    layer = EvoNormB0(4).double()
    layer.running_var.fill_(100.0)
    v, gamma, beta = rand_params(4)
    set_params(layer, v, gamma, beta)
    torch.testing.assert_close(layer(x), ref_b0(x, v, gamma, beta, ref_batch_var(x), layer.eps))


def test_b0_denominator_never_below_sqrt_eps():
    # strongly negative x with v = 1: v*x + std < 0, the batch-std branch of the max keeps y finite
    x = -torch.rand(2, 3, 4, 4, dtype=D64) * 50
    layer = EvoNormB0(3).double()
    y = layer(x)
    assert torch.isfinite(y).all()
    den = x / y  # gamma = 1, beta = 0
    assert (den >= math.sqrt(layer.eps) - 1e-12).all()
    right = x + instance_std(x, layer.eps)
    assert (right < 0).any()  # the case that an abs() "simplification" would get wrong


@pytest.mark.parametrize("c,groups", [(8, 4), (8, 1), (8, 8), (6, 3)])
def test_s0_matches_reference(c, groups):
    x = rand_x((2, c, 4, 3))
    v, gamma, beta = rand_params(c)
    layer = set_params(EvoNormS0(c, groups=groups).double(), v, gamma, beta)
    torch.testing.assert_close(layer(x), ref_s0(x, v, gamma, beta, groups, layer.eps))
    layer.eval()
    torch.testing.assert_close(layer(x), ref_s0(x, v, gamma, beta, groups, layer.eps))  # same in eval


def test_s0_group_size_and_functional():
    x = rand_x((2, 12, 3, 3))
    v, gamma, beta = rand_params(12)
    layer = set_params(EvoNormS0(12, group_size=4).double(), v, gamma, beta)
    assert layer.groups == 3
    torch.testing.assert_close(layer(x), evonorm_s0(x, v, gamma, beta, groups=3, eps=1e-5))
    torch.testing.assert_close(group_std(x, 12), instance_std(x))  # one channel per group = instance


def test_s0_invariant_to_batch_composition():
    layer = EvoNormS0(8, groups=4).double()
    x = rand_x((4, 8, 5, 5))
    y = layer(x)
    x2 = x.clone()
    x2[1:] = rand_x((3, 8, 5, 5), seed=9) * 7
    torch.testing.assert_close(layer(x2)[0], y[0])
    torch.testing.assert_close(layer(x[:1])[0], y[0])


def test_b0_train_depends_on_batch():
    layer = EvoNormB0(4).double()
    x = rand_x((4, 4, 5, 5))
    y = layer(x)[0]
    x2 = x.clone()
    x2[1:] *= 9
    assert not torch.allclose(layer(x2)[0], y)


def test_apply_act_false_is_affine_only():
    x = rand_x((2, 4, 3, 3))
    for layer in (EvoNormB0(4, apply_act=False), EvoNormS0(4, groups=2, apply_act=False)):
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
            layer.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        assert layer.v is None
        expected = x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(layer(x), expected)
    b0 = EvoNormB0(4, apply_act=False)
    assert b0.running_var is None
    b0.eval()
    b0(torch.randn(1, 4, 2, 2))


def test_functional_b0_matches_module():
    x = rand_x((3, 4, 5, 6))
    v, gamma, beta = rand_params(4)
    rv = torch.ones(4, dtype=D64)
    layer = set_params(EvoNormB0(4).double(), v, gamma, beta)
    torch.testing.assert_close(evonorm_b0(x, v, gamma, beta, rv, training=True, eps=1e-5), layer(x))
    torch.testing.assert_close(rv, layer.running_var)
    layer.eval()
    torch.testing.assert_close(evonorm_b0(x, v, gamma, beta, rv, training=False, eps=1e-5), layer(x))


def test_timm_reference_when_installed():
    timm_evo = pytest.importorskip("timm.layers.evo_norm")
    x = rand_x((2, 16, 5, 5), dtype=torch.float32)
    ours, theirs = EvoNormS0(16, groups=4), timm_evo.EvoNorm2dS0(16, groups=4, eps=1e-5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours_b, theirs_b = EvoNormB0(16, eps=1e-3), timm_evo.EvoNorm2dB0(16, eps=1e-3)
    torch.testing.assert_close(ours_b(x), theirs_b(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- autograd
def test_gradcheck_b0_and_s0():
    x = rand_x((2, 4, 3, 3)).requires_grad_()
    for layer in (EvoNormB0(4), EvoNormS0(4, groups=2)):
        layer = layer.double()
        v, gamma, beta = rand_params(4, seed=3)
        set_params(layer, v, gamma, beta)
        params = (layer.v, layer.weight, layer.bias)
        if isinstance(layer, EvoNormB0):
            def f(x, v, g, b):
                return evonorm_b0(x, v, g, b, None, training=True, eps=1e-5)
            rv = torch.ones(4, dtype=D64)
            assert torch.autograd.gradcheck(lambda x, v, g, b: evonorm_b0(x, v, g, b, rv, False), (x, *params))
        else:
            def f(x, v, g, b):
                return evonorm_s0(x, v, g, b, groups=2)
        assert torch.autograd.gradcheck(f, (x, *params))
        assert torch.autograd.gradgradcheck(f, (x, *params))


def test_backward_reaches_all_params():
    for layer in (EvoNormB0(6), EvoNormS0(6, groups=3)):
        x = torch.randn(2, 6, 4, 4, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for p in layer.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_half_precision_stats_in_float32():
    x = (torch.randn(2, 8, 16, 16) * 300).to(torch.bfloat16)  # x^2 sums would lose precision in bf16
    layer = EvoNormS0(8, groups=2).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref = EvoNormS0(8, groups=2)(x.float())
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    assert batch_var(x).dtype == torch.float32
    b0 = EvoNormB0(8).to(torch.bfloat16)
    assert torch.isfinite(b0(x)).all()


# ---------------------------------------------------------------------------------------- groups
def test_group_fallback_tf_vs_timm():
    assert resolve_groups(48, 32) == 24
    assert EvoNormS0(48).groups == 24
    assert resolve_groups(16, 32) == 16
    assert resolve_groups(64, 32) == 32
    assert resolve_groups(7, 4) == 1
    with pytest.raises(ValueError, match="groups=32 must divide num_features=48"):
        EvoNormS0(48, group_fallback=False)
    with pytest.raises(ValueError, match="group_size=5 must divide num_features=48"):
        EvoNormS0(48, group_size=5)


# ---------------------------------------------------------------------------------------- errors
def test_bad_arguments():
    with pytest.raises(ValueError, match="eps must be finite"):
        EvoNormB0(4, eps=float("nan"))
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        EvoNormS0(4, eps=0.0)
    with pytest.raises(ValueError, match="momentum must be finite"):
        EvoNormB0(4, momentum=float("inf"))
    with pytest.raises(ValueError, match=r"momentum must be finite and in \[0, 1\], got 1.5"):
        EvoNormB0(4, momentum=1.5)
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        EvoNormB0(0)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        EvoNormS0(4, groups=0)
    with pytest.raises(ValueError, match="apply_act must be a bool"):
        EvoNormS0(4, apply_act="yes")
    with pytest.raises(ValueError, match="group_fallback must be a bool"):
        EvoNormS0(4, group_fallback=None)


def test_bad_inputs():
    for layer in (EvoNormB0(4), EvoNormS0(4, groups=2)):
        with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\), got shape \(2, 4, 3\)"):
            layer(torch.randn(2, 4, 3))
        with pytest.raises(ValueError, match="expects 4 channels"):
            layer(torch.randn(2, 5, 3, 3))
        with pytest.raises(TypeError, match="floating-point"):
            layer(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs running_var"):
        evonorm_b0(torch.randn(2, 4, 3, 3), *rand_params(4, dtype=torch.float32), None, training=False)
    with pytest.raises(ValueError, match="groups=3 does not divide the 4 channels"):
        evonorm_s0(torch.randn(2, 4, 3, 3), *rand_params(4, dtype=torch.float32), groups=3)
    with pytest.raises(ValueError, match="eps must be finite"):
        evonorm_s0(torch.randn(2, 4, 3, 3), *rand_params(4, dtype=torch.float32), groups=2, eps=float("nan"))


# ---------------------------------------------------------------------------------------- replace_bn_relu
def test_replace_bn_relu_wiring():
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),
        nn.BatchNorm2d(8), nn.ReLU(),
    )
    assert replace_bn_relu(net, "S0", groups=4) == 3
    assert isinstance(net[1], EvoNormS0) and net[1].apply_act and net[1].groups == 4
    assert isinstance(net[2], nn.Identity)
    assert isinstance(net[3][1], EvoNormS0) and not net[3][1].apply_act
    assert isinstance(net[4], EvoNormS0) and net[4].apply_act and isinstance(net[5], nn.Identity)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in net.modules())
    assert net(torch.randn(2, 1, 6, 6)).shape == (2, 8, 4, 4)
    net2 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    assert replace_bn_relu(net2, "B0") == 1 and isinstance(net2[1], EvoNormB0)
    assert net2[1].weight.dtype == D64
    with pytest.raises(ValueError, match="kind must be one of"):
        replace_bn_relu(net2, "Z9")
    with pytest.raises(ValueError, match="apply_act is chosen per layer"):
        replace_bn_relu(net2, "S0", apply_act=False)


# ---------------------------------------------------------------------------------------- claim
def test_claim_registered():
    from gradkit.harness.claims import get_claim

    claim = get_claim("evonorm")
    assert claim.arxiv == "2004.02967" and claim.primary.ours == "s0_b2" and claim.primary.baseline == "bn_relu_b2"
    assert [v.name for v in claim.variants] == ["usps"]
    assert claim.resolve(claim.variants[0]).control == {"s0_b2": "bn_relu_b2"}
    for dotted in claim.uses:
        mod, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), name), dotted


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.evonorm import ARMS, CLAIM, SMALL_ARMS

    out = smoke_run("evonorm")
    assert out.data == "digits" and list(out.metrics) == list(ARMS)
    assert out.info["n_train"] == CLAIM.protocol.at("smoke").n_train
    for arm in SMALL_ARMS:  # 150 steps at batch 2: the loss decreases
        assert out.metrics[arm]["loss_last"] < out.metrics[arm]["loss_first"], arm
    assert set(out.curves["step_loss"]) == set(ARMS)
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 4 and isinstance(ok, bool)
    # reruns are bit-identical on CPU
    assert CLAIM.run(RunContext(scale="smoke", seed=0)).metrics == out.metrics


def test_claim_tunes_every_arm_on_validation():
    """With a grid, each arm trains once per lr factor on the training images minus the validation split and keeps
    the factor with the best validation accuracy; the grid is the same for every arm."""
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.evonorm import ARMS, CLAIM

    out = CLAIM.run(RunContext(scale="smoke", seed=0, overrides={"small_lr_factors": (0.3, 1.0),
                                                                     "normal_lr_factors": (0.3, 1.0),
                                                                     "n_train": 120}))
    for arm in ARMS:
        t = out.info["arms"][arm]["tuned"]
        assert t["grid"] == [0.3, 1.0], arm
        best = max(range(2), key=lambda i: (t["val_scores"][i], -i))
        assert t["chosen"] == t["grid"][best], arm
        assert out.metrics[arm]["lr"] == pytest.approx(t["base_lr"] * t["chosen"])
        assert out.metrics[arm]["test_acc"] == t["test_acc"][best]


def test_claim_models_use_evonorm():
    from gradkit.harness.claims.evonorm import build_resnet

    s0 = build_resnet("s0")
    kinds = [type(m) for m in s0.modules()]
    assert EvoNormS0 in kinds and nn.BatchNorm2d not in kinds and nn.ReLU not in kinds
    assert sum(isinstance(m, EvoNormS0) and not m.apply_act for m in s0.modules()) == 5  # 3 branch ends + 2 shortcuts
    assert all(m.groups == 8 for m in s0.modules() if isinstance(m, EvoNormS0))
    assert all(m.groups == 4 for m in build_resnet("s0", groups=4).modules() if isinstance(m, EvoNormS0))
    assert EvoNormB0 in [type(m) for m in build_resnet("b0").modules()]
    assert build_resnet("gn")(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="norm must be"):
        build_resnet("ln")


def test_claim_usps_missing_folder(tmp_path):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.evonorm import CLAIM
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "nope"))
    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_usps_real_data():
    import os

    root = Path(os.environ.get("GRADKIT_TEST_DATA", REPO.parent / "shared" / "data"))
    if not (root / "usps").is_dir():
        pytest.skip(f"no USPS under {root}")
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.evonorm import CLAIM, SMALL_ARMS

    out = CLAIM.run(RunContext(scale="smoke", seed=0, data_root=root))
    assert out.data == "usps" and set(out.metrics) == set(SMALL_ARMS)
    assert out.info["n_train"] == 100 and out.info["n_test"] == 2007
    assert all(math.isfinite(v) for m in out.metrics.values() for v in m.values())
    assert CLAIM.criterion_for(out.data) is CLAIM.variants[0].criterion


# ---------------------------------------------------------------------------------------- benchmark, docs, device
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.evonorm  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    names = [n for n in BENCHMARKS.names() if BENCHMARKS.get(n).slug == "evonorm"]
    assert len(names) == 2
    for n in names:
        b = BENCHMARKS.get(n)
        assert b.target is None and b.baseline == "BN-ReLU"
        r = b.run(1)
        assert math.isfinite(r.ratio) and r.ratio > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    x = torch.randn(4, 8, 6, 6, dtype=D64)
    for make in (lambda: EvoNormB0(8), lambda: EvoNormS0(8, groups=4)):
        a, b = make().double(), make().double().cuda()
        torch.testing.assert_close(b(x.cuda()).cpu(), a(x))
        if isinstance(a, EvoNormB0):
            torch.testing.assert_close(b.running_var.cpu(), a.running_var)
