"""Tests of DANN (paper slug ``dann``): gradient reversal, domain head and loss, schedules, proxy
A-distance, moons data, the claim at smoke scale, the benchmark and the docs page."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.harness.claims import CLAIMS, RunContext
from gradkit.data import DataError
from gradkit.data.moons import make_moons_domains
from gradkit.functional.reversal import GradReverse, grad_reverse
from gradkit.nn.gradient_reversal import DomainClassifier, GradientReversal, domain_loss
from gradkit.probes.domain import proxy_a_distance
from gradkit.schedules.dann import dann_lambda, dann_lr, dann_lr_lambda

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GRADKIT_TEST_DATA", REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="module")
def dann_claim():
    import gradkit.harness.claims.dann as mod

    return mod


# --------------------------------------------------------------------------- gradient reversal
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_is_bit_identical_view(dtype):
    x = torch.randn(5, 7).to(dtype).requires_grad_()
    y = grad_reverse(x, 0.3)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)
    assert y.data_ptr() == x.data_ptr()  # a view, no copy


@pytest.mark.parametrize("lam", [1.0, 0.25, 6.0, -1.0, 0.0])
def test_backward_is_minus_lambda_times_upstream(lam):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, requires_grad=True)
    up = torch.randn(4, 3, generator=g)
    grad_reverse(x, lam).backward(up)
    assert torch.equal(x.grad, up * -lam)


def test_backward_with_tensor_lambda_and_no_grad_for_lambda():
    x = torch.randn(6, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6)
    grad_reverse(x, lam).backward(up)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, up * -torch.tensor(0.7, dtype=torch.float32))
    assert lam.grad is None


def test_lambda_value_is_taken_at_forward_time():
    x = torch.randn(3, requires_grad=True)
    lam = torch.tensor(2.0)
    y = grad_reverse(x, lam)
    lam.fill_(5.0)  # edited after the forward
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))


def test_composite_gradient_matches_analytic_and_finite_differences_float64():
    # d/dx sum(w * R(x)) = -lambda * w  (the GRL's gradient is that of x -> -lambda x)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    lam = 0.8
    (grad,) = torch.autograd.grad((w * grad_reverse(x, lam)).sum(), x)
    torch.testing.assert_close(grad, -lam * w, rtol=0, atol=1e-15)

    def ref(v):
        return float((-lam * w * v).sum())

    eps = 1e-6
    fd = torch.tensor([(ref(x.detach() + eps * e) - ref(x.detach() - eps * e)) / (2 * eps)
                       for e in torch.eye(5, dtype=torch.float64)], dtype=torch.float64)
    torch.testing.assert_close(grad, fd, rtol=1e-8, atol=1e-9)


def test_gradcheck_float64():
    # with lambda = -1 the reversal is a true identity, so torch's gradcheck applies as is
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: GradReverse.apply(t, -1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: grad_reverse(t, torch.tensor(-1.0, dtype=torch.float64)) ** 3, (x,))
    assert torch.autograd.gradgradcheck(lambda t: grad_reverse(t, -1.0) ** 2, (x,))

    # any other lambda: the backward is by design not the derivative of the (identity) forward,
    # so compare the Jacobian autograd builds for R with that of x -> -lambda x
    lam = 0.37
    jac = torch.autograd.functional.jacobian(lambda t: grad_reverse(t, lam), x)
    ref = torch.autograd.functional.jacobian(lambda t: -lam * t, x)
    torch.testing.assert_close(jac, ref, rtol=0, atol=0)


def test_reversal_inside_a_network_negates_only_upstream_gradients():
    torch.manual_seed(0)
    G_f, G_d = nn.Linear(4, 6), nn.Linear(6, 1)
    x = torch.randn(8, 4)
    lam = 0.4

    def grads(with_grl: bool):
        for p in (*G_f.parameters(), *G_d.parameters()):
            p.grad = None
        f = G_f(x)
        out = G_d(grad_reverse(f, lam) if with_grl else f)
        out.pow(2).sum().backward()
        return [p.grad.clone() for p in G_f.parameters()], [p.grad.clone() for p in G_d.parameters()]

    (f_plain, d_plain), (f_rev, d_rev) = grads(False), grads(True)
    for a, b in zip(d_plain, d_rev):
        assert torch.equal(a, b)  # the classifier's own gradient is untouched
    for a, b in zip(f_plain, f_rev):
        torch.testing.assert_close(b, -lam * a, rtol=1e-6, atol=1e-7)


def test_module_mutable_lambda_and_repr():
    grl = GradientReversal(0.5)
    assert "lambda_=0.5" in repr(grl)
    grl.lambda_ = 2.0
    x = torch.ones(2, requires_grad=True)
    grl(x).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), -2.0))
    grl.lambda_ = torch.tensor(0.1)
    assert "lambda_=0.1" in repr(grl)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan")),
                                 torch.tensor([1.0, 2.0])])
def test_bad_lambda_value_raises(bad):
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="lambda_"):
        grad_reverse(x, bad)
    with pytest.raises(ValueError, match="lambda_"):
        GradientReversal(bad)
    grl = GradientReversal()
    with pytest.raises(ValueError, match="lambda_"):
        grl.lambda_ = bad


@pytest.mark.parametrize("bad", ["1.0", None, True, [1.0]])
def test_bad_lambda_type_raises(bad):
    with pytest.raises(TypeError, match="lambda_"):
        grad_reverse(torch.ones(2), bad)


def test_bad_x_raises():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        grad_reverse([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        grad_reverse(torch.arange(3))
    with pytest.raises(ValueError, match="lambda_"):
        grad_reverse(torch.ones(2), torch.tensor(1.0 + 1.0j))


# ---------------------------------------------------------------------- domain head and loss
def test_domain_classifier_shapes_and_reversal():
    torch.manual_seed(0)
    head = DomainClassifier(12, hidden=7)
    plain = DomainClassifier(12, hidden=7, grl=False)
    plain.load_state_dict(head.state_dict())
    f = torch.randn(5, 3, 4, requires_grad=True)  # flattened to 12
    out = head(f)
    assert out.shape == (5,)
    out.sum().backward()
    g_rev = f.grad.clone()
    f.grad = None
    plain(f).sum().backward()
    torch.testing.assert_close(g_rev, -f.grad)
    for a, b in zip(head.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert DomainClassifier(12, hidden=None)(torch.randn(3, 12)).shape == (3,)
    assert "hidden=7" in repr(head)


def test_domain_classifier_bad_args():
    with pytest.raises(ValueError, match="in_dim"):
        DomainClassifier(0)
    with pytest.raises(ValueError, match="hidden"):
        DomainClassifier(4, hidden=-1)
    with pytest.raises(TypeError, match="grl"):
        DomainClassifier(4, grl="yes")
    with pytest.raises(ValueError, match="in_dim=4"):
        DomainClassifier(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="features"):
        DomainClassifier(4)(torch.randn(4))


def test_domain_loss_matches_naive_and_uses_both_halves():
    g = torch.Generator().manual_seed(0)
    ds = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    dt = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    sig = torch.sigmoid
    naive = -torch.log(1 - sig(ds)).mean() - torch.log(sig(dt)).mean()
    loss = domain_loss(ds, dt)
    torch.testing.assert_close(loss, naive)
    naive_mean = -(torch.log(1 - sig(ds)).sum() + torch.log(sig(dt)).sum()) / 8
    torch.testing.assert_close(domain_loss(ds, dt, reduction="mean"), naive_mean)
    loss.backward()
    assert (ds.grad > 0).all() and (dt.grad < 0).all()  # both halves get a gradient, opposite labels
    # a confidently-wrong target half is penalised even when the source half is perfect
    perfect_src = torch.full((4,), -20.0)
    assert domain_loss(perfect_src, torch.full((4,), -20.0)) > 19.0
    assert domain_loss(perfect_src, torch.full((4,), 20.0)) < 1e-6


def test_domain_loss_bad_args():
    with pytest.raises(ValueError, match="src_logits"):
        domain_loss(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="tgt_logits"):
        domain_loss(torch.zeros(2), torch.zeros(0))
    with pytest.raises(TypeError, match="src_logits"):
        domain_loss([0.0], torch.zeros(1))
    with pytest.raises(ValueError, match="reduction"):
        domain_loss(torch.zeros(2), torch.zeros(2), reduction="sum")


# -------------------------------------------------------------------------------- schedules
def test_schedules_values():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(0.5, gamma=4.0) == pytest.approx(2 / (1 + math.exp(-2)) - 1)
    ps = np.linspace(0, 1, 11)
    lams = [dann_lambda(float(p)) for p in ps]
    assert all(b > a for a, b in zip(lams, lams[1:]))
    assert dann_lr(0.0) == pytest.approx(0.01)
    assert dann_lr(1.0) == pytest.approx(0.01 / 11 ** 0.75)
    assert dann_lr(0.3, lr0=0.1, alpha=5, beta=0.5) == pytest.approx(0.1 / 2.5 ** 0.5)


def test_lr_lambda_with_lambdalr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01, momentum=0.9)
    total = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, dann_lr_lambda(total))
    for step in range(total + 3):  # stepping past the end stays at the final value
        assert opt.param_groups[0]["lr"] == pytest.approx(dann_lr(min(step / total, 1.0)))
        opt.step()
        sched.step()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_schedules_bad_progress(p):
    with pytest.raises(ValueError, match="progress"):
        dann_lambda(p)
    with pytest.raises(ValueError, match="progress"):
        dann_lr(p)


def test_schedules_bad_args():
    with pytest.raises(TypeError, match="progress"):
        dann_lambda(True)
    with pytest.raises(ValueError, match="gamma"):
        dann_lambda(0.5, gamma=0.0)
    with pytest.raises(ValueError, match="lr0"):
        dann_lr(0.5, lr0=0.0)
    with pytest.raises(ValueError, match="alpha"):
        dann_lr(0.5, alpha=-1.0)
    with pytest.raises(ValueError, match="beta"):
        dann_lr(0.5, beta=float("inf"))
    with pytest.raises(ValueError, match="total_steps"):
        dann_lr_lambda(0)


# ------------------------------------------------------------------------- proxy A-distance
def test_proxy_a_distance_range_and_extremes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    same = proxy_a_distance(a, b)
    assert 0.0 <= same <= 0.4
    assert proxy_a_distance(a, b + 10.0) == 2.0
    assert proxy_a_distance(a.numpy(), b.numpy(), seed=3) == proxy_a_distance(a, b, seed=3)
    mid = proxy_a_distance(a, b + 1.0)
    assert same < mid < 2.0


def test_proxy_a_distance_bad_args():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match="same number of features"):
        proxy_a_distance(a, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="feat_src must be a 2-D"):
        proxy_a_distance(np.zeros(10), a)
    with pytest.raises(ValueError, match="feat_tgt needs at least 2"):
        proxy_a_distance(a, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="feat_src must be finite"):
        proxy_a_distance(np.full((10, 3), np.nan), a)
    with pytest.raises(ValueError, match="seed"):
        proxy_a_distance(a, a, seed=-1)
    with pytest.raises(ValueError, match="C must be"):
        proxy_a_distance(a, a, C=[0.0])


# ------------------------------------------------------------------------------------ moons
def test_moons_construction():
    from sklearn.datasets import make_moons

    d = make_moons_domains()
    assert d.x_source.shape == (150, 2) and d.x_target.shape == (150, 2)
    assert d.x_source.dtype == torch.float32 and d.y_source.dtype == torch.int64
    assert torch.bincount(d.y_source).tolist() == [75, 75]
    torch.testing.assert_close(d.x_source.double().mean(0), torch.zeros(2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # undo the 35-degree rotation: the target is the second draw, shifted by the source mean, x2
    m1, _ = make_moons(150, noise=0.05, random_state=1)
    m2, y2 = make_moons(150, noise=0.05, random_state=2)
    a = math.radians(-35.0)
    back = d.x_target.double().numpy() @ np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]).T
    np.testing.assert_allclose(back, 2 * (m2 - m1.mean(0)), atol=1e-5)
    np.testing.assert_array_equal(d.y_target.numpy(), y2)
    # counter-clockwise: (1, 0) goes to (cos 35, sin 35)
    d0 = make_moons_domains(theta=0.0)
    np.testing.assert_allclose(d0.x_target.numpy(), (2 * (m2 - m1.mean(0))).astype(np.float32), atol=1e-6)
    held = make_moons_domains(target_state=3, n_target=400)
    assert held.x_target.shape == (400, 2)
    assert torch.equal(held.x_source, d.x_source)


def test_moons_bad_args():
    with pytest.raises(ValueError, match="n must"):
        make_moons_domains(n=1)
    with pytest.raises(ValueError, match="noise"):
        make_moons_domains(noise=-0.1)
    with pytest.raises(ValueError, match="theta"):
        make_moons_domains(theta=float("nan"))
    with pytest.raises(ValueError, match="n_target"):
        make_moons_domains(n_target=0)


# -------------------------------------------------------------------------------- the claim
@pytest.mark.parametrize("form", ["paper", "common"])
def test_lambda_zero_training_equals_source_only(dann_claim, form):
    data = make_moons_domains()
    kw = dict(form=form, epochs=2, lr=0.05, batch_size=1, hidden=15, seed=3)
    m0, h0 = dann_claim.train_shallow(data, arm="source_only", lam=6.0, **kw)
    m1, h1 = dann_claim.train_shallow(data, arm="dann", lam=0.0, **kw)
    for name in ("hidden_layer.weight", "hidden_layer.bias", "out.weight", "out.bias"):
        assert torch.equal(m0.state_dict()[name], m1.state_dict()[name]), name
    assert h0.series("target_acc") == h1.series("target_acc")
    # and with lambda > 0 the feature layer does move differently
    m2, _ = dann_claim.train_shallow(data, arm="dann", lam=6.0, **kw)
    assert not torch.equal(m0.hidden_layer.weight, m2.hidden_layer.weight)


def test_claim_domain_loss_gets_both_halves(dann_claim, monkeypatch):
    seen = []
    real = dann_claim.domain_loss

    def spy(src, tgt, reduction="per_domain"):
        seen.append((len(src), len(tgt), reduction))
        return real(src, tgt, reduction=reduction)

    monkeypatch.setattr(dann_claim, "domain_loss", spy)
    data = make_moons_domains()
    dann_claim.train_shallow(data, arm="dann", lam=6.0, form="paper", epochs=1, lr=0.05, batch_size=4,
                             hidden=15, seed=0)
    assert len(seen) == 38  # ceil(150 / 4) steps, every one with a source and a target half
    assert all(s == t and s >= 1 and r == "per_domain" for s, t, r in seen)


def test_training_bad_args(dann_claim):
    data = make_moons_domains()
    with pytest.raises(ValueError, match="arm"):
        dann_claim.train_shallow(data, arm="nn", lam=1.0, form="paper", epochs=1, lr=0.1,
                                 batch_size=1, hidden=3, seed=0)
    with pytest.raises(ValueError, match="form"):
        dann_claim.train_shallow(data, arm="dann", lam=1.0, form="exact", epochs=1, lr=0.1,
                                 batch_size=1, hidden=3, seed=0)


def test_claim_registered(dann_claim):
    c = CLAIMS.get("dann")
    assert c is dann_claim.CLAIM
    assert c.arxiv == "1505.07818"
    assert c.primary.ours == "dann" and c.primary.baseline == "source_only"
    assert [v.name for v in c.variants] == ["mnist->mnist-m", "amazon"]
    assert c.variant_for("quick", DATA).name == "mnist->mnist-m" and c.variant_for("full", DATA).name == "amazon"
    assert c.variant_for("quick", None) is None
    assert "target_acc" in c.plots


def test_claim_smoke(dann_claim, smoke_run):
    out = smoke_run("dann")
    assert out.data == "moons"
    for arm in ("source_only", "dann"):
        assert len(out.curves["target_acc"][arm]) == dann_claim.CLAIM.protocol.at("smoke").epochs
    assert out.metrics["dann"]["domain_loss"] > 0
    # reruns are bit-identical on CPU
    again = dann_claim.CLAIM.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == out.metrics


def test_claim_protocol_override_reaches_the_arms(dann_claim, smoke_run):
    # lambda_max = 0 switches the domain term off: the DANN arm then trains exactly as source-only
    out = dann_claim.CLAIM.run(RunContext(scale="smoke", seed=0, overrides={"lambda_max": 0.0}))
    assert out.info["overrides"] == {"lambda_max": 0.0} and out.info["protocol"]["lambda_max"] == 0.0
    for k in ("target_acc", "source_acc", "target_heldout_acc"):
        assert out.metrics["dann"][k] == out.metrics["source_only"][k]
    assert out.metrics != smoke_run("dann").metrics


def test_claim_missing_real_data_raises(dann_claim, tmp_path):
    with pytest.raises(DataError):
        dann_claim.CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


@pytest.mark.skipif(not (DATA / "mnist").is_dir() or not (DATA / "mnist_m").is_dir(),
                    reason=f"MNIST / MNIST-M not found under {DATA} (set GRADKIT_TEST_DATA)")
def test_claim_smoke_real_data(dann_claim):
    out = dann_claim.CLAIM.run(RunContext(scale="smoke", seed=0, data_root=DATA))
    assert out.data == "mnist->mnist-m"
    for m in out.metrics.values():
        assert 0.0 <= m["target_acc"] <= 100.0 and 0.0 <= m["source_acc"] <= 100.0
    assert math.isfinite(out.metrics["dann"]["domain_loss"])
    assert dann_claim.CLAIM.criterion_for(out.data) is dann_claim.CLAIM.variants[0].criterion


def test_digits_cnn_init_options(dann_claim):
    """The MNIST-M CNN: PyTorch's init or truncated-normal weights (sigma 0.1, cut at 2 sigma) with biases 0.1."""
    DigitsDANN = dann_claim.DigitsDANN
    net = DigitsDANN(init="trunc_normal", generator=torch.Generator().manual_seed(0)).requires_grad_(False)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 7  # 2 convs, 3 label layers, 2 domain layers
    for m in layers:
        assert torch.all(m.bias == 0.1)
        assert float(m.weight.abs().max()) <= 0.2
    big = net.label[0].weight  # 120,000 draws
    assert 0.085 < float(big.std()) < 0.095  # N(0, 0.01) cut at 2 sigma has std 0.088
    again = DigitsDANN(init="trunc_normal", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.label[0].weight, big)
    assert float(DigitsDANN(init="torch").label[0].weight.detach().abs().max()) < 0.03  # kaiming-uniform bound 1/sqrt(1200)
    with pytest.raises(ValueError, match="init must be 'torch' or 'trunc_normal'"):
        DigitsDANN(init="xavier")


# ------------------------------------------------------------------------ benchmark and docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.dann as bench_mod
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("dann-grl-step")
    assert b.slug == "dann" and b.target == 1.05
    r = bench_mod.run(repeats=1)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)


