"""hessian-alignment: HGP / Hutchinson penalties, curvature helpers, coloured domains, claim, benchmark, docs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.data.domains import (DGSplit, color_environment, colored_digits, colored_environments,
                                  colored_mnist, colored_usps, max_pool)
from gradkit.curvature.hessian import head_hessian, hessian_gradient_product, hutchinson_diag
from gradkit.nn.hessian_alignment import HessianAlignment, penalty_anneal, risk_variance

REPO = Path(__file__).resolve().parents[1]
DT = torch.float64


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _net(seed: int = 0, classes: int = 3, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh()).to(dtype), nn.Linear(4, classes).to(dtype)


def _domains(n_domains: int = 3, n: int = 20, classes: int = 3, seed: int = 1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=dtype) + 0.7 * e, torch.randint(0, classes, (n,), generator=g))
            for e in range(n_domains)]


def _ref_head(feat: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor):
    """Exact gradient and Hessian of the CE loss w.r.t. the flattened head (W, b), features fixed."""
    f = feat(x).detach()
    c, d = head.weight.shape

    def loss(flat):
        return F.cross_entropy(f @ flat[: c * d].view(c, d).T + flat[c * d:], y)

    flat = _flat([head.weight, head.bias]).detach()
    g = torch.autograd.functional.jacobian(loss, flat)
    h = torch.autograd.functional.hessian(loss, flat)
    return g, h


def _losses(feat, head, domains):
    return [F.cross_entropy(head(feat(x)), y) for x, y in domains]


# ----------------------------------------------------------------------------- curvature helpers
def test_hgp_equals_explicit_hessian_times_gradient():
    feat, head = _net()
    x, y = _domains(1)[0]
    loss = F.cross_entropy(head(feat(x)), y)
    hg, g = hessian_gradient_product(loss, head.parameters())
    g_ref, h_ref = _ref_head(feat, head, x, y)
    torch.testing.assert_close(_flat(g), g_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(_flat(hg), h_ref @ g_ref, rtol=0, atol=1e-8)
    # also ||g|| * grad ||g||
    gn = torch.sqrt(sum((t * t).sum() for t in g))
    dn = torch.autograd.grad(gn, list(head.parameters()), retain_graph=True)
    torch.testing.assert_close(_flat(hg), gn * _flat(dn), rtol=0, atol=1e-10)
    assert all(t.requires_grad for t in hg)  # create_graph=True: differentiable
    hg2, _ = hessian_gradient_product(F.cross_entropy(head(feat(x)), y), head.parameters(), create_graph=False)
    assert not any(t.requires_grad for t in hg2)
    torch.testing.assert_close(_flat(hg2), _flat(hg).detach())


def test_head_hessian_matches_autograd_functional():
    feat, head = _net()
    x, y = _domains(1)[0]
    _, h_ref = _ref_head(feat, head, x, y)
    h = head_hessian(F.cross_entropy(head(feat(x)), y), head.parameters())
    assert h.shape == (15, 15)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)


def test_hutchinson_large_k_matches_exact_diagonal_and_is_deterministic():
    feat, head = _net()
    x, y = _domains(1)[0]
    loss = F.cross_entropy(head(feat(x)), y)
    g = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
    _, h = _ref_head(feat, head, x, y)
    diag = torch.diagonal(h)
    est = _flat(hutchinson_diag(g, head.parameters(), n_samples=20000, generator=torch.Generator().manual_seed(0)))
    assert (est - diag).norm() / diag.norm() < 0.05
    # every entry within 5 standard errors: Var[z_i (Hz)_i] = sum_{j != i} H_ij^2
    se = torch.sqrt(((h ** 2).sum(1) - diag ** 2) / 20000)
    assert ((est - diag).abs() <= 5 * se + 1e-12).all()
    a = hutchinson_diag(g, head.parameters(), n_samples=7, generator=torch.Generator().manual_seed(3))
    b = hutchinson_diag(g, head.parameters(), n_samples=7, generator=torch.Generator().manual_seed(3))
    c = hutchinson_diag(g, head.parameters(), n_samples=7, generator=torch.Generator().manual_seed(3),
                        vectorize=False)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=0, atol=0)
    torch.testing.assert_close(_flat(a), _flat(c), rtol=0, atol=1e-14)  # loop == batched


def test_hutchinson_is_unbiased_statistically():
    """Mean of M independent estimates: every entry within 5 sample standard errors of diag(H)."""
    feat, head = _net(2)
    x, y = _domains(1, seed=4)[0]
    loss = F.cross_entropy(head(feat(x)), y)
    g = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
    _, h = _ref_head(feat, head, x, y)
    gen = torch.Generator().manual_seed(11)
    m = 400
    # M independent 10-probe estimates (each unbiased if the estimator is): a z-test on their mean
    samples = torch.stack([_flat(hutchinson_diag(g, head.parameters(), n_samples=10, generator=gen,
                                                 create_graph=False)) for _ in range(m)])
    mean, sd = samples.mean(0), samples.std(0)
    z = (mean - torch.diagonal(h)) / (sd / math.sqrt(m) + 1e-15)
    assert z.abs().max() < 5.0
    assert samples.std(0).max() > 0  # it is random


def test_hutchinson_exact_for_a_diagonal_hessian_any_k():
    """With a diagonal Hessian z * (H z) = diag(H) for every Rademacher z: exact with one probe."""
    head = nn.Linear(3, 2).to(torch.float32)
    a = torch.rand(2, 3) + 0.5
    loss = (a * head.weight ** 2).sum() + (head.bias ** 2).sum() * 1.5
    g = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
    d = hutchinson_diag(g, head.parameters(), n_samples=1)
    assert [t.shape for t in d] == [p.shape for p in head.parameters()]
    assert all(t.dtype == torch.float32 for t in d)
    torch.testing.assert_close(d[0].detach(), 2 * a)
    torch.testing.assert_close(d[1].detach(), torch.full((2,), 3.0))


# ----------------------------------------------------------------------------- the regulariser
def _naive_penalty(feat, head, domains, alpha, beta, method):
    gs, hs = zip(*[_ref_head(feat, head, x, y) for x, y in domains])
    g_bar, h_bar_mat = torch.stack(gs).mean(0), torch.stack(hs).mean(0)
    if method == "hgp":
        he = [h @ g for g, h in zip(gs, hs)]
        hb = h_bar_mat @ g_bar
    else:
        he = [torch.diagonal(h) for h in hs]
        hb = torch.diagonal(h_bar_mat)
    terms = [alpha * (a - hb).pow(2).sum() + beta * (g - g_bar).pow(2).sum() for a, g in zip(he, gs)]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("method", ["hgp", "exact_diag"])
@pytest.mark.parametrize("detach_mean", [True, False])
def test_penalty_matches_naive_reference(method, detach_mean):
    feat, head = _net()
    doms = _domains(3)
    reg = HessianAlignment(head.parameters(), alpha=0.7, beta=0.3, method=method, detach_mean=detach_mean)
    pen, stats = reg(_losses(feat, head, doms))
    ref = _naive_penalty(feat, head, doms, 0.7, 0.3, method)
    torch.testing.assert_close(pen.detach(), ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(0.7 * stats["hessian_term"] + 0.3 * stats["grad_term"], ref, rtol=1e-10, atol=1e-14)
    assert not stats["grad_term"].requires_grad


def test_hgp_pooled_product_is_not_mean_of_domain_products():
    feat, head = _net()
    doms = _domains(2)
    gs, hs = zip(*[_ref_head(feat, head, x, y) for x, y in doms])
    pooled = torch.stack(hs).mean(0) @ torch.stack(gs).mean(0)
    mean_of = torch.stack([h @ g for g, h in zip(gs, hs)]).mean(0)
    assert (pooled - mean_of).abs().max() > 1e-6  # the two differ; the penalty uses `pooled`
    _, st = HessianAlignment(head.parameters(), 1.0, 0.0)(_losses(feat, head, doms))
    ref = torch.stack([(h @ g - pooled).pow(2).sum() for g, h in zip(gs, hs)]).mean()
    torch.testing.assert_close(st["hessian_term"], ref, rtol=1e-10, atol=1e-14)


def test_hutchinson_penalty_equals_reference_with_the_same_probes():
    """Shared probes: h_e = hutchinson_diag(g_e) with one probe set, pooled = their mean (= H z linearity)."""
    feat, head = _net()
    doms = _domains(3)
    params = list(head.parameters())
    pen, st = HessianAlignment(params, 0.6, 0.4, method="hutchinson", n_samples=50,
                               generator=torch.Generator().manual_seed(7))(_losses(feat, head, doms))
    gs = [torch.autograd.grad(l, params, create_graph=True) for l in _losses(feat, head, doms)]
    hs = [_flat(hutchinson_diag(g, params, n_samples=50, generator=torch.Generator().manual_seed(7))) for g in gs]
    g_flat = [_flat(g) for g in gs]
    h_bar, g_bar = torch.stack(hs).mean(0), torch.stack(g_flat).mean(0)
    # the pooled loss's own estimate with the same probes equals the mean of the domain estimates
    g_pool = torch.autograd.grad(torch.stack(_losses(feat, head, doms)).mean(), params, create_graph=True)
    h_pool = _flat(hutchinson_diag(g_pool, params, n_samples=50, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(h_pool, h_bar, rtol=1e-10, atol=1e-13)
    ref = torch.stack([0.6 * (h - h_bar).pow(2).sum() + 0.4 * (g - g_bar).pow(2).sum()
                       for h, g in zip(hs, g_flat)]).mean()
    torch.testing.assert_close(pen, ref, rtol=1e-10, atol=1e-14)
    # independent probes (the official code's choice): a different, still finite, estimate
    indep, _ = HessianAlignment(params, 0.6, 0.4, method="hutchinson", n_samples=50, shared_probes=False,
                                generator=torch.Generator().manual_seed(7))(_losses(feat, head, doms))
    assert math.isfinite(indep.item()) and abs(indep.item() - pen.item()) > 1e-8


@pytest.mark.parametrize("method", ["hgp", "hutchinson", "exact_diag"])
def test_penalty_zero_when_domains_share_the_batch(method):
    feat, head = _net()
    x, y = _domains(1)[0]
    reg = HessianAlignment(head.parameters(), 1.0, 1.0, method=method, n_samples=20,
                           generator=torch.Generator().manual_seed(0), shared_probes=True)
    pen, stats = reg(_losses(feat, head, [(x, y)] * 3))
    assert abs(pen.item()) < 1e-20 and stats["hessian_term"].item() < 1e-20


@pytest.mark.parametrize("method", ["hgp", "hutchinson", "exact_diag"])
@pytest.mark.parametrize("detach_mean", [True, False])
def test_penalty_gradient_reaches_featurizer_and_gradchecks(method, detach_mean):
    """The penalty is differentiated through g and h (third order for HGP): finite differences agree.

    With ``detach_mean=True`` the gradient deliberately ignores the pooled terms' dependence (a
    stop-gradient), so only ``detach_mean=False`` is the full derivative that gradcheck checks.
    """
    feat, head = _net()
    doms = _domains(2, n=8)
    w = feat[0].weight

    def penalty_of(weight):
        f = lambda x: torch.tanh(F.linear(x, weight, feat[0].bias))  # noqa: E731
        reg = HessianAlignment(head.parameters(), alpha=0.9, beta=0.4, method=method, n_samples=5,
                               detach_mean=detach_mean, generator=torch.Generator().manual_seed(0))
        return reg([F.cross_entropy(head(f(x)), y) for x, y in doms])[0]

    wt = w.detach().clone().requires_grad_(True)
    grad = torch.autograd.grad(penalty_of(wt), wt)[0]
    assert grad.abs().max() > 1e-8  # it regularises the features
    if not detach_mean:
        assert torch.autograd.gradcheck(penalty_of, (wt,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_penalty_gradient_check_wrt_head():
    feat, head = _net()
    doms = _domains(2, n=8)
    feats = [(feat(x).detach(), y) for x, y in doms]

    def penalty_of(wt, bt):
        losses = [F.cross_entropy(F.linear(f, wt, bt), y) for f, y in feats]
        return HessianAlignment([wt, bt], alpha=0.5, beta=0.5, method="hgp", detach_mean=False)(losses)[0]

    wt = head.weight.detach().clone().requires_grad_(True)
    bt = head.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(penalty_of, (wt, bt), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_detach_mean_changes_gradients_not_value():
    feat, head = _net()
    doms = _domains(3)
    vals, grads = [], []
    for detach in (True, False):
        reg = HessianAlignment(head.parameters(), 0.5, 0.5, detach_mean=detach)
        pen, _ = reg(_losses(feat, head, doms))
        vals.append(pen.detach())
        grads.append(_flat(torch.autograd.grad(pen, list(feat.parameters()))))
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-12, atol=0)
    assert (grads[0] - grads[1]).abs().max() > 1e-8


def test_reduction_alpha_zero_and_repr():
    feat, head = _net()
    doms = _domains(3)
    mean, _ = HessianAlignment(head.parameters(), 0.5, 0.5)(_losses(feat, head, doms))
    summ, _ = HessianAlignment(head.parameters(), 0.5, 0.5, reduction="sum")(_losses(feat, head, doms))
    torch.testing.assert_close(summ, 3 * mean)
    pen, st = HessianAlignment(head.parameters(), 0.0, 2.0)(_losses(feat, head, doms))
    assert st["hessian_term"].item() == 0.0
    torch.testing.assert_close(pen, 2.0 * st["grad_term"])
    r = repr(HessianAlignment(head.parameters(), 1e-3, 5e-3, method="hutchinson", n_samples=300))
    assert "hutchinson" in r and "n_samples=300" in r and "head_params=15" in r


def test_works_inside_no_grad_on_losses_built_outside():
    feat, head = _net()
    losses = _losses(feat, head, _domains(2))
    ref, _ = HessianAlignment(head.parameters(), 0.5, 0.5)(losses)
    with torch.no_grad():
        pen, _ = HessianAlignment(head.parameters(), 0.5, 0.5)(losses)
        hg, _ = hessian_gradient_product(losses[0], head.parameters())
    torch.testing.assert_close(pen, ref)
    assert len(hg) == 2


def test_works_in_float32_and_bfloat16_heads():
    for dtype in (torch.float32, torch.bfloat16):
        feat, head = _net(dtype=dtype)
        pen, _ = HessianAlignment(head.parameters(), 1.0, 1.0, method="hutchinson", n_samples=4)(
            _losses(feat, head, _domains(2, dtype=dtype)))
        assert pen.dtype == dtype and torch.isfinite(pen)
        pen.backward()
        assert feat[0].weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    feat, head = _net()
    doms = _domains(2)
    cpu, _ = HessianAlignment(head.parameters(), 1.0, 1.0, method="hutchinson", n_samples=8,
                              generator=torch.Generator().manual_seed(0))(_losses(feat, head, doms))
    feat, head = feat.cuda(), head.cuda()
    gpu, _ = HessianAlignment(head.parameters(), 1.0, 1.0, method="hutchinson", n_samples=8,
                              generator=torch.Generator().manual_seed(0))(
        _losses(feat, head, [(x.cuda(), y.cuda()) for x, y in doms]))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)


def test_cost_ordering_by_flop_count():
    """Deterministic cost proxy (matmul FLOPs): ERM < HGP < Hutchinson(K=10) < exact diagonal (P=33)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(20, 32), nn.ReLU()), nn.Linear(32, 1)
    envs = [(torch.randn(200, 20), (torch.rand(200) < 0.5).float()) for _ in range(2)]
    flops = {}
    for name, method in (("erm", None), ("hgp", "hgp"), ("hutchinson", "hutchinson"), ("exact", "exact_diag")):
        reg = None if method is None else HessianAlignment(head.parameters(), 1.0, 1.0, method=method, n_samples=10)
        with FlopCounterMode(display=False) as fc:
            losses = [F.binary_cross_entropy_with_logits(head(body(x)).squeeze(-1), y) for x, y in envs]
            loss = torch.stack(losses).mean() + (0 if reg is None else reg(losses)[0])
            loss.backward()
        flops[name] = fc.get_total_flops()
    assert flops["erm"] < flops["hgp"] < flops["hutchinson"] < flops["exact"]


