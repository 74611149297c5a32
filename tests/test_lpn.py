"""Tests of learned proximal networks (paper slug: lpn): the ICNN, the prox, the loss, inversion, PnP, claim, bench."""
from __future__ import annotations

import math

import pytest
import torch

from gradkit.nn.icnn import ICNN, clamp_after_step
from gradkit.solvers.proximal import (GammaSchedule, LearnedProx, invert_gradient, pnp_pgd,
                                      proximal_matching_loss)

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_icnn(d=3, hidden=16, layers=2, strong_convexity=0.0, seed=0) -> ICNN:
    """An ICNN with weights of order one (not the tiny training init), so the tests see real curvature."""
    torch.manual_seed(seed)
    return ICNN(d, hidden, layers, beta=2.0, strong_convexity=strong_convexity, init_log_mean=-1.0,
                init_log_std=0.5, dtype=D)


def quadratic_prox(lam: float, d: int = 3) -> LearnedProx:
    """psi(y) = ||y||^2 / (2 (1 + lam)) set by hand: f(y) = y / (1 + lam), R(x) = lam/2 ||x||^2 + const."""
    psi = ICNN(d, 4, 1, strong_convexity=1.0 / (1.0 + lam), dtype=D)
    with torch.no_grad():
        psi.out_z.weight.zero_()
        psi.out_x.weight.zero_()
        psi.out_x.bias.zero_()
    return LearnedProx(psi)


# ------------------------------------------------------------------------------------------ ICNN invariants
@pytest.mark.parametrize("in_shape", [3, (2, 2, 2)])
def test_icnn_is_convex_after_clamp(in_shape):
    psi = ICNN(in_shape, 16, 3, beta=2.0, init_log_mean=-1.0, init_log_std=0.5, dtype=D)
    with torch.no_grad():  # an optimiser step that pushed constrained weights negative
        for _, w in psi.constrained():
            w.sub_(0.5)
    psi.clamp_()
    shape = (1000, *((in_shape,) if isinstance(in_shape, int) else in_shape))
    a, b = 3 * torch.randn(shape, generator=gen(1), dtype=D), 3 * torch.randn(shape, generator=gen(2), dtype=D)
    with torch.no_grad():
        gap = 0.5 * (psi(a) + psi(b)) - psi(0.5 * (a + b))
    assert bool((gap >= -1e-6).all()), float(gap.min())
    assert all(bool((w >= 0).all()) for _, w in psi.constrained())


def test_prox_is_monotone():
    prox = LearnedProx(random_icnn(d=4))
    a, b = torch.randn(500, 4, generator=gen(1), dtype=D), torch.randn(500, 4, generator=gen(2), dtype=D)
    with torch.no_grad():
        inner = ((prox(a) - prox(b)) * (a - b)).sum(1)
    assert bool((inner >= -1e-6).all())


def test_strong_convexity_makes_prox_strongly_monotone():
    prox = LearnedProx(random_icnn(d=2, strong_convexity=0.5))
    a, b = torch.randn(300, 2, generator=gen(3), dtype=D), torch.randn(300, 2, generator=gen(4), dtype=D)
    with torch.no_grad():
        inner = ((prox(a) - prox(b)) * (a - b)).sum(1)
    assert bool((inner >= 0.5 * (a - b).pow(2).sum(1) - 1e-9).all())


def test_init_is_tiny_and_positive():
    torch.manual_seed(0)
    psi = ICNN(1, 50, 4)
    for _, w in psi.constrained():
        assert bool((w > 0).all()) and float(w.detach().max()) < 1e-3
    assert psi(torch.randn(5, 1)).shape == (5,)


# ------------------------------------------------------------------------------------------ closed form
def test_prox_and_prior_on_a_closed_form():
    lam = 0.7
    prox = quadratic_prox(lam).eval()
    y = torch.randn(20, 3, generator=gen(0), dtype=D)
    with torch.no_grad():
        assert torch.allclose(prox(y), y / (1 + lam), atol=1e-12)
    x = torch.randn(20, 3, generator=gen(1), dtype=D)
    r = prox.regulariser(torch.cat([x, torch.zeros(1, 3, dtype=D)]))
    expected = 0.5 * lam * x.pow(2).sum(1)
    assert torch.allclose(r[:-1] - r[-1], expected, atol=1e-5)


