"""Shared Gaussian diffusion utilities: schedule invariants, noising, loss, and DDIM on a Gaussian whose
noised scores are known in closed form."""
import math

import pytest
import torch

from gradkit.generative.diffusion import GaussianDiffusion, VPSchedule, timestep_embedding


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_invariants(kind):
    sch = VPSchedule(kind, num_timesteps=200)
    t = torch.arange(200)
    a, s = sch.alpha_sigma(t)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones(200, dtype=torch.float64))
    assert bool((sch.abar[1:] < sch.abar[:-1]).all())  # strictly decreasing
    assert 0.9 < float(sch.abar[0]) < 1.0 and float(sch.abar[-1]) < 0.01
    assert bool((sch.betas > 0).all()) and bool((sch.betas <= 0.999).all())


def test_cosine_matches_closed_form():
    T, s = 1000, 0.008
    sch = VPSchedule("cosine", num_timesteps=T, s=s)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # away from the 0.999 beta cap
        assert float(sch.abar[t]) == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)


def test_q_sample_and_inverses():
    g = torch.Generator().manual_seed(0)
    diff = GaussianDiffusion(VPSchedule(num_timesteps=100))
    x0 = torch.randn(16, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (16,), generator=g)
    x_t = diff.q_sample(x0, t, eps)
    assert torch.allclose(diff.predict_x0(x_t, t, eps), x0)
    score = diff.score_from_eps(eps, t)
    assert torch.allclose(diff.eps_from_score(score, t), eps)
    # scalar t broadcasts to the batch
    assert torch.allclose(diff.q_sample(x0, 5, eps), diff.q_sample(x0, torch.full((16,), 5), eps))


def test_loss_of_the_oracle_and_per_sample():
    diff = GaussianDiffusion(VPSchedule(num_timesteps=50))
    x0 = torch.zeros(32, 2)  # point mass at 0: eps = x_t / sigma_t exactly
    def oracle(x_t, t):
        _, s = diff.schedule.alpha_sigma(t, like=x_t)
        return x_t / s[:, None]
    g = torch.Generator().manual_seed(1)
    assert float(diff.loss(oracle, x0, generator=g)) < 1e-10
    per = diff.loss(lambda x_t, t: torch.zeros_like(x_t), x0, reduction="none", generator=g)
    assert per.shape == (32,)


def test_ddim_recovers_a_gaussian_from_its_exact_scores():
    # data N(mu, s^2 I): x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2); eps*(x_t) = sigma (x_t - alpha mu) / v_t
    mu, sd = 1.5, 0.5
    sch = VPSchedule(num_timesteps=1000)
    diff = GaussianDiffusion(sch)
    def eps_exact(x_t, t):
        a, s = sch.alpha_sigma(t, like=x_t)
        a, s = a[:, None], s[:, None]
        return s * (x_t - a * mu) / (a ** 2 * sd ** 2 + s ** 2)
    g = torch.Generator().manual_seed(0)
    x = diff.ddim_sample(eps_exact, (20000, 1), steps=100, generator=g, dtype=torch.float64)
    assert float(x.mean()) == pytest.approx(mu, abs=0.03)
    assert float(x.std()) == pytest.approx(sd, rel=0.05)
    # stochastic sampler (eta = 1) targets the same distribution
    x1 = diff.ddim_sample(eps_exact, (20000, 1), steps=100, eta=1.0, generator=g, dtype=torch.float64)
    assert float(x1.mean()) == pytest.approx(mu, abs=0.03)
    assert float(x1.std()) == pytest.approx(sd, rel=0.08)


def test_ddim_deterministic_and_clip():
    diff = GaussianDiffusion(VPSchedule(num_timesteps=100))
    net = lambda x_t, t, scale=1.0: scale * x_t
    xT = torch.randn(5, 3)
    a = diff.ddim_sample(net, (5, 3), steps=10, x_T=xT, scale=0.5)
    b = diff.ddim_sample(net, (5, 3), steps=10, x_T=xT, scale=0.5)
    assert torch.equal(a, b)
    c = diff.ddim_sample(net, (5, 3), steps=10, x_T=xT * 10, clip=1.0)
    assert float(c.abs().max()) <= 1.0 + 1e-6


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 3, 999]), 9)
    assert e.shape == (3, 9)
    assert torch.allclose(e[0, :4], torch.ones(4)) and torch.allclose(e[:, -1], torch.zeros(3))
    assert torch.allclose(e.pow(2)[:, :8].sum(1), torch.full((3,), 4.0))


def test_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        VPSchedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        VPSchedule(num_timesteps=1)
    diff = GaussianDiffusion(VPSchedule(num_timesteps=10))
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must lie in 0\.\.9"):
        diff.q_sample(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(TypeError, match="integer timesteps"):
        diff.q_sample(x, torch.tensor([0.5] * 4))
    with pytest.raises(ValueError, match="one timestep per sample"):
        diff.q_sample(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="noise must have"):
        diff.q_sample(x, 1, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="steps"):
        diff.ddim_sample(lambda x_t, t: x_t, (2, 2), steps=11)
    with pytest.raises(ValueError, match="model must return"):
        diff.loss(lambda x_t, t: x_t[:, :1], x)
    with pytest.raises(TypeError, match="VPSchedule"):
        GaussianDiffusion("cosine")