# ----------------------------------------------------------------------------- helpers, schedule
def test_risk_variance_and_penalty_anneal():
    a, b = torch.tensor(0.3, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    torch.testing.assert_close(risk_variance([a, b]), torch.tensor(0.04))  # (0.4)^2 / 4
    torch.testing.assert_close(risk_variance([a, b, a]), torch.tensor(0.4 ** 2 * 2 / 9))
    assert penalty_anneal(0, 190, 91257.19) == (1.0, 1.0)
    assert penalty_anneal(189, 190, 91257.19) == (1.0, 1.0)
    w, s = penalty_anneal(190, 190, 91257.19)
    assert w == 91257.19 and s == pytest.approx(1 / 91257.19)
    assert penalty_anneal(500, 190, 1e4, rescale=False) == (1e4, 1.0)
    assert penalty_anneal(500, 190, 0.5) == (0.5, 1.0)  # no rescale below 1
    assert penalty_anneal(0, 10, 100.0, initial=0.0) == (0.0, 1.0)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(step=-1, anneal_iters=1, weight=1.0), ValueError, "step must be an int >= 0, got -1"),
    (dict(step=1.5, anneal_iters=1, weight=1.0), ValueError, "step must be an int"),
    (dict(step=0, anneal_iters=-2, weight=1.0), ValueError, "anneal_iters must be an int >= 0"),
    (dict(step=0, anneal_iters=1, weight=-1.0), ValueError, "weight must be finite and >= 0, got -1.0"),
    (dict(step=0, anneal_iters=1, weight=float("inf")), ValueError, "weight must be finite"),
    (dict(step=0, anneal_iters=1, weight=1.0, initial=float("nan")), ValueError, "initial must be finite"),
])
def test_penalty_anneal_bad_inputs(kw, exc, match):
    with pytest.raises(exc, match=match):
        penalty_anneal(**kw)