def test_inversion_recovers_the_input():
    prox = LearnedProx(random_icnn(d=3, strong_convexity=0.2)).eval()
    x = torch.randn(64, 3, generator=gen(5), dtype=D)
    res = invert_gradient(prox.potential, x, iters=50, tol=1e-10)
    assert res.converged and res.residuals.shape == (64,)
    with torch.no_grad():
        assert float((prox(res.y) - x).norm(dim=1).max()) < 1e-4
    y = prox.invert(x)  # the method form
    with torch.no_grad():
        assert float((prox(y) - x).norm(dim=1).max()) < 1e-4


def test_inversion_outside_the_range_is_flagged_not_nan():
    torch.manual_seed(0)
    psi = ICNN(1, 8, 1, beta=2.0, init_log_mean=-1.0, init_log_std=0.3, dtype=D)  # f is bounded: no quadratic
    prox = LearnedProx(psi)
    with torch.no_grad():
        big = prox(torch.tensor([[1e3]], dtype=D)).item()
    x = torch.tensor([[0.5 * big], [10 * abs(big) + 10]], dtype=D)
    with pytest.warns(RuntimeWarning, match="outside the range"):
        y = prox.invert(x, iters=20)
    assert bool(torch.isfinite(y).all())
    res = invert_gradient(psi, x, iters=20)
    assert res.residuals[0] < 1e-6 and res.residuals[1] > 1.0 and not res.converged


# ------------------------------------------------------------------------------------------ autograd paths
def test_double_backward_reaches_every_parameter():
    torch.manual_seed(0)  # small weights: no unit in softplus's linear branch (beta * t > 20), where s'' = 0
    psi = ICNN(3, 16, 2, beta=2.0, strong_convexity=0.1, init_log_mean=-3.0, init_log_std=0.5, dtype=D)
    prox = LearnedProx(psi).train()
    y = torch.randn(16, 3, generator=gen(0), dtype=D)
    out = prox(y)
    assert out.requires_grad
    proximal_matching_loss(out, torch.zeros_like(out), gamma=2.0).backward()
    for name, p in psi.named_parameters():
        if name == "out_x.bias":  # the constant c of psi: f = grad psi does not depend on it
            assert p.grad is None
            continue
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert all(float(p.grad.abs().max()) > 0 for n, p in psi.named_parameters() if n != "out_x.bias")


def test_create_graph_only_when_needed():
    prox = LearnedProx(random_icnn()).eval()
    y = torch.randn(4, 3, dtype=D)
    assert not prox(y).requires_grad
    prox.train()
    with torch.no_grad():
        assert not prox(y).requires_grad
    assert prox(y).requires_grad
    assert not prox(y, create_graph=False).requires_grad
    prox.eval()
    yg = y.clone().requires_grad_(True)
    assert prox(yg).requires_grad  # a graph back to y (e.g. for PnP unrolling)


def test_pm_loss_gradcheck_and_value():
    pred = torch.randn(5, 2, 3, generator=gen(0), dtype=D, requires_grad=True)
    target = torch.randn(5, 2, 3, generator=gen(1), dtype=D)
    target[0] = pred[0].detach()  # a zero distance: the gradient is defined there
    assert torch.autograd.gradcheck(lambda p: proximal_matching_loss(p, target, 0.7), (pred,))
    assert torch.autograd.gradgradcheck(lambda p: proximal_matching_loss(p, target, 0.7), (pred,))
    # the per-sample norm over all dims, not a per-pixel mean
    a, b = torch.zeros(2, 4, dtype=D), torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=D)
    per = proximal_matching_loss(a, b, 2.0, reduction="none")
    assert torch.allclose(per, torch.tensor([1 - math.exp(-1.0), 0.0], dtype=D))
    assert torch.isclose(proximal_matching_loss(a, b, 2.0), per.mean())
    assert torch.isclose(proximal_matching_loss(a, b, 2.0, reduction="sum"), per.sum())


