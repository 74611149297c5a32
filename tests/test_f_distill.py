"""f-distill: f-divergence weights, the generator surrogate, DSM / ratio losses, the exact mixture teacher."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradkit.generative.diffusion import VPSchedule
from gradkit.generative.f_distill import (
    F_DIVERGENCES, FDistillLoss, dsm_loss, f_distill_surrogate, f_divergence_weight, f_function, ratio_bce_loss,
)
from gradkit.generative.mixture import GaussianMixture, mode_coverage, rbf_mmd, ring_means

SQ = 1.5  # q_theta = N(theta, SQ^2), wider than p = N(0, 1)


def _log_normal(x, mu, s):
    return -0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def _quad_divergence(kind: str, theta: float) -> float:
    """D_f(p || q_theta) = int q f(p/q) dx by the trapezoid rule (float64)."""
    x = torch.linspace(-25, 25, 400_001, dtype=torch.float64)
    log_q = _log_normal(x, theta, SQ)
    r = torch.exp(_log_normal(x, 0.0, 1.0) - log_q)
    return float(torch.trapezoid(log_q.exp() * f_function(kind)(r), x))


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_surrogate_gradient_matches_quadrature(kind):
    """The Monte-Carlo surrogate gradient equals d/dtheta of D_f (exact scores and ratio, no noise)."""
    theta0, eps = 0.7, 1e-4
    fd = (_quad_divergence(kind, theta0 + eps) - _quad_divergence(kind, theta0 - eps)) / (2 * eps)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1_000_000, 1, dtype=torch.float64, generator=g)
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    x = theta + SQ * z
    xd = x.detach()
    s_p, s_q = -xd, -(xd - theta0) / SQ ** 2
    log_r = (_log_normal(xd, 0.0, 1.0) - _log_normal(xd, theta0, SQ)).reshape(-1)
    f_distill_surrogate(x, s_p, s_q, log_r, kind, normalize=None, clip=None).backward()
    assert abs(float(theta.grad) - fd) <= 0.01 * abs(fd), (kind, float(theta.grad), fd)


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_weight_is_second_derivative_of_f(kind):
    """h(r) = f''(r) r^2 against autograd's second derivative of the generator f."""
    r = torch.tensor([0.05, 0.5, 1.0, 2.0, 7.0], dtype=torch.float64, requires_grad=True)
    f = f_function(kind)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    h = f_divergence_weight(r.detach().log(), kind, normalize=None, clip=None)
    torch.testing.assert_close(h, d2 * r.detach() ** 2, rtol=1e-9, atol=1e-12)
    assert abs(float(f(torch.ones(1, dtype=torch.float64)))) < 1e-12  # f(1) = 0


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_weights_finite_nonnegative_mean_one(kind):
    log_r = torch.linspace(-20, 20, 101)
    w = f_divergence_weight(log_r, kind)
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert abs(float(w.double().mean()) - 1.0) < 1e-5
    assert not w.requires_grad


def test_reverse_kl_weights_are_one():
    w = f_divergence_weight(torch.randn(64) * 3, "reverse_kl")
    torch.testing.assert_close(w, torch.ones(64))


def test_less_mode_seeking_weights_grow_with_ratio():
    """JS, forward KL, Hellinger, Jeffreys, chi2 weight under-covered samples (r > 1) more; JS stays bounded."""
    log_r = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    for kind in ("js", "forward_kl", "hellinger", "jeffreys", "chi2"):
        w = f_divergence_weight(log_r, kind, normalize=None)
        assert bool((w[1:] > w[:-1]).all()), kind
    assert float(f_divergence_weight(torch.tensor([50.0]), "js", normalize=None, clip=None)) <= 0.5


def _exact_parts(n=256, seed=0):
    sched = VPSchedule("cosine", 100)
    mix = GaussianMixture(ring_means(4, 2.0), torch.tensor([0.4, 0.3, 0.2, 0.1]), std=0.3)
    fake_mix = GaussianMixture(ring_means(4, 2.0) * 1.2, torch.full((4,), 0.25), std=0.5)
    teacher = lambda x_t, t: mix.score(x_t, t, sched)
    fake = lambda x_t, t: fake_mix.score(x_t, t, sched)
    disc = lambda x_t, t: mix.log_prob(x_t, t, sched) - fake_mix.log_prob(x_t, t, sched)
    g = torch.Generator().manual_seed(seed)
    x = fake_mix.sample(n, generator=g, dtype=torch.float64)
    t = torch.randint(2, 98, (n,), generator=g)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=g)
    return sched, mix, teacher, fake, disc, x, t, noise


