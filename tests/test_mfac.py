"""Tests of M-FAC (paper slug: mfac): static/blocked/dynamic inverse-Fisher products, the MFAC optimizer,
OBS pruning, the claim at smoke scale and the benchmark registration."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradkit.curvature import (
    EmpiricalFisherInverse, OBSPruner, SlidingFisherInverse, magnitude_prune, obs_prune_step, sparsity_schedule,
)
from gradkit.optim.mfac import MFAC

F64 = torch.float64


def grads(m: int, d: int, seed: int = 0, scale: float | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=F64) * (scale if scale is not None else 1 / math.sqrt(d))


def dense_fisher(g: torch.Tensor, damp: float, block: int | None = None) -> torch.Tensor:
    m, d = g.shape
    f = damp * torch.eye(d, dtype=F64) + g.T @ g / m
    if block is not None:
        keep = torch.zeros(d, d, dtype=torch.bool)
        for s in range(0, d, block):
            keep[s:s + block, s:s + block] = True
        f = f * keep
    return f


def naive_sherman_morrison(g: torch.Tensor, damp: float) -> torch.Tensor:
    """The dense recursion F_i^{-1} = F_{i-1}^{-1} - (F_{i-1}^{-1} g_i)(..)^T / (m + g_i^T F_{i-1}^{-1} g_i)."""
    m, d = g.shape
    h = torch.eye(d, dtype=F64) / damp
    for gi in g:
        hg = h @ gi
        h = h - torch.outer(hg, hg) / (m + gi @ hg)
    return h


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------ static / blocked
@pytest.mark.parametrize("method", ["static", "woodbury"])
@pytest.mark.parametrize("damp", [1e-5, 1e-2])
def test_static_mul_diag_entry_match_dense(method, damp):
    g = grads(8, 40)
    finv = EmpiricalFisherInverse(g, damp=damp, method=method)
    f = dense_fisher(g, damp)
    inv = torch.linalg.inv(f)
    x = torch.randn(3, 40, dtype=F64)
    assert rel(finv.mul(x), torch.linalg.solve(f, x.T).T) < 1e-10
    assert rel(finv.mul(x[0]), torch.linalg.solve(f, x[0])) < 1e-10
    assert rel(finv.diag(), torch.diagonal(inv)) < 1e-10
    for q in (0, 17, 39, -1):
        assert finv.entry(q) == pytest.approx(float(inv[q, q]), rel=1e-10)
    assert rel(finv.dense(), inv) < 1e-10


def test_static_equals_naive_sherman_morrison_and_is_symmetric():
    g = grads(6, 25, seed=3, scale=1.0)
    finv = EmpiricalFisherInverse(g, damp=1e-3)
    h = naive_sherman_morrison(g, 1e-3)
    assert rel(finv.dense(), h) < 1e-10
    a, b = torch.randn(25, dtype=F64), torch.randn(25, dtype=F64)
    assert float(a @ finv.mul(b)) == pytest.approx(float(b @ finv.mul(a)), rel=1e-12)


@pytest.mark.parametrize("blocksize", [10, 16, 7])   # 16 and 7 do not divide d = 40
@pytest.mark.parametrize("method", ["static", "woodbury"])
def test_blocked_matches_dense_block_diagonal(blocksize, method):
    g = grads(5, 40, seed=1)
    finv = EmpiricalFisherInverse(g, damp=1e-4, blocksize=blocksize, method=method)
    f = dense_fisher(g, 1e-4, blocksize)
    x = torch.randn(40, dtype=F64)
    assert rel(finv.mul(x), torch.linalg.solve(f, x)) < 1e-10
    assert rel(finv.diag(), torch.diagonal(torch.linalg.inv(f))) < 1e-10
    assert finv.entry(39) == pytest.approx(float(torch.linalg.inv(f)[39, 39]), rel=1e-10)
    # a blocksize >= d is the full inverse
    full = EmpiricalFisherInverse(g, damp=1e-4, blocksize=100)
    assert rel(full.mul(x), torch.linalg.solve(dense_fisher(g, 1e-4), x)) < 1e-10


def test_static_float32_input_and_dtype_of_result():
    g = grads(4, 20).float()
    finv = EmpiricalFisherInverse(g, damp=1e-3)
    y = finv.mul(torch.ones(20))
    assert y.dtype == torch.float32
    ref = torch.linalg.solve(dense_fisher(g.double(), 1e-3), torch.ones(20, dtype=F64))
    assert rel(y.double(), ref) < 1e-6


# ------------------------------------------------------------------------------------ dynamic
@pytest.mark.parametrize("method", ["woodbury", "mfac"])
def test_dynamic_after_m_updates_matches_dense(method):
    g = grads(8, 30, seed=2)
    h = SlidingFisherInverse(8, 30, damp=1e-5, method=method, dtype=F64)
    for gi in g:
        h.update(gi)
    f = dense_fisher(g, 1e-5)
    x = torch.randn(2, 30, dtype=F64)
    assert rel(h.mul(x), torch.linalg.solve(f, x.T).T) < 1e-10
    assert rel(h.dense(), torch.linalg.inv(f)) < 1e-9


@pytest.mark.parametrize("method", ["woodbury", "mfac"])
@pytest.mark.parametrize("refresh", [None, 1, 1000])
def test_ring_buffer_equals_static_inverse_of_last_m(method, refresh):
    m, d = 6, 25
    g = grads(m + 23, d, seed=4)
    h = SlidingFisherInverse(m, d, damp=1e-5, method=method, dtype=F64,
                             refresh=refresh if method == "woodbury" else None)
    for gi in g[:-1]:
        h.update(gi)
    u = h.update_mul(g[-1])
    last = g[-m:]
    static = EmpiricalFisherInverse(last, damp=1e-5)
    assert rel(u, static.mul(g[-1])) < 1e-9
    x = torch.randn(d, dtype=F64)
    assert rel(h.mul(x), static.mul(x)) < 1e-9
    assert h.count == m + 23 and h.slot == (m + 23) % m


def test_mfac_recursion_pivots_are_sherman_morrison_denominators():
    m, d, damp = 5, 20, 1e-3
    g = grads(m, d, seed=5, scale=1.0)
    h = SlidingFisherInverse(m, d, damp=damp, method="mfac", dtype=F64)
    for gi in g:
        h.update(gi)
    hinv = torch.eye(d, dtype=F64) / damp
    for i, gi in enumerate(g):
        hg = hinv @ gi
        # d_i = m + g_i^T F_{i-1}^{-1} g_i and F_{i-1}^{-1} g_i = sum_j B_ij g_j
        assert float(h.pivots[i]) == pytest.approx(float(m + gi @ hg), rel=1e-10)
        assert rel(h.coef[i] @ g, hg) < 1e-10
        hinv = hinv - torch.outer(hg, hg) / (m + gi @ hg)


def test_first_update_mul_from_zero_window():
    m, damp = 16, 1e-5
    g = torch.randn(50, dtype=F64)
    for method in ("woodbury", "mfac"):
        h = SlidingFisherInverse(m, 50, damp=damp, method=method, dtype=F64)
        u = h.update_mul(g)
        assert rel(u, m * g / (m * damp + g @ g)) < 1e-9


def test_dynamic_float32_window_is_accurate_for_gradients_in_window():
    g = grads(8, 200, seed=6).float()
    h = SlidingFisherInverse(8, 200, damp=1e-5)            # float32 window, float64 factors
    for gi in g[:-1]:
        h.update(gi)
    u = h.update_mul(g[-1])
    ref = torch.linalg.solve(dense_fisher(g.double(), 1e-5), g[-1].double())
    assert u.dtype == torch.float32
    assert rel(u.double(), ref) < 1e-4


def test_dynamic_state_dict_roundtrip():
    g = grads(12, 20, seed=7)
    a = SlidingFisherInverse(4, 20, damp=1e-4, dtype=F64)
    for gi in g[:9]:
        a.update(gi)
    b = SlidingFisherInverse(4, 20, damp=1e-4, dtype=F64)
    b.load_state_dict(a.state_dict())
    for gi in g[9:]:
        assert torch.equal(a.update_mul(gi), b.update_mul(gi))


# ------------------------------------------------------------------------------------ optimizer
def naive_mfac_steps(w0: torch.Tensor, grad_fn, steps: int, m: int, lr: float, damp: float, momentum: float,
                     wd: float) -> torch.Tensor:
    """Dense reference: window of zeros, insert, solve with the dense Fisher, momentum, update."""
    w = w0.clone()
    window = torch.zeros(m, len(w), dtype=F64)
    v = torch.zeros_like(w)
    for t in range(steps):
        g = grad_fn(w) + wd * w
        window[t % m] = g
        u = torch.linalg.solve(dense_fisher(window, damp), g)
        if momentum > 0:
            v = momentum * v + (1 - momentum) * u
            u = v
        w = w - lr * u
    return w


@pytest.mark.parametrize("method", ["woodbury", "mfac"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-2)])
def test_optimizer_matches_dense_reference(method, momentum, wd):
    torch.manual_seed(0)
    a = torch.randn(30, 12, dtype=F64)
    b = torch.randn(30, dtype=F64)

    def grad_fn(w):
        return a.T @ (a @ w - b) / 30

    w0 = torch.randn(12, dtype=F64)
    p1, p2 = w0[:5].clone().requires_grad_(), w0[5:].clone().requires_grad_()
    opt = MFAC([p1, p2], lr=0.05, momentum=momentum, weight_decay=wd, ngrads=4, damp=1e-3, method=method)
    for _ in range(9):
        opt.zero_grad()
        w = torch.cat([p1, p2])
        (0.5 * ((a @ w - b) ** 2).mean()).backward()
        opt.step()
    ref = naive_mfac_steps(w0, grad_fn, 9, 4, 0.05, 1e-3, momentum, wd)
    assert rel(torch.cat([p1, p2]).detach(), ref) < 1e-9


def test_optimizer_first_step_formula_and_group_lr():
    torch.manual_seed(1)
    p1 = torch.randn(6, dtype=F64, requires_grad=True)
    p2 = torch.randn(4, dtype=F64, requires_grad=True)
    g1, g2 = torch.randn(6, dtype=F64), torch.randn(4, dtype=F64)
    w1, w2 = p1.detach().clone(), p2.detach().clone()
    opt = MFAC([{"params": [p1]}, {"params": [p2], "lr": 0.5}], lr=1.0, ngrads=8, damp=1e-5)
    p1.grad, p2.grad = g1.clone(), g2.clone()
    opt.step()
    g = torch.cat([g1, g2])
    u = 8 * g / (8 * 1e-5 + g @ g)
    assert rel(w1 - p1.detach(), u[:6]) < 1e-9
    assert rel(w2 - p2.detach(), 0.5 * u[6:]) < 1e-9


def test_optimizer_state_dict_roundtrip_and_training():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    opt = MFAC(model.parameters(), lr=1e-2, momentum=0.5, ngrads=5)

    def step(mdl, o):
        o.zero_grad()
        loss = nn.functional.cross_entropy(mdl(x), y)
        loss.backward()
        o.step()
        return float(loss.detach())

    losses = [step(model, opt) for _ in range(7)]
    model2 = copy.deepcopy(model)
    opt2 = MFAC(model2.parameters(), lr=1e-2, momentum=0.5, ngrads=5)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(6):
        losses.append(step(model, opt))
        step(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert losses[-1] < losses[0]
    assert opt.fisher.dots.dtype == torch.float64 and opt.fisher.grads.dtype == torch.float32


def test_optimizer_sparse_keeps_zeros():
    torch.manual_seed(3)
    lin = nn.Linear(10, 4)
    with torch.no_grad():
        lin.weight[:, :5] = 0
    opt = MFAC(lin.parameters(), lr=1e-2, ngrads=4, sparse=True)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(8, 10)).pow(2).sum().backward()
        opt.step()
    assert torch.all(lin.weight[:, :5] == 0) and torch.all(lin.weight[:, 5:] != 0)


def test_optimizer_closure_and_missing_grads():
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(2, requires_grad=True)     # never gets a gradient
    opt = MFAC([p, q], lr=1e-3, ngrads=2)
    loss = opt.step(lambda: ((p - 1) ** 2).sum().backward() or torch.tensor(1.0))
    assert float(loss) == 1.0 and torch.all(p > 0) and torch.all(q == 0)


# ------------------------------------------------------------------------------------ pruning
def test_obs_single_weight_is_exact_obs():
    """For a quadratic loss 1/2 dw^T F dw, OBS removal of weight q costs exactly rho_q and zeroes w_q."""
    g = grads(12, 15, seed=8, scale=1.0)
    g[:, 3] = 0.0                       # weight 3 is already pruned: its gradients are masked out
    damp = 1e-2
    finv = EmpiricalFisherInverse(g, damp=damp)
    f = dense_fisher(g, damp)
    inv = torch.linalg.inv(f)
    w = torch.randn(15, dtype=F64)
    mask = torch.ones(15, dtype=torch.bool)
    mask[3] = False
    w[3] = 0.0
    new_w, new_mask = obs_prune_step(w, mask, finv, 1)
    rho = w ** 2 / (2 * torch.diagonal(inv))
    rho[3] = math.inf
    q = int(torch.argmin(rho))
    assert not new_mask[q] and new_mask.sum() == 13 and new_w[q] == 0 and new_w[3] == 0
    expect = w - w[q] / inv[q, q] * inv[:, q]
    assert rel(new_w, expect) < 1e-10
    dw = new_w - w
    assert float(0.5 * dw @ f @ dw) == pytest.approx(float(rho[q]), rel=1e-8)


def test_magnitude_prune_global_and_keeps_pruned():
    a = torch.tensor([[0.5, -0.1], [0.3, 2.0]])
    b = torch.tensor([0.05, -0.2, 0.2])   # tie between -0.2 and 0.2: stable order prunes the first
    masks = magnitude_prune([a, b], 0.5)
    assert torch.equal(a, torch.tensor([[0.5, 0.0], [0.3, 2.0]])) and torch.equal(b, torch.tensor([0.0, 0.0, 0.2]))
    assert [m.tolist() for m in masks] == [[[True, False], [True, True]], [False, False, True]]
    masks2 = magnitude_prune([a, b], 0.7, masks)
    assert sum(int((~m).sum()) for m in masks2) == 4 and a[0, 1] == 0 and b[0] == 0


def test_sparsity_schedule():
    s = sparsity_schedule(0.0, 0.9, 4)
    f = 0.1 ** 0.25
    assert s[:3] == pytest.approx([1 - f, 1 - f ** 2, 1 - f ** 3]) and s[-1] == 0.9
    assert sparsity_schedule(0.5, 0.8, 1) == [0.8]


@pytest.mark.parametrize("nrecomps,blocksize", [(1, None), (3, 32)])
def test_obs_pruner_end_to_end(nrecomps, blocksize):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]   # 8 batches, re-iterated for ngrads=12
    params = [model[0].weight, model[2].weight]
    with torch.no_grad():
        model[0].weight[0] = 0.0
    pre = [torch.ones_like(p, dtype=torch.bool) for p in params]
    pre[0][0] = False
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    pruner = OBSPruner(model, params, loss, loader, ngrads=12, damp=1e-4, blocksize=blocksize)
    assert pruner.collect_grads(torch.cat([m.reshape(-1) for m in pre])).shape == (12, 176)
    model.train()
    masks, weights = pruner.prune(0.6, masks=pre, nrecomps=nrecomps)
    assert model.training
    total = sum(p.numel() for p in params)
    assert sum(int((~m).sum()) for m in masks) == int(0.6 * total)
    assert torch.all(params[0][0] == 0) and not masks[0][0].any()
    for p, m, w in zip(params, masks, weights):
        assert torch.all(p[~m] == 0) and torch.equal(p.detach(), w)


def test_obs_removal_costs_no_more_than_magnitude_on_quadratic():
    """OBS picks the weight whose removal (with optimal correction) costs least on 1/2 dw^T F dw, so one OBS
    removal never costs more than removing the smallest-magnitude weight without correction; repeated
    single-weight steps with masked gradients are exact constrained OBS and keep the pruned weights at 0."""
    torch.manual_seed(5)
    g = torch.randn(64, 30, dtype=F64) @ torch.randn(30, 30, dtype=F64)
    damp = 1e-3
    f = dense_fisher(g, damp)
    w = torch.randn(30, dtype=F64)
    cost = lambda v: float(0.5 * (v - w) @ f @ (v - w))  # noqa: E731
    w_obs, _ = obs_prune_step(w, torch.ones(30, dtype=torch.bool), EmpiricalFisherInverse(g, damp=damp), 1)
    w_mag = w.clone()
    magnitude_prune([w_mag], 1 / 30)
    assert cost(w_obs) <= cost(w_mag) + 1e-12
    v, mask = w.clone(), torch.ones(30, dtype=torch.bool)
    for _ in range(5):
        v, mask = obs_prune_step(v, mask, EmpiricalFisherInverse(g * mask, damp=damp), 1)
        assert torch.all(v[~mask] == 0) and int((~mask).sum()) == 30 - int(mask.sum())
    assert int((~mask).sum()) == 5


# ------------------------------------------------------------------------------------ errors
def test_errors():
    g = grads(4, 10)
    with pytest.raises(ValueError, match="damp must be finite and > 0"):
        EmpiricalFisherInverse(g, damp=0.0)
    with pytest.raises(ValueError, match="damp must be finite"):
        EmpiricalFisherInverse(g, damp=float("nan"))
    with pytest.raises(ValueError, match="grads must have shape"):
        EmpiricalFisherInverse(g[0])
    with pytest.raises(ValueError, match="nan or inf"):
        EmpiricalFisherInverse(g * float("inf"))
    with pytest.raises(ValueError, match="method must be"):
        EmpiricalFisherInverse(g, method="lu")
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        EmpiricalFisherInverse(g, blocksize=0)
    with pytest.raises(ValueError, match="last dimension d=10"):
        EmpiricalFisherInverse(g).mul(torch.zeros(9, dtype=F64))
    with pytest.raises(IndexError, match="q must be an int"):
        EmpiricalFisherInverse(g).entry(10)
    with pytest.raises(ValueError, match="m must be a positive int"):
        SlidingFisherInverse(0, 10)
    with pytest.raises(ValueError, match="method must be 'woodbury' or 'mfac'"):
        SlidingFisherInverse(2, 10, method="static")
    with pytest.raises(ValueError, match="dtype must be"):
        SlidingFisherInverse(2, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="g must be a vector"):
        SlidingFisherInverse(2, 10).update(torch.zeros(2, 10))
    with pytest.raises(TypeError, match="floating-point"):
        SlidingFisherInverse(2, 10).mul(torch.zeros(10, dtype=torch.int64))
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="lr must be finite"):
        MFAC(p, lr=-1.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        MFAC(p, momentum=1.0)
    with pytest.raises(ValueError, match="ngrads must be a positive int"):
        MFAC(p, ngrads=0)
    opt = MFAC(p, ngrads=3)
    with pytest.raises(RuntimeError, match="add_param_group after construction"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="is for ngrads=3, d=3"):
        MFAC([torch.zeros(4, requires_grad=True)], ngrads=3).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_prune([torch.ones(3)], 1.0)
    with pytest.raises(ValueError, match=r"masks\[0\] must be a tensor of shape"):
        magnitude_prune([torch.ones(3)], 0.5, [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="n_prune=5 exceeds"):
        obs_prune_step(torch.ones(10, dtype=F64), torch.ones(10, dtype=torch.bool) & (torch.arange(10) < 4),
                       EmpiricalFisherInverse(g), 5)
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="ngrads must be a positive int"):
        OBSPruner(model, [model.weight], lambda m, b: m(b).sum(), [], ngrads=0)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        OBSPruner(model, [model.weight], lambda m, b: m(b).sum(), [], ngrads=2).prune(0.5)
    with pytest.raises(ValueError, match="steps \\(nrecomps\\) must be a positive int"):
        sparsity_schedule(0.0, 0.5, 0)


# ------------------------------------------------------------------------------------ claim / bench
def test_claim_smoke_parts(smoke_run):
    from gradkit.harness.claims.base import CLAIMS
    import gradkit.harness.claims.mfac as mod

    out = smoke_run("mfac")
    assert CLAIMS.get("mfac") is mod.CLAIM
    assert out.metrics["ihvp"]["err_exact"] < 1e-10 and out.metrics["ihvp"]["err_ring"] < 1e-8
    for arm in ("magnitude", "mfac", "mfac_4step"):
        assert {"acc_s50", "acc_s80", "acc_s90"} <= set(out.metrics[arm])
    assert out.metrics["mfac"]["sparsity_s50"] == pytest.approx(0.5, abs=1e-3)
    assert set(out.curves["opt_test_acc"]) == {"opt_adam", "opt_sgd", "opt_mfac"}
    # every optimizer picks its lr on validation from a grid of the same size
    p = mod.CLAIM.protocol.at("smoke")
    grids = {"opt_mfac": p.mfac_lrs, "opt_adam": p.adam_lrs, "opt_sgd": p.sgd_lrs}
    assert len({len(g) for g in grids.values()}) == 1
    for arm, grid in grids.items():
        assert out.metrics[arm]["lr"] in grid
        assert set(out.info["opt_test_acc_by_lr"][arm]) == {f"{lr:g}" for lr in grid}
    ok, checks = mod.CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 6


def test_benchmark_registered():
    import importlib

    importlib.import_module("gradkit.harness.benchmarks.mfac")   # registers the benchmarks
    from gradkit.harness.bench import BENCHMARKS

    names = [n for n in BENCHMARKS.names() if n.startswith("mfac")]
    assert len(names) >= 3
    res = BENCHMARKS.get(names[0]).run(2)
    assert res.baseline_s > 0 and res.candidate_s > 0