def test_clamp_hook_keeps_weights_nonnegative_and_can_be_removed():
    psi = random_icnn()
    opt = torch.optim.SGD(psi.parameters(), lr=10.0)
    handle = clamp_after_step(opt, psi)
    y = torch.randn(32, 3, dtype=D)
    for _ in range(3):
        opt.zero_grad()
        psi(y).sum().backward()  # d psi / d W_k >= 0: SGD drives W_k negative
        opt.step()
        assert all(bool((w >= 0).all()) for _, w in psi.constrained())
    handle.remove()
    opt.zero_grad()
    psi(y).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="must be >= 0"):
        psi(y)


# ------------------------------------------------------------------------------------------ bad input
def test_negative_weight_after_manual_edit_is_detected():
    psi = random_icnn()
    with torch.no_grad():
        psi.hidden_z[1].weight[0, 0] = -0.25
    with pytest.raises(ValueError, match=r"hidden_z\.1\.weight must be >= 0.*clamp_\(\)"):
        psi(torch.randn(2, 3, dtype=D))
    with pytest.raises(ValueError, match="hidden_z.1.weight"):
        psi.check_constraints()
    with pytest.raises(ValueError, match="hidden_z.1.weight"):
        LearnedProx(psi)(torch.randn(2, 3, dtype=D))
    psi.clamp_()
    psi.check_constraints()
    with torch.no_grad():
        psi.out_z.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="out_z.weight"):
        psi.check_constraints()
    psi.validate = False  # opt-out: no check
    psi.out_z.weight.data.fill_(0.1)
    psi.hidden_z[0].weight.data[0, 0] = -1.0
    psi(torch.randn(2, 3, dtype=D))