def test_reverse_kl_equals_dmd_surrogate():
    """kind='reverse_kl' with DMD normalisation gives DMD's 0.5 * mse(x, stopgrad(x - grad)) gradient."""
    sched, _, teacher, fake, disc, x, t, noise = _exact_parts()
    x1 = x.clone().requires_grad_(True)
    FDistillLoss(teacher, fake, disc, kind="reverse_kl", schedule=sched)(x1, t=t, noise=noise).backward()
    x2 = x.clone().requires_grad_(True)
    a, s = sched.alpha_sigma(t, like=x)
    x_t = a[:, None] * x2.detach() + s[:, None] * noise
    pred_real = (x_t + (s ** 2)[:, None] * teacher(x_t, t)) / a[:, None]
    pred_fake = (x_t + (s ** 2)[:, None] * fake(x_t, t)) / a[:, None]
    grad = (pred_fake - pred_real) / (x2.detach() - pred_real).abs().mean(1, keepdim=True)
    (0.5 * F.mse_loss(x2, (x2 - grad).detach())).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def test_unnormalised_loss_is_the_surrogate_on_x_t():
    sched, _, teacher, fake, disc, x, t, noise = _exact_parts()
    x1 = x.clone().requires_grad_(True)
    terms = FDistillLoss(teacher, fake, disc, kind="js", schedule=sched, score_norm=None).terms(x1, t=t, noise=noise)
    terms.loss.backward()
    x_t = terms.x_t
    w = f_divergence_weight(disc(x_t, t), "js")
    expected = (w[:, None] * (fake(x_t, t) - teacher(x_t, t))) * sched.alpha_sigma(t, like=x)[0][:, None] / len(x)
    torch.testing.assert_close(x1.grad, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(terms.weight, w)


def test_gan_term_adds_gradient_through_discriminator():
    sched, _, teacher, fake, disc, x, t, noise = _exact_parts()
    grads = []
    for gw in (0.0, 0.5):
        xi = x.clone().requires_grad_(True)
        FDistillLoss(teacher, fake, disc, kind="js", schedule=sched, gan_weight=gw)(xi, t=t, noise=noise).backward()
        grads.append(xi.grad)
    assert float((grads[0] - grads[1]).abs().max()) > 1e-6


def test_distillation_step_moves_generator_toward_teacher():
    """A few exact-score reverse-KL steps on a location parameter move q = N(m, 1) toward p = N(0, 1) (2-D)."""
    sched = VPSchedule("cosine", 100)
    p = GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1), std=1.0)
    m = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([m], lr=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        q = GaussianMixture(m.detach()[None], torch.ones(1), std=1.0)
        loss_fn = FDistillLoss(lambda a, t: p.score(a, t, sched), lambda a, t: q.score(a, t, sched), None,
                               kind="reverse_kl", schedule=sched, score_norm=None)
        opt.zero_grad()
        loss_fn(m + torch.randn(512, 2, dtype=torch.float64, generator=g), generator=g).backward()
        opt.step()
    assert float(m.detach().norm()) < 0.5


def test_mixture_score_closed_form_and_autograd():
    sched = VPSchedule("linear", 50)
    t = torch.tensor([0, 10, 30, 49])
    single = GaussianMixture(torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.ones(1), std=0.5)
    x = torch.randn(4, 2, dtype=torch.float64)
    a, s = sched.alpha_sigma(t, like=x)
    expected = (a[:, None] * single.means - x) / (a ** 2 * 0.25 + s ** 2)[:, None]
    torch.testing.assert_close(single.score(x, t, sched), expected)
    mix = GaussianMixture(ring_means(5, 3.0), torch.tensor([1.0, 2, 3, 4, 5]), std=0.2)
    xr = (torch.randn(4, 2, dtype=torch.float64) * 3).requires_grad_(True)
    (auto,) = torch.autograd.grad(mix.log_prob(xr, t, sched).sum(), xr)
    torch.testing.assert_close(mix.score(xr.detach(), t, sched), auto)
    # the noised density integrates to 1 on a grid (2-D trapezoid)
    g = torch.linspace(-6, 6, 241, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    dens = mix.log_prob(grid, torch.full((len(grid),), 10), sched).exp().reshape(241, 241)
    assert abs(float(torch.trapezoid(torch.trapezoid(dens, g), g)) - 1.0) < 1e-3


def test_dsm_loss_of_exact_score_is_alpha_squared():
    """x0 ~ N(0, I) stays N(0, I) under VP noising, score -x_t: E||sigma s + eps||^2 per dim = alpha_t^2."""
    sched = VPSchedule("cosine", 100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, 3, dtype=torch.float64, generator=g)
    t = torch.full((len(x0),), 40)
    loss = dsm_loss(lambda x_t, tt: -x_t, x0, sched, t=t, generator=g)
    alpha2 = float(sched.abar[40])
    assert abs(float(loss) - alpha2) < 0.02 * alpha2


def test_ratio_bce_is_minimised_by_the_true_log_ratio():
    g = torch.Generator().manual_seed(0)
    xr = torch.randn(100_000, 1, dtype=torch.float64, generator=g)
    xf = torch.randn(100_000, 1, dtype=torch.float64, generator=g) + 1.0
    t = torch.zeros(100_000, dtype=torch.long)
    true = lambda x, tt: (_log_normal(x, 0.0, 1.0) - _log_normal(x, 1.0, 1.0)).reshape(-1)
    best = float(ratio_bce_loss(true, xr, xf, t))
    for wrong in (lambda x, tt: true(x, tt) + 0.5, lambda x, tt: 0.7 * true(x, tt), lambda x, tt: 1.4 * true(x, tt)):
        assert float(ratio_bce_loss(wrong, xr, xf, t)) > best + 1e-3


def test_mode_coverage_and_mmd():
    w = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    mix = GaussianMixture(ring_means(8, 4.0), w, std=0.15)
    g = torch.Generator().manual_seed(0)
    x = mix.sample(20_000, generator=g)
    cov = mode_coverage(x, mix.means, w)
    assert cov["tv"] < 0.02 and cov["recall"] == 1.0
    collapsed = mix.means[:1].float().expand(100, 2)
    cov1 = mode_coverage(collapsed, mix.means, w)
    assert abs(cov1["tv"] - 0.7) < 1e-6 and abs(cov1["recall"] - 1 / 8) < 1e-12
    assert rbf_mmd(x[:500], x[:500]) < 1e-9
    assert rbf_mmd(x[:500], x[500:1000]) < rbf_mmd(x[:500], collapsed)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_divergence_name():
    with pytest.raises(ValueError, match=r"kind must be one of the f-divergences .*'js'.*got 'kl'"):
        f_divergence_weight(torch.zeros(3), "kl")
    with pytest.raises(ValueError, match="kind must be one of"):
        f_function("total_variation")
    with pytest.raises(ValueError, match="got 'JS'"):
        FDistillLoss(lambda a, t: a, lambda a, t: a, lambda a, t: a[:, 0], kind="JS")
    with pytest.raises(ValueError, match="got None"):
        f_distill_surrogate(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2), None)


def test_bad_arguments():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"score_q must have x_t's shape \(4, 2\), got \(4, 3\)"):
        f_distill_surrogate(x, x, torch.zeros(4, 3), torch.zeros(4), "js")
    with pytest.raises(ValueError, match=r"log_r must hold one value per sample \(4\)"):
        f_distill_surrogate(x, x, x, torch.zeros(5), "js")
    with pytest.raises(ValueError, match="log_r is needed for kind='js'"):
        f_distill_surrogate(x, x, x, None, "js")
    with pytest.raises(ValueError, match="clip must be finite and > 0, got 0"):
        f_divergence_weight(torch.zeros(3), "js", clip=0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        f_divergence_weight(torch.zeros(3), "js", normalize="sum")
    with pytest.raises(ValueError, match="ratio_logit is needed for kind='js'"):
        FDistillLoss(lambda a, t: a, lambda a, t: a, None, kind="js")
    with pytest.raises(ValueError, match="teacher_score must be a callable"):
        FDistillLoss(3, lambda a, t: a, None, kind="reverse_kl")
    with pytest.raises(ValueError, match="gan_weight must be finite and >= 0"):
        FDistillLoss(lambda a, t: a, lambda a, t: a, lambda a, t: a[:, 0], gan_weight=-1)
    sched = VPSchedule(num_timesteps=10)
    bad = FDistillLoss(lambda a, t: a[:, :1], lambda a, t: a, None, kind="reverse_kl", schedule=sched)
    with pytest.raises(ValueError, match=r"teacher_score must return x_t's shape \(4, 2\)"):
        bad(x)
    with pytest.raises(ValueError, match=r"disc must return one logit per sample of x_real_t \(4\)"):
        ratio_bce_loss(lambda a, t: a, x, x, torch.zeros(4, dtype=torch.long))


def test_bad_mixture_arguments():
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        GaussianMixture(torch.zeros(3, 2), torch.ones(2), std=1.0)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, -1.0]), std=1.0)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), std=0.0)
    mix = GaussianMixture(torch.zeros(2, 2), torch.ones(2), std=1.0)
    with pytest.raises(ValueError, match=r"x_t must have shape \(N, 2\), got \(4, 3\)"):
        mix.score(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="schedule must be a VPSchedule when t is given"):
        mix.score(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="must share D"):
        mode_coverage(torch.zeros(4, 3), mix.means, mix.weights)
    with pytest.raises(ValueError, match="x and y must share the feature shape"):
        rbf_mmd(torch.zeros(4, 3), torch.zeros(4, 2))