def test_risk_variance_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 domains, got 1"):
        risk_variance([torch.tensor(1.0)])
    with pytest.raises(TypeError, match="list of scalar loss tensors"):
        risk_variance(torch.ones(3))
    with pytest.raises(ValueError, match=r"domain_losses\[1\] must be a floating-point scalar"):
        risk_variance([torch.tensor(1.0), torch.ones(2)])


# ----------------------------------------------------------------------------- bad inputs
def test_regulariser_bad_constructor_args():
    head = nn.Linear(3, 1)
    p = list(head.parameters())
    with pytest.raises(ValueError, match="alpha must be finite and >= 0, got -1"):
        HessianAlignment(p, alpha=-1, beta=1)
    with pytest.raises(ValueError, match="beta must be finite and >= 0, got nan"):
        HessianAlignment(p, alpha=1, beta=float("nan"))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        HessianAlignment(p, alpha="1", beta=1)
    with pytest.raises(ValueError, match="method must be one of"):
        HessianAlignment(p, 1, 1, method="fishr")
    with pytest.raises(ValueError, match="n_samples must be an int >= 1, got 0"):
        HessianAlignment(p, 1, 1, n_samples=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        HessianAlignment(p, 1, 1, reduction="max")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        HessianAlignment(p, 1, 1, generator=3)
    with pytest.raises(ValueError, match="head_params is empty"):
        HessianAlignment([], 1, 1)
    with pytest.raises(TypeError, match=r"head_params\[1\] must be a torch.Tensor, got str"):
        HessianAlignment([p[0], "b"], 1, 1)
    with pytest.raises(ValueError, match=r"head_params\[0\] .* does not require grad"):
        HessianAlignment([torch.zeros(3)], 1, 1)
    with pytest.raises(ValueError, match="floating-point"):
        HessianAlignment([torch.zeros(3, dtype=torch.long)], 1, 1)
    with pytest.raises(TypeError, match="head_params must be a tensor or an iterable"):
        HessianAlignment(5, 1, 1)


def test_regulariser_bad_domain_losses():
    feat, head = _net()
    reg = HessianAlignment(head.parameters(), 1, 1)
    good = _losses(feat, head, _domains(2))
    with pytest.raises(ValueError, match="at least 2 domains, got 1"):
        reg(good[:1])
    with pytest.raises(TypeError, match="list of scalar loss tensors"):
        reg(torch.stack(good))
    with pytest.raises(ValueError, match=r"domain_losses\[1\] must be a scalar .* got shape \(2,\)"):
        reg([good[0], torch.ones(2, dtype=DT, requires_grad=True)])
    with pytest.raises(ValueError, match=r"domain_losses\[0\] must be finite, got nan"):
        reg([good[0] * float("nan"), good[1]])
    with pytest.raises(ValueError, match=r"domain_losses\[1\] does not require grad"):
        reg([good[0], good[1].detach()])
    with pytest.raises(TypeError, match=r"domain_losses\[0\] must be a scalar torch.Tensor, got float"):
        reg([1.0, good[1]])
    x, _ = _domains(1)[0]
    other = nn.Linear(4, 3).to(DT)  # a loss that does not use the registered head
    with pytest.raises(ValueError, match=r"domain_losses\[1\] does not depend on params\[0\]"):
        reg([good[0], other(feat(x)).sum()])
    # check_finite=False lets NaN through (a training loop may stop on it itself)
    pen, _ = HessianAlignment(head.parameters(), 1, 1, check_finite=False)(
        [l * float("nan") for l in _losses(feat, head, _domains(2))])
    assert math.isnan(pen.item())


def test_helpers_bad_inputs():
    feat, head = _net()
    x, y = _domains(1)[0]
    loss = F.cross_entropy(head(feat(x)), y)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        hessian_gradient_product(head(feat(x)), head.parameters())
    with pytest.raises(TypeError, match="loss must be a scalar torch.Tensor"):
        hessian_gradient_product(0.5, head.parameters())
    with pytest.raises(ValueError, match="loss does not require grad"):
        head_hessian(loss.detach(), head.parameters())
    g = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1, got 0"):
        hutchinson_diag(g, head.parameters(), n_samples=0)
    with pytest.raises(ValueError, match="one tensor per parameter: got 1 grads for 2 params"):
        hutchinson_diag(g[:1], head.parameters())
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(12,\), expected \(3, 4\)"):
        hutchinson_diag([g[0].reshape(-1), g[1]], head.parameters())
    with pytest.raises(ValueError, match=r"grads\[0\] has no graph: .*create_graph=True"):
        hutchinson_diag([t.detach() for t in g], head.parameters())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        hutchinson_diag(g, head.parameters(), generator="cpu")


# ----------------------------------------------------------------------------- domains
def test_color_environment_construction():
    g = torch.Generator().manual_seed(0)
    n = 20000
    imgs = torch.rand(n, 4, 4, generator=g) * 0.9 + 0.1  # strictly positive pixels
    digits = torch.randint(0, 10, (n,), generator=g)
    x, y = color_environment(imgs, digits, e=0.2, label_noise=0.25, generator=torch.Generator().manual_seed(1))
    assert x.shape == (n, 2, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    ch0, ch1 = x[:, 0].flatten(1).abs().sum(1), x[:, 1].flatten(1).abs().sum(1)
    assert bool(((ch0 == 0) ^ (ch1 == 0)).all())  # exactly one channel is zeroed
    kept = (ch1 > 0).long()  # channel `color` keeps the image
    torch.testing.assert_close(x[torch.arange(n), kept], imgs)
    agree_color = (kept == y).float().mean().item()
    agree_shape = (y == (digits < 5).long()).float().mean().item()
    assert agree_color == pytest.approx(0.8, abs=0.015)  # 5 sd of a binomial mean at n = 20,000
    assert agree_shape == pytest.approx(0.75, abs=0.016)
    x0, y0 = color_environment(imgs[:5], digits[:5], e=0.0, label_noise=0.0)
    assert torch.equal(y0, (digits[:5] < 5).long()) and bool((x0[torch.arange(5), y0] > 0).all())


def test_colored_environments_split_and_seeding():
    g = torch.Generator().manual_seed(0)
    xtr, dtr = torch.rand(100, 3, 3, generator=g), torch.randint(0, 10, (100,), generator=g)
    xte, dte = torch.rand(30, 3, 3, generator=g), torch.randint(0, 10, (30,), generator=g)
    d = colored_environments(xtr, dtr, xte, dte, seed=5, n_per_env=40, n_test=20)
    assert isinstance(d, DGSplit) and [len(y) for _, y in d.train] == [40, 40] and len(d.test[1]) == 20
    assert d.env_noise == (0.1, 0.2) and d.test_noise == 0.9 and d.num_features == 18
    # environments are disjoint: the grey images (channel sums) do not repeat across environments
    grey = [x.sum(1).flatten(1) for x, _ in d.train]
    assert not any(bool((grey[0] == r).all(1).any()) for r in grey[1])
    same = colored_environments(xtr, dtr, xte, dte, seed=5, n_per_env=40, n_test=20)
    other = colored_environments(xtr, dtr, xte, dte, seed=6, n_per_env=40, n_test=20)
    assert torch.equal(d.train[0][0], same.train[0][0]) and torch.equal(d.test[1], same.test[1])
    assert not torch.equal(d.train[0][0], other.train[0][0])
    assert [len(y) for _, y in colored_environments(xtr, dtr, xte, dte, seed=0, env_noise=(0.1, 0.2, 0.3)).train] == [33] * 3


def test_colored_digits_bundled():
    d = colored_digits(seed=0)
    assert d.name == "colored-digits"
    assert [tuple(x.shape) for x, _ in d.train] == [(718, 2, 8, 8), (718, 2, 8, 8)]
    assert tuple(d.test[0].shape) == (360, 2, 8, 8)
    assert float(d.test[0].min()) >= 0 and float(d.test[0].max()) <= 1
    assert set(d.test[1].unique().tolist()) == {0, 1}
    d.to("cpu")


def test_max_pool():
    x = torch.arange(16.0).reshape(1, 4, 4)
    assert max_pool(x).tolist() == [[[5.0, 7.0], [13.0, 15.0]]]
    with pytest.raises(ValueError, match="not divisible by k=3"):
        max_pool(x, 3)


def test_domains_bad_inputs():
    imgs, digs = torch.rand(10, 4, 4), torch.randint(0, 10, (10,))
    with pytest.raises(ValueError, match=r"e must be a probability in \[0, 1\], got 1.5"):
        color_environment(imgs, digs, e=1.5)
    with pytest.raises(ValueError, match="label_noise must be a probability"):
        color_environment(imgs, digs, e=0.1, label_noise=float("nan"))
    with pytest.raises(ValueError, match=r"images must have shape \(N, H, W\)"):
        color_environment(torch.rand(10, 16), digs, e=0.1)
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
        color_environment(imgs * 255, digs, e=0.1)
    with pytest.raises(ValueError, match="images must be finite"):
        color_environment(imgs * float("nan"), digs, e=0.1)
    with pytest.raises(ValueError, match=r"digits must have shape \(10,\)"):
        color_environment(imgs, digs[:5], e=0.1)
    with pytest.raises(ValueError, match="digits in 0..9"):
        color_environment(imgs, digs + 10, e=0.1)
    with pytest.raises(ValueError, match="integer digit labels"):
        color_environment(imgs, digs.float(), e=0.1)
    with pytest.raises(ValueError, match="n_per_env=6 x 2 environments needs 12 training images, only 10"):
        colored_environments(imgs, digs, imgs, digs, seed=0, n_per_env=6)
    with pytest.raises(ValueError, match="n_test=11 exceeds the 10 test images"):
        colored_environments(imgs, digs, imgs, digs, seed=0, n_test=11)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        colored_environments(imgs, digs, imgs, digs, seed=-1)
    with pytest.raises(ValueError, match="differ in size"):
        colored_environments(imgs, digs, torch.rand(10, 2, 2), digs, seed=0)
    with pytest.raises(ValueError, match=r"env_noise\[1\] must be a probability"):
        colored_environments(imgs, digs, imgs, digs, seed=0, env_noise=(0.1, -0.1))


def test_real_data_loaders_missing_files_raise(tmp_path):
    from gradkit.data import DataError

    with pytest.raises(DataError):
        colored_mnist(tmp_path, seed=0)
    with pytest.raises(DataError):
        colored_usps(tmp_path, seed=0)
    with pytest.raises(ValueError, match="pool must divide 28"):
        colored_mnist(tmp_path, seed=0, pool=3)


def test_real_colored_mnist_and_usps(data_root):
    if (data_root / "mnist").is_dir():
        d = colored_mnist(data_root, seed=0, n_per_env=200, n_test=300)
        assert d.num_features == 392 and [len(y) for _, y in d.train] == [200, 200] and len(d.test[1]) == 300
        assert float(d.train[0][0].max()) <= 1.0
    if (data_root / "usps").is_dir():
        u = colored_usps(data_root, seed=0, n_per_env=100, n_test=50, pool=2)
        assert u.num_features == 128 and len(u.test[1]) == 50


# ----------------------------------------------------------------------------- claim
@pytest.fixture(scope="module")
def claim():
    from gradkit.harness.claims import get_claim

    return get_claim("hessian-alignment")


def test_claim_registered(claim):
    assert claim.arxiv == "2308.11778" and claim.primary.ours == "hgp" and claim.primary.baseline == "erm"
    assert [v.name for v in claim.variants] == ["colored-mnist", "colored-mnist"] and "test_acc" in claim.plots
    assert "gradkit.nn.hessian_alignment.HessianAlignment" in claim.uses
    # the paper's Hutchinson and V-REx arms run on full-scale Colored MNIST only
    assert list(claim.resolve(claim.variant_for("quick", Path("."))).arms) == ["erm", "hgp"]
    assert list(claim.resolve(claim.variant_for("full", Path("."))).arms) == ["erm", "hgp", "hutchinson", "vrex"]
    assert claim.protocol_for("full", Path(".")).n_per_env is None


def test_claim_smoke(claim, smoke_run):
    out = smoke_run("hessian-alignment")
    p = claim.protocol.at("smoke")
    assert out.data == "colored-digits" and set(out.metrics) == {"erm", "hgp"}
    for arm, m in out.metrics.items():
        assert m["diverged"] == 0.0
        assert len(out.curves["test_acc"][arm]) == p.steps // p.steps_per_epoch
    hgp = out.metrics["hgp"]
    assert hgp["penalty_final"] < hgp["penalty_before_anneal"]  # the penalty drops after the anneal step
    assert all(math.isfinite(v) and v >= 0 for v in out.curves["penalty"]["hgp"])


def test_claim_rerun_bit_identical(claim, smoke_run):
    from gradkit.harness.claims import RunContext

    again = claim.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("hessian-alignment").metrics
    assert again.curves == smoke_run("hessian-alignment").curves


def test_claim_full_scale_arms_run(claim):
    # the hutchinson and vrex arms (full-scale Colored MNIST), tiny, on coloured digits
    from gradkit.harness.claims import ArmContext
    from gradkit.harness.claims.hessian_alignment import ColoredMnistProtocol, train_arm
    from gradkit.engine import seed_everything

    p = ColoredMnistProtocol.at("smoke", steps=20, anneal=10, hidden=16, n_samples=4)
    split = colored_digits(3)
    for arm in ("hutchinson", "vrex"):
        seed_everything(3)
        m = train_arm(ArmContext(scale="smoke", seed=3, device=torch.device("cpu"), p=p, arm=arm, data=split))
        assert math.isfinite(m.metrics["test_acc"]) and math.isfinite(m.metrics["penalty_final"])
        assert len(m.curves["penalty"]) == 2


def test_claim_missing_real_data_raises(claim, tmp_path):
    from gradkit.harness.claims import RunContext
    from gradkit.data import DataError

    with pytest.raises(DataError):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_smoke_real_mnist(claim, data_root, smoke_run):
    if not (data_root / "mnist").is_dir():
        pytest.skip("real MNIST files not present")
    out = smoke_run("hessian-alignment", data_root=data_root)
    assert out.data == "colored-mnist" and out.info["inputs"] == 392
    assert out.info["n_per_env"] == [out.info["protocol"]["n_per_env"]] * 2
    assert set(out.metrics) == {"erm", "hgp"}
    assert claim.criterion_for(out.data) is claim.variants[0].criterion


# ----------------------------------------------------------------------------- benchmark, docs
def test_benchmarks_registered_and_run():
    import gradkit.harness.benchmarks.hessian_alignment  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    names = ("hessian-alignment-hgp-step", "hessian-alignment-hutchinson-step",
             "hessian-alignment-hutchinson-vs-exact-diag")
    for n in names:
        assert BENCHMARKS.get(n).slug == "hessian-alignment"
    assert BENCHMARKS.get(names[2]).target == 1.0
    r = BENCHMARKS.get(names[0]).run(1)
    assert r.baseline_s > 0 and math.isfinite(r.ratio) and r.extra["candidate"] == "hgp"


