"""gradient-noise: schedule, functional noise, GradientNoise transform, claim, benchmark, docs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.functional.noise import add_gradient_noise
from gradkit.optim.gradient_noise import GradientNoise
from gradkit.schedules.noise import annealed_noise_std

REPO = Path(__file__).resolve().parents[1]
N_BIG = 1_000_000


def _zero_grad_param(n: int = N_BIG, dtype=torch.float32) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(n, dtype=dtype))
    p.grad = torch.zeros_like(p)
    return p


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)


# ----------------------------------------------------------------------------- schedule
def test_schedule_values_and_decay():
    assert annealed_noise_std(0, 0.01) == pytest.approx(0.1)
    for t in (0, 1, 10, 1000):
        assert annealed_noise_std(t, 0.3, 0.55) == pytest.approx(math.sqrt(0.3 / (1 + t) ** 0.55), rel=1e-12)
    # the schedule is on the variance: sigma_t^2 * (1 + t)^gamma == eta
    assert annealed_noise_std(99, 1.0, 0.55) ** 2 * 100**0.55 == pytest.approx(1.0)
    stds = [annealed_noise_std(t, 1.0) for t in range(50)]
    assert all(a > b for a, b in zip(stds, stds[1:]))
    assert annealed_noise_std(5, 0.0) == 0.0
    assert annealed_noise_std(5, 0.2, gamma=0) == pytest.approx(math.sqrt(0.2))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(t=-1, eta=0.1), ValueError, "t must be finite and >= 0, got -1"),
    (dict(t=0, eta=float("nan")), ValueError, "eta must be finite"),
    (dict(t=0, eta=-0.1), ValueError, "eta must be finite and >= 0"),
    (dict(t=0, eta=0.1, gamma=-0.5), ValueError, "gamma must be finite and >= 0"),
    (dict(t=0, eta=0.1, gamma=float("inf")), ValueError, "gamma"),
    (dict(t=True, eta=0.1), TypeError, "t must be a real number"),
    (dict(t=0, eta="0.1"), TypeError, "eta must be a real number"),
])
def test_schedule_bad_inputs(kw, exc, match):
    with pytest.raises(exc, match=match):
        annealed_noise_std(**kw)


# ----------------------------------------------------------------------------- functional
@pytest.mark.parametrize("t", [0, 500])
def test_functional_noise_statistics(t):
    std = annealed_noise_std(t, eta=0.3)
    p = _zero_grad_param()
    add_gradient_noise([p], std, generator=torch.Generator().manual_seed(t))
    n = p.grad.double()
    # sample std of 1e6 normals has relative sd 1/sqrt(2e6) ~ 0.07%; the mean has sd std/1e3
    assert n.std().item() == pytest.approx(std, rel=5e-3)
    assert abs(n.mean().item()) < 5 * std / math.sqrt(N_BIG)
    assert torch.equal(p.detach(), torch.zeros(N_BIG))  # weights untouched: noise goes to .grad


def test_functional_matches_naive_reference_and_skips_none():
    a, b, c = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2))
    a.grad, b.grad = torch.randn(3, 4), torch.randn(5)
    ga, gb = a.grad.clone(), b.grad.clone()
    add_gradient_noise([a, c, b, a], 0.7, generator=torch.Generator().manual_seed(3))  # a listed twice
    g = torch.Generator().manual_seed(3)
    ref_a = ga + 0.7 * torch.randn(3, 4, generator=g)
    ref_b = gb + 0.7 * torch.randn(5, generator=g)
    torch.testing.assert_close(a.grad, ref_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.grad, ref_b, rtol=0, atol=1e-6)
    assert c.grad is None


def test_functional_single_tensor_and_zero_std_is_noop():
    p = nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    before = p.grad.clone()
    state = torch.get_rng_state()
    add_gradient_noise(p, 0.0)
    assert torch.equal(p.grad, before)
    assert torch.equal(torch.get_rng_state(), state)  # no random numbers drawn
    add_gradient_noise(p, 0.1)
    assert not torch.equal(p.grad, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_functional_keeps_grad_dtype(dtype):
    p = _zero_grad_param(20_000, dtype)
    add_gradient_noise([p], 0.5, generator=torch.Generator().manual_seed(0))
    assert p.grad.dtype == dtype
    assert p.grad.float().std().item() == pytest.approx(0.5, rel=0.05)


def test_functional_works_under_no_grad_and_noncontiguous_grad():
    p = nn.Parameter(torch.zeros(30, 20))
    p.grad = torch.zeros(20, 30).t()  # non-contiguous gradient
    with torch.no_grad():
        add_gradient_noise([p], 1.0, generator=torch.Generator().manual_seed(0))
    assert p.grad.shape == (30, 20) and p.grad.abs().sum() > 0


def test_functional_generator_reproducible():
    outs = []
    for seed in (5, 5, 6):
        p = _zero_grad_param(1000)
        add_gradient_noise([p], 1.0, generator=torch.Generator().manual_seed(seed))
        outs.append(p.grad.clone())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_functional_bad_inputs():
    p = _zero_grad_param(4)
    with pytest.raises(ValueError, match="std must be finite and >= 0, got -0.1"):
        add_gradient_noise([p], -0.1)
    with pytest.raises(ValueError, match="std must be finite"):
        add_gradient_noise([p], float("nan"))
    with pytest.raises(TypeError, match="std must be a real number"):
        add_gradient_noise([p], torch.tensor(0.1))
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got str"):
        add_gradient_noise([p, "w"], 0.1)
    with pytest.raises(TypeError, match="params must be a tensor or an iterable"):
        add_gradient_noise(3, 0.1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        add_gradient_noise([p], 0.1, generator=0)
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        add_gradient_noise(emb.parameters(), 0.1)
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    z.grad = torch.zeros(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="floating-point"):
        add_gradient_noise([z], 0.1)


# ----------------------------------------------------------------------------- GradientNoise
def test_transform_std_follows_schedule_at_two_steps():
    p = _zero_grad_param()
    gn = GradientNoise([p], eta=0.3, gamma=0.55, generator=torch.Generator().manual_seed(0))
    measured = {}
    for t in (0, 1, 2, 1000):
        if t == 1000:
            gn.load_state_dict({"step_count": 1000})
        p.grad.zero_()
        assert gn.step_count == t
        used = gn.apply()
        assert used == annealed_noise_std(t, 0.3, 0.55)
        measured[t] = p.grad.double().std().item()
        assert measured[t] == pytest.approx(used, rel=5e-3)
        assert abs(p.grad.double().mean().item()) < 5 * used / math.sqrt(N_BIG)
    # the decay matches the schedule: std ratio = ((1 + t1) / (1 + t0))^(-gamma / 2)
    assert measured[1000] / measured[0] == pytest.approx(1001 ** (-0.55 / 2), rel=1e-2)
    assert gn.step_count == 1001


def _train(model, steps=5, *, noise=None, mode="apply", accumulate=1, opt_cls=torch.optim.SGD):
    x, y = _data()
    opt = opt_cls(model.parameters(), lr=0.05)
    if noise is not None and mode == "hook":
        opt.register_step_pre_hook(noise.hook)
    for _ in range(steps):
        opt.zero_grad()
        for k in range(accumulate):
            sl = slice(k * 10, (k + 1) * 10) if accumulate > 1 else slice(None)
            nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        if noise is not None and mode == "apply":
            noise.apply()
        opt.step()
    return model


def test_eta_zero_is_bit_identical_training():
    clean = _train(_mlp())
    m = _mlp()
    gn = GradientNoise(m.parameters(), eta=0.0, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    _train(m, noise=gn, mode="hook")
    assert torch.equal(torch.get_rng_state(), state)
    assert gn.step_count == 5
    for a, b in zip(clean.parameters(), m.parameters()):
        assert torch.equal(a, b)
    noisy = _mlp()
    _train(noisy, noise=GradientNoise(noisy.parameters(), eta=0.01))
    assert any(not torch.equal(a, b) for a, b in zip(clean.parameters(), noisy.parameters()))


def test_hook_form_equals_apply_form_and_generator_reproducible():
    runs = []
    for mode, seed in (("apply", 1), ("hook", 1), ("hook", 2)):
        m = _mlp()
        _train(m, noise=GradientNoise(m.parameters(), eta=0.05, generator=torch.Generator().manual_seed(seed)),
               mode=mode, opt_cls=torch.optim.Adam)
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert any(not torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


def test_step_counter_once_per_optimizer_step_with_accumulation():
    m = _mlp()
    gn = GradientNoise(m.parameters(), eta=0.01, generator=torch.Generator().manual_seed(0))
    _train(m, steps=3, noise=gn, mode="hook", accumulate=4)
    assert gn.step_count == 3
    # after accumulation the noise is added exactly once: grads = accumulated clean grads + one draw
    m1, m2 = _mlp(), _mlp()
    x, y = _data()
    for mm in (m1, m2):
        for k in range(4):
            nn.functional.cross_entropy(mm(x[k * 10:(k + 1) * 10]), y[k * 10:(k + 1) * 10]).backward()
    gn = GradientNoise(m2.parameters(), eta=0.01, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.SGD(m2.parameters(), lr=0.0)
    opt.register_step_pre_hook(gn.hook)
    opt.step()
    g = torch.Generator().manual_seed(9)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        ref = p1.grad + 0.1 * torch.randn(p1.shape, generator=g)
        torch.testing.assert_close(p2.grad, ref, rtol=0, atol=1e-7)
    assert gn.step_count == 1


def test_param_groups_and_none_grads():
    m = _mlp()
    opt = torch.optim.SGD([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.1}], lr=0.01)
    gn = GradientNoise(opt.param_groups + [{"params": list(m[4].parameters())}], eta=0.1)
    assert len(gn.params) == 6
    nn.functional.cross_entropy(m[:2](_data()[0]) @ torch.ones(16, 3), _data()[1]).backward()
    gn.apply()  # m[2], m[4] have no grads: skipped
    assert m[2].weight.grad is None and m[4].weight.grad is None
    assert "eta=0.1" in repr(gn)


def test_state_dict_round_trip_resumes_identically():
    p1, p2 = _zero_grad_param(100), _zero_grad_param(100)
    gn1 = GradientNoise([p1], eta=0.2, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        gn1.apply()
    sd = gn1.state_dict()
    assert sd["step_count"] == 3
    gn2 = GradientNoise([p2], eta=0.2, generator=torch.Generator().manual_seed(123))
    gn2.load_state_dict(sd)
    p1.grad.zero_(), p2.grad.zero_()
    assert gn1.apply() == gn2.apply() == annealed_noise_std(3, 0.2)
    assert torch.equal(p1.grad, p2.grad)
    assert gn2.step_count == 4


def test_clip_order_after_and_before():
    def setup(order):
        p = nn.Parameter(torch.zeros(10_000))
        p.grad = torch.full((10_000,), 0.1)  # norm 10
        return p, GradientNoise([p], eta=0.25, gamma=0.55, clip_norm=1.0, order=order,
                                generator=torch.Generator().manual_seed(0))

    p, gn = setup("after_clip")
    gn.apply()
    noise = 0.5 * torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.grad, torch.full((10_000,), 0.01) + noise, rtol=0, atol=1e-6)
    assert p.grad.norm() > 10  # the noise (norm ~50) is not clipped

    p, gn = setup("before_clip")
    gn.apply()
    noisy = torch.full((10_000,), 0.1) + noise
    ref = noisy * (1.0 / (noisy.norm() + 1e-6))
    torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
    assert p.grad.norm() <= 1.0 + 1e-5


def test_transform_bad_inputs():
    p = _zero_grad_param(4)
    with pytest.raises(ValueError, match="eta must be finite and >= 0, got -1"):
        GradientNoise([p], eta=-1)
    with pytest.raises(ValueError, match="gamma must be finite"):
        GradientNoise([p], gamma=float("nan"))
    with pytest.raises(ValueError, match="order must be one of"):
        GradientNoise([p], order="during")
    with pytest.raises(ValueError, match="order='before_clip' needs clip_norm"):
        GradientNoise([p], order="before_clip")
    with pytest.raises(ValueError, match="clip_norm must be finite and > 0, got 0"):
        GradientNoise([p], clip_norm=0)
    with pytest.raises(TypeError, match="clip_norm must be a positive number or None"):
        GradientNoise([p], clip_norm=True)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        GradientNoise([p], generator="cpu")
    with pytest.raises(ValueError, match="params is empty"):
        GradientNoise([])
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        GradientNoise([1.0])
    with pytest.raises(ValueError, match="dict without a 'params' key"):
        GradientNoise([{"lr": 0.1}])
    gn = GradientNoise([p])
    with pytest.raises(ValueError, match="'step_count'"):
        gn.load_state_dict({})
    with pytest.raises(ValueError, match="non-negative int, got -3"):
        gn.load_state_dict({"step_count": -3})
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    gn = GradientNoise(emb.parameters(), clip_norm=1.0)
    with pytest.raises(ValueError, match="sparse"):
        gn.apply()
    assert gn.step_count == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grads_with_cpu_and_cuda_generators():
    p_cpu, p_gpu = _zero_grad_param(1000), _zero_grad_param(1000)
    p_gpu.data, p_gpu.grad = p_gpu.data.cuda(), p_gpu.grad.cuda()
    GradientNoise([p_cpu], eta=0.1, generator=torch.Generator().manual_seed(0)).apply()
    GradientNoise([p_gpu], eta=0.1, generator=torch.Generator().manual_seed(0)).apply()
    assert p_gpu.grad.device.type == "cuda"
    torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad)  # CPU generator: device-independent noise
    p_gpu.grad.zero_()
    GradientNoise([p_gpu], eta=0.1, generator=torch.Generator(device="cuda").manual_seed(0)).apply()
    assert p_gpu.grad.std().item() == pytest.approx(math.sqrt(0.1), rel=0.1)


# ----------------------------------------------------------------------------- claim
@pytest.fixture(scope="module")
def claim():
    from gradkit.harness.claims import get_claim

    return get_claim("gradient-noise")


def test_claim_registered(claim):
    assert claim.arxiv == "1511.06807" and claim.primary.ours == "simple+noise"
    assert [v.name for v in claim.variants] == ["mnist"] and "test_acc" in claim.plots
    assert "gradkit.optim.gradient_noise.GradientNoise" in claim.uses


def test_claim_smoke(claim, smoke_run):
    out = smoke_run("gradient-noise")
    p = claim.protocol.at("smoke")
    assert out.data == "digits"
    judged = ("simple", "simple+noise", "good", "good+noise")
    for arm, m in out.metrics.items():
        if arm in judged or not m["diverged"]:
            assert 0 < m["final_train_loss"] < 20
            assert m["best_test_acc"] >= m["final_test_acc"]
        assert len(out.curves["test_acc"][arm]) <= p.epochs
    # noise statistics of the noise actually added during training, at two different t
    probe = out.info["arms"]["simple+noise"]["noise_probe"]
    assert len(probe) == 2
    for t, (emp_std, emp_mean, sigma, count) in probe.items():
        assert sigma == pytest.approx(annealed_noise_std(t, p.eta, p.gamma))
        assert emp_std == pytest.approx(sigma, rel=0.05)
        assert abs(emp_mean) < 5 * sigma / math.sqrt(count)
    assert out.info["arms"]["simple"]["noise_probe"] == {}


def test_claim_rerun_bit_identical(claim, smoke_run):
    from gradkit.harness.claims import RunContext

    again = claim.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("gradient-noise").metrics
    assert again.curves == smoke_run("gradient-noise").curves


def test_claim_eta_zero_override_turns_noise_off(claim):
    # with eta = 0 every noisy arm trains exactly as its noiseless twin (same init and batch order)
    from gradkit.harness.claims import RunContext

    out = claim.run(RunContext(scale="smoke", seed=0, overrides={"eta": 0.0, "epochs": 1}))
    assert out.info["overrides"] == {"eta": 0.0, "epochs": 1}
    assert out.metrics["simple+noise"] == out.metrics["simple"]
    assert out.metrics["good+noise"] == out.metrics["good"]
    assert out.info["arms"]["simple+noise"]["noise_probe"] == {}
    assert out.metrics["simple+noise0.1"] != out.metrics["simple"]  # eta_high still adds noise


def test_claim_missing_real_data_raises(claim, tmp_path):
    from gradkit.harness.claims import RunContext
    from gradkit.data import DataError

    with pytest.raises(DataError):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_smoke_real_mnist(claim, data_root, smoke_run):
    if not (data_root / "mnist").is_dir():
        pytest.skip("real MNIST files not present")
    out = smoke_run("gradient-noise", data_root=data_root)
    assert out.data == "mnist"
    assert out.info["n_train"] == out.info["protocol"]["n_train"] == 2000 and out.info["n_test"] == 10_000
    for arm in ("simple", "simple+noise", "good", "good+noise"):
        m = out.metrics[arm]
        assert math.isfinite(m["final_train_loss"]) and 0 <= m["best_test_acc"] <= 100


# ----------------------------------------------------------------------------- benchmark, docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.gradient_noise  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("gradient-noise-step")
    assert b.slug == "gradient-noise" and b.target == 1.05
    r = b.run(2)
    assert r.baseline_s > 0 and math.isfinite(r.ratio)