@pytest.mark.parametrize("kwargs, match", [
    ({"in_shape": 0}, "in_shape"), ({"in_shape": (2, -1)}, "in_shape"), ({"in_shape": "a"}, "in_shape"),
    ({"hidden": 0}, "hidden"), ({"layers": -1}, "layers"), ({"beta": 0.0}, "beta"),
    ({"strong_convexity": -0.1}, "strong_convexity"), ({"init_log_std": -1.0}, "init_log_std"),
    ({"validate": 1}, "validate"),
])
def test_icnn_bad_arguments(kwargs, match):
    args = {"in_shape": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ICNN(**args)


def test_icnn_bad_input_shape():
    psi = ICNN((2, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, 3\), got \(4, 6\)"):
        psi(torch.randn(4, 6))
    with pytest.raises(ValueError, match="floating-point"):
        psi(torch.ones(4, 2, 3, dtype=torch.long))


def test_other_bad_arguments():
    a = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="gamma must be finite and > 0, got 0"):
        proximal_matching_loss(a, a, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        proximal_matching_loss(a, torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="reduction"):
        proximal_matching_loss(a, a, 1.0, reduction="max")
    with pytest.raises(TypeError, match="potential must be an nn.Module"):
        LearnedProx(lambda y: y)
    opt = torch.optim.SGD(ICNN(2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be"):
        clamp_after_step("sgd", ICNN(2))
    with pytest.raises(ValueError, match="at least one module"):
        clamp_after_step(opt)
    with pytest.raises(TypeError, match=r"modules\[0\] must have a clamp_"):
        clamp_after_step(opt, torch.nn.Linear(2, 2))
    psi = ICNN(2)
    with pytest.raises(ValueError, match="tol must be finite and > 0"):
        invert_gradient(psi, a, tol=0.0)
    with pytest.raises(ValueError, match="x must be finite"):
        invert_gradient(psi, torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="y0 must have the shape"):
        invert_gradient(psi, a, y0=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="one value per sample"):
        LearnedProx(torch.nn.Linear(2, 2))(a)
    with pytest.raises(ValueError, match="step must be finite and > 0"):
        pnp_pgd(lambda v: v, lambda v: v, lambda v: v, a, step=-1.0)
    with pytest.raises(TypeError, match="A must be callable"):
        pnp_pgd(lambda v: v, 3, lambda v: v, a, step=1.0)


def test_gamma_schedule():
    s = GammaSchedule.geometric(0.1, stages=4, steps_per_stage=10)
    assert s.gammas == pytest.approx((0.8, 0.4, 0.2, 0.1)) and s.total_steps == 40
    assert [s(i) for i in (0, 9, 10, 39, 40, 1000)] == pytest.approx([0.8, 0.8, 0.4, 0.1, 0.1, 0.1])
    t = GammaSchedule((0.5, 0.4, 0.3), (2, 1, 3))
    assert [t.stage(i) for i in range(7)] == [0, 0, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="gammas"):
        GammaSchedule((), 3)
    with pytest.raises(ValueError, match=r"gammas\[1\] must be finite and > 0"):
        GammaSchedule((0.5, -0.1), 3)
    with pytest.raises(ValueError, match="one int per gamma"):
        GammaSchedule((0.5, 0.1), (3,))
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        s(-1)


# ------------------------------------------------------------------------------------------ PnP
def test_pnp_pgd_reaches_the_closed_form_minimiser():
    lam = 0.5
    prox = quadratic_prox(lam).eval()
    A = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.9]], dtype=D)
    y = torch.randn(4, 3, generator=gen(2), dtype=D)
    res = pnp_pgd(prox, lambda v: v @ A.T, lambda v: v @ A, y, step=1.0, iters=300)
    # argmin_x 1/2 ||A x - y||^2 + lam/2 ||x||^2
    expected = torch.linalg.solve(A.T @ A + lam * torch.eye(3, dtype=D), (y @ A).T).T
    assert torch.allclose(res.x, expected, atol=1e-6)
    assert res.changes[-1] < 1e-8 and len(res.changes) == 300


# ------------------------------------------------------------------------------------------ claim and bench
def test_claim_criterion_and_control():
    from gradkit.harness.claims import get_claim
    from gradkit.harness.suite import FAIL, INCONCLUSIVE, PASS, decide

    c = get_claim("lpn")

    def seed(pm_dz, l2_dz, pm_mae, l2_mae, probe):
        base = {"f_probe": probe}
        return {"pm": {**base, "dead_zone": pm_dz, "mae_soft": pm_mae},
                "l2": {**base, "dead_zone": l2_dz, "mae_soft": l2_mae},
                "l1": {**base, "dead_zone": 0.3, "mae_soft": 0.2}}

    assert decide(c, c.data, [seed(0.1, 0.35, 0.15, 0.22, 0.25)] * 2).verdict == PASS
    assert decide(c, c.data, [seed(0.3, 0.35, 0.15, 0.22, 0.25)]).verdict == FAIL
    assert decide(c, c.data, [seed(0.1, 0.35, 0.21, 0.22, 0.25)]).verdict == FAIL
    assert decide(c, c.data, [seed(0.1, 0.35, 0.15, 0.22, 0.1)]).verdict == FAIL
    assert decide(c, c.data, [seed(0.0, 0.0, 0.0, 0.0, 0.25)]).verdict in (FAIL, INCONCLUSIVE)


def test_claim_smoke_shapes(smoke_run):
    out = smoke_run("lpn")
    n = len(out.info["curve_axes"]["prox"]["x"])
    assert all(len(v) == n for v in out.curves["prox"].values())
    for arm, m in out.metrics.items():
        assert 0.0 < m["prior_coverage"] <= 1.0
        assert m["lr"] in (1e-3, 3e-3)
        assert out.info["arms"][arm]["tuned"]["grid"] == [1e-3, 3e-3]


def test_benchmarks_run():
    from gradkit.harness.bench import BENCHMARKS, load_benchmarks

    load_benchmarks()
    for name in ("lpn-prox-forward-1d", "lpn-train-step-1d"):
        r = BENCHMARKS.get(name).run(2)
        assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)
